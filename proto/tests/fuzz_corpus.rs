//! Replays the fuzz corpus (`fuzz/corpus/`) through the harnesses the
//! cargo-fuzz targets run, then random inputs: a patched ring or symbology
//! file gives an error or works, never a crash.

use std::path::Path;

use proptest::prelude::*;
use tickwire_proto::fuzzing;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.expect("entry").path();
        run(&std::fs::read(&path).expect("corpus file"));
        n += 1;
    }
    n
}

#[test]
fn the_ring_file_corpus_replays_without_a_crash() {
    assert!(
        replay("ring_file", fuzzing::ring_file) > 0,
        "an empty corpus tests nothing"
    );
}

#[test]
fn the_symbology_file_corpus_replays_without_a_crash() {
    assert!(replay("symbology_file", fuzzing::symbology_file) > 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_ring_file_patches(input in proptest::collection::vec(any::<u8>(), 0..64)) {
        fuzzing::ring_file(&input);
    }

    #[test]
    fn random_symbology_file_patches(input in proptest::collection::vec(any::<u8>(), 0..64)) {
        fuzzing::symbology_file(&input);
    }
}

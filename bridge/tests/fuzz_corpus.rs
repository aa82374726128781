//! Replays the `payload` fuzz corpus (`fuzz/corpus/payload/`), then random
//! bytes: every payload parses to an event or a `Reject`, never a panic.

use std::path::Path;

use proptest::prelude::*;
use tickwire_bridge::payload::parse_both_formats;

#[test]
fn the_payload_corpus_replays_without_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/payload");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        parse_both_formats(&std::fs::read(entry.expect("entry").path()).expect("corpus file"));
        n += 1;
    }
    assert!(n > 0, "an empty corpus tests nothing");
}

proptest! {
    #[test]
    fn random_payloads(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        parse_both_formats(&input);
    }
}

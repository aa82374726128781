//! Ring and symbology files: one writer, restart, and structurally bad files
//! that must give a clear error, never a crash.

use std::os::unix::fs::FileExt;
use std::path::Path;

use tickwire_proto::Error;
use tickwire_proto::file::{PartitionWriter, RingFile, RingParams, ring_file_name};
use tickwire_proto::frame::FrameBody;
use tickwire_proto::ring::{Read, ReaderCore};
use tickwire_proto::symbology::{Symbology, SymbologyWriter};

fn params(partitions: u32, capacity: u64) -> RingParams {
    RingParams {
        topic: "md/eq".into(),
        partition: 0,
        partitions,
        capacity,
        slot_size: 64,
    }
}

fn ring_path(dir: &Path) -> std::path::PathBuf {
    dir.join(ring_file_name("md/eq", 0))
}

#[test]
fn a_second_writer_on_the_same_ring_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _w = PartitionWriter::open(dir.path(), &params(1, 64)).expect("first writer");
    match PartitionWriter::open(dir.path(), &params(1, 64)) {
        Err(Error::WriterLocked { path }) => assert_eq!(path, ring_path(dir.path())),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("second writer accepted"),
    }
}

#[test]
fn restart_bumps_the_epoch_and_continues_the_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = PartitionWriter::open(dir.path(), &params(1, 16)).expect("writer");
    assert_eq!(w.epoch(), 1);
    for i in 1..=40u64 {
        assert_eq!(w.publish(&FrameBody::trade(1, i, 1, 1).to_words()), i);
    }
    w.flush();
    let reader_file = RingFile::open_reader(&ring_path(dir.path())).expect("reader");
    let mut reader = ReaderCore::new(reader_file.ring(), 38);
    drop(w);
    // The ring file is re-opened, never recreated: the reader's mapping
    // stays live and sees the new writer's frames.
    let mut w = PartitionWriter::open(dir.path(), &params(1, 16)).expect("restart");
    assert_eq!(w.epoch(), 2);
    assert_eq!(w.core().next_seq(), 41);
    assert_eq!(w.publish(&FrameBody::trade(1, 41, 1, 1).to_words()), 41);
    w.flush();
    let mut buf = [0u64; 7];
    let got: Vec<Read> = (0..5).map(|_| reader.try_read(&mut buf)).collect();
    assert_eq!(
        got,
        vec![
            Read::Frame(38),
            Read::Frame(39),
            Read::Frame(40),
            Read::Frame(41),
            Read::Empty
        ]
    );
    assert_eq!(reader_file.ring().epoch(), 2);
}

#[test]
fn a_writer_that_died_mid_frame_is_recovered_without_a_duplicate() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut w = PartitionWriter::open(dir.path(), &params(1, 16)).expect("writer");
        for i in 1..=20u64 {
            w.publish(&FrameBody::trade(1, i, 1, 1).to_words());
        }
        w.flush();
    }
    // Simulate a crash while filling seq 21: its slot carries the WRITING mark.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ring_path(dir.path()))
        .expect("open");
    let slot_off = 12 * 1024 + (21 % 16) * 64;
    f.write_all_at(&(21u64 | 1 << 63).to_le_bytes(), slot_off)
        .expect("write");
    let w = PartitionWriter::open(dir.path(), &params(1, 16)).expect("restart");
    assert_eq!(
        w.core().next_seq(),
        21,
        "21 was never committed and is written again"
    );
}

#[test]
fn a_changed_partition_count_or_capacity_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(PartitionWriter::open(dir.path(), &params(2, 64)).expect("writer"));
    match PartitionWriter::open(dir.path(), &params(4, 64)) {
        Err(Error::Mismatch {
            what,
            on_disk,
            requested,
            ..
        }) => {
            assert_eq!((what, on_disk, requested), ("partition count", 2, 4));
        }
        other => panic!("expected a mismatch, got {:?}", other.err()),
    }
    assert!(matches!(
        PartitionWriter::open(dir.path(), &params(2, 128)),
        Err(Error::Mismatch {
            what: "capacity",
            ..
        })
    ));
}

/// Writes a valid ring, then corrupts it with `patch`, and returns the
/// reader's error message.
fn corrupt(patch: impl FnOnce(&std::fs::File)) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(PartitionWriter::open(dir.path(), &params(1, 64)).expect("writer"));
    let path = ring_path(dir.path());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    patch(&f);
    match RingFile::open_reader(&path) {
        Ok(_) => panic!("corrupt file accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn structurally_bad_ring_files_give_clear_errors() {
    let msg = corrupt(|f| f.write_all_at(b"NOTARING", 0).expect("w"));
    assert!(msg.contains("not a tickwire ring file"), "{msg}");
    let msg = corrupt(|f| f.write_all_at(&9u16.to_le_bytes(), 8).expect("w"));
    assert!(
        msg.contains("layout version 9.1 is not supported (this build knows 1.1)"),
        "{msg}"
    );
    let msg = corrupt(|f| {
        f.write_all_at(&0x0403_0201u32.to_le_bytes(), 20)
            .expect("w")
    });
    assert!(msg.contains("endian"), "{msg}");
    let msg = corrupt(|f| f.write_all_at(&100u32.to_le_bytes(), 16).expect("w"));
    assert!(msg.contains("slot_size = 100"), "{msg}");
    let msg = corrupt(|f| f.write_all_at(&100u64.to_le_bytes(), 24).expect("w"));
    assert!(
        msg.contains("capacity = 100") && msg.contains("power of two"),
        "{msg}"
    );
    let msg = corrupt(|f| f.write_all_at(&4096u32.to_le_bytes(), 12).expect("w"));
    assert!(msg.contains("header_size = 4096"), "{msg}");
    let msg = corrupt(|f| f.set_len(12 * 1024 + 10 * 64).expect("truncate"));
    assert!(
        msg.contains("file is 12928 bytes, its header needs 16384"),
        "{msg}"
    );
    let msg = corrupt(|f| f.set_len(100).expect("truncate"));
    assert!(msg.contains("file is 100 bytes"), "{msg}");
    let msg = corrupt(|f| f.write_all_at(&7u32.to_le_bytes(), 32).expect("w"));
    assert!(msg.contains("partition = 7"), "{msg}");
}

#[test]
fn structurally_bad_symbology_files_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = SymbologyWriter::open(dir.path(), 8).expect("writer");
    w.resolve(&tickwire_proto::symbology::Instrument {
        symbol: "A".into(),
        exchange: "X".into(),
        currency: "USD".into(),
        size_decimals: 0,
    })
    .expect("id");
    drop(w);
    let path = dir.path().join("symbology");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    // A count beyond the capacity (a corrupt or hostile file) is clamped by
    // readers: ids past the table never resolve, nothing reads out of bounds.
    f.write_all_at(&1_000_000u32.to_le_bytes(), 64).expect("w");
    let r = Symbology::open(dir.path()).expect("reader");
    assert_eq!(r.count(), 8);
    assert!(r.get(9).is_none());
    assert!(r.get(u32::MAX).is_none());
    // The writer refuses it outright.
    match SymbologyWriter::open(dir.path(), 8) {
        Err(e) => assert!(e.to_string().contains("count = 1000000"), "{e}"),
        Ok(_) => panic!("corrupt count accepted"),
    }
    f.write_all_at(&2u16.to_le_bytes(), 8).expect("w");
    let e = Symbology::open(dir.path()).err().expect("version refused");
    assert!(
        e.to_string()
            .contains("layout version 2.0 is not supported"),
        "{e}"
    );
    f.write_all_at(b"XXXXXXXX", 0).expect("w");
    let e = Symbology::open(dir.path()).err().expect("magic refused");
    assert!(
        e.to_string().contains("not a tickwire symbology file"),
        "{e}"
    );
    f.set_len(10).expect("truncate");
    let e = Symbology::open(dir.path()).err().expect("short refused");
    assert!(e.to_string().contains("file is 10 bytes"), "{e}");
}

//! Harnesses for fuzzing the file formats (feature `fuzzing`): the
//! cargo-fuzz targets in `fuzz/` and the corpus replay in
//! `tests/fuzz_corpus.rs` call these, so both run the same code.
//!
//! An input is a patch to a valid file rather than a whole file, so that
//! small inputs reach every header field: byte 0 chooses a truncation
//! (odd: cut the file to `u16(bytes 0..2) % len` bytes), then every three
//! bytes are one patch: a little-endian u16 whose top bit picks the file
//! (data or reader-state; symbology has one) and whose other bits, modulo
//! the file's length, the offset; then the byte to write there.
//!
//! A harness returns normally whatever the input; an error from an open is
//! the expected outcome for most. A panic, a crash or a hang is a bug.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::file::{FileModes, PartitionReader, PartitionWriter, RingParams, StartAt, readers_path};
use crate::frame::FrameBody;
use crate::symbology::{Instrument, Symbology, SymbologyWriter};

const TOPIC: &str = "fuzz/ticks";

fn params() -> RingParams {
    RingParams {
        topic: TOPIC.into(),
        partition: 0,
        partitions: 1,
        capacity: 16,
        slot_size: 64,
        modes: FileModes::default(),
    }
}

/// Applies an input's truncation and patches to `files`.
fn patch(input: &[u8], files: &[&Path]) {
    let open = |p: &Path| std::fs::OpenOptions::new().read(true).write(true).open(p);
    if let [a, b, ..] = input
        && a & 1 == 1
        && let Ok(f) = open(files[0])
        && let Ok(m) = f.metadata()
        && m.len() > 0
    {
        let _ = f.set_len(u16::from_le_bytes([*a, *b]) as u64 % m.len());
    }
    for p in input.get(2..).unwrap_or(&[]).chunks_exact(3) {
        let at = u16::from_le_bytes([p[0], p[1]]);
        let file = files[(at >> 15) as usize % files.len()];
        if let Ok(f) = open(file)
            && let Ok(m) = f.metadata()
            && m.len() > 0
        {
            let _ = f.write_all_at(&[p[2]], (at & 0x7fff) as u64 % m.len());
        }
    }
}

/// A ring with 20 frames and one reader's state, patched by `input`, then
/// opened by a reader (which reads what it can) and by a restarted writer
/// (which must refuse a ring it cannot trust, or continue it).
pub fn ring_file(input: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let Ok(mut w) = PartitionWriter::open(dir.path(), &params()) else {
        return;
    };
    for i in 1..=20u64 {
        w.publish(&FrameBody::trade(1, i, i as i64, 1).to_words());
    }
    w.flush();
    let path = w.file().path().to_path_buf();
    let r = PartitionReader::open(&path, StartAt::Latest, None, None);
    drop(r);
    drop(w);
    patch(input, &[&path, &readers_path(&path)]);
    if let Ok(mut r) = PartitionReader::open(&path, StartAt::Earliest, None, Some(1)) {
        let mut buf = [0u64; crate::frame::BODY_WORDS];
        for _ in 0..64 {
            if r.try_read(&mut buf) == crate::ring::Read::Empty {
                break;
            }
        }
        let _ = (
            r.file().writer_alive(),
            r.file().writer_closed(),
            r.file().status(),
        );
    }
    if let Ok(mut w) = PartitionWriter::open(dir.path(), &params()) {
        for i in 0..20u64 {
            w.publish(&FrameBody::trade(1, i, 1, 1).to_words());
        }
        w.flush();
    }
}

/// A symbology table with three instruments, patched by `input`, then
/// opened by a reader (which resolves every id) and by the writer.
pub fn symbology_file(input: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let inst = |s: &str| Instrument {
        symbol: s.into(),
        exchange: "XNAS".into(),
        currency: "USD".into(),
        size_decimals: 2,
    };
    {
        let Ok(mut w) = SymbologyWriter::open(dir.path(), 8) else {
            return;
        };
        for s in ["AAPL", "MSFT", "NVDA"] {
            let _ = w.resolve(&inst(s));
        }
    }
    let path = dir.path().join(crate::symbology::SYMBOLOGY_FILE);
    patch(input, &[&path]);
    if let Ok(s) = Symbology::open(dir.path()) {
        for id in 0..=s.count().saturating_add(2) {
            if let Some(e) = s.get(id) {
                let _ = (e.symbol(), e.exchange(), e.currency(), e.real_size(12345));
            }
        }
    }
    if let Ok(mut w) = SymbologyWriter::open(dir.path(), 8) {
        let _ = w.resolve(&inst("TSLA"));
        let _ = w.resolve(&inst("AAPL"));
    }
}

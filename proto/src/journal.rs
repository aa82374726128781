//! The journal's on-disk format, and reading it.
//!
//! Every committed frame of a partition is appended to that partition's
//! journal (the broker's journal writer does it, as a gating reader of the
//! ring). Readers replay from it ([`JournalReader`]) and switch to the live
//! ring by sequence number.
//!
//! ```text
//!  <journal root>/<topic with / as ~>.<partition>/
//!      00000000000000000001.seg    frames 1 ..= 1048576 (64 bytes each)
//!      00000000000000000001.tidx   running max of ts_event at the end of every 1024 frames
//!      00000000000001048577.seg    the next segment, named by its first sequence
//!      epochs                      "first_seq epoch" per writer epoch, one per line
//! ```
//!
//! A journal frame is the ring slot's 64 bytes with the stamp word replaced
//! by a tag (all words little-endian):
//!
//! ```text
//!  offset  size  field
//!   0       4    low 32 bits of the sequence
//!   4       4    CRC-32C (Castagnoli) of the sequence (8 bytes LE) followed by the 56-byte body
//!   8      56    the frame body, as in the ring (crate::frame)
//! ```
//!
//! Frames are fixed-size, so a sequence's offset is arithmetic:
//! `(seq - first) * 64` in the segment whose name is the last first
//! sequence at or below it. The CRC covers the full sequence, so a frame
//! that was torn by a crash, zero-filled by a power loss, or copied to the
//! wrong place fails its check: the writer cuts a torn tail on restart
//! ([`scan_segment`]), and a reader stops at it ([`JournalRead::End`]) in
//! the newest segment and reports it as corruption in an older one.
//!
//! Segments are only ever appended to (never preallocated), and one write
//! is in flight per partition, so every byte below a segment's length is a
//! written frame.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::frame::{ArchivedFrameBody, BODY_WORDS};

/// Bytes per journal frame.
pub const FRAME_BYTES: usize = 64;
/// Frames per segment unless configured otherwise: 64 MiB files.
pub const DEFAULT_SEGMENT_FRAMES: u64 = 1 << 20;
/// Frames per time-index entry.
pub const INDEX_EVERY: u64 = 1024;
/// Name of the file recording writer epochs.
pub const EPOCHS_FILE: &str = "epochs";
/// Frames a reader reads from disk at once (128 KiB).
pub const READ_FRAMES: usize = 2048;

/// The journal directory of one partition under `root`.
pub fn partition_dir(root: &Path, topic: &str, partition: u32) -> PathBuf {
    root.join(format!("{}.{partition}", topic.replace('/', "~")))
}

/// The partition directories under a journal root: (topic as the
/// directory names it, `/` as `~`; partition; path), in name order. Other
/// entries (the lock, journals moved aside, the bar store) are left out.
pub fn partition_dirs(root: &Path) -> Vec<(String, u32, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u32, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let (topic, part) = name.to_str()?.rsplit_once('.')?;
            let part = part.parse::<u32>().ok()?;
            (!topic.is_empty() && e.path().is_dir()).then(|| (topic.to_string(), part, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// A segment's file name.
pub fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// A segment's time-index file name.
pub fn index_name(first: u64) -> String {
    format!("{first:020}.tidx")
}

/// CRC-32C of the sequence followed by the body, all little-endian: the
/// CPU's crc32 instruction, eight words in a row, where it has one (this
/// is per event on the journal's write and replay paths).
#[inline]
fn crc_of(seq: u64, body: &[u64; BODY_WORDS]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE 4.2, checked just above.
        return unsafe { crc_sse42(seq, body) };
    }
    crc_soft(seq, body)
}

/// The portable CRC (the crc32c crate), byte for byte the same.
fn crc_soft(seq: u64, body: &[u64; BODY_WORDS]) -> u32 {
    let mut bytes = [0u8; FRAME_BYTES];
    bytes[..8].copy_from_slice(&seq.to_le_bytes());
    for (i, w) in body.iter().enumerate() {
        bytes[8 + i * 8..16 + i * 8].copy_from_slice(&w.to_le_bytes());
    }
    crc32c::crc32c(&bytes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn crc_sse42(seq: u64, body: &[u64; BODY_WORDS]) -> u32 {
    use std::arch::x86_64::_mm_crc32_u64;
    // CRC-32C: initial value and final xor all ones; the instruction takes
    // each word's bytes in little-endian order, as the file has them.
    let mut c = _mm_crc32_u64(u64::from(u32::MAX), seq);
    for &w in body {
        c = _mm_crc32_u64(c, w);
    }
    !(c as u32)
}

/// Writes frame `seq` with `body` into `out` (64 bytes).
#[inline]
pub fn encode_frame(seq: u64, body: &[u64; BODY_WORDS], out: &mut [u8]) {
    let tag = (seq & 0xffff_ffff) | (crc_of(seq, body) as u64) << 32;
    out[..8].copy_from_slice(&tag.to_le_bytes());
    for (i, w) in body.iter().enumerate() {
        out[8 + i * 8..16 + i * 8].copy_from_slice(&w.to_le_bytes());
    }
}

/// Reads frame `seq` from `bytes` (64 bytes) into `out`; `false` when the
/// frame is not a whole, intact frame of that sequence.
#[inline]
pub fn decode_frame(seq: u64, bytes: &[u8], out: &mut [u64; BODY_WORDS]) -> bool {
    if bytes.len() < FRAME_BYTES {
        return false;
    }
    let mut f = [0u64; 8];
    for (i, w) in f.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        *w = u64::from_le_bytes(b);
    }
    if !frame_ok(seq, &f) {
        return false;
    }
    out.copy_from_slice(&f[1..]);
    true
}

/// The event time of a frame body (the time index and time starts use it).
#[inline]
pub fn frame_time(body: &[u64; BODY_WORDS]) -> u64 {
    ArchivedFrameBody::from_words(body).ts_event()
}

/// The segments of a partition's journal: their first sequences, oldest first.
///
/// # Errors
/// The directory cannot be read (a missing directory is an empty journal).
pub fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read journal directory", dir, e)),
    };
    let mut firsts = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("read journal directory", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".seg")
            && stem.len() == 20
            && let Ok(first) = stem.parse::<u64>()
            && first > 0
        {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// The writer epochs recorded for a partition: (first sequence, epoch),
/// in order. Lines that do not parse are skipped (a torn last line).
pub fn read_epochs(dir: &Path) -> Vec<(u64, u64)> {
    let Ok(text) = std::fs::read_to_string(dir.join(EPOCHS_FILE)) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_ascii_whitespace();
            let s = it.next()?.parse().ok()?;
            let e = it.next()?.parse().ok()?;
            Some((s, e))
        })
        .collect()
}

/// The epoch `seq` was written under, from [`read_epochs`]'s records.
pub fn epoch_of(epochs: &[(u64, u64)], seq: u64) -> Option<u64> {
    let i = epochs.partition_point(|&(s, _)| s <= seq);
    i.checked_sub(1).map(|i| epochs[i].1)
}

/// What [`scan_segment`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentScan {
    /// Intact frames from the start, in sequence.
    pub frames: u64,
    /// Bytes after them (a torn tail: a partial or failed frame, and what follows).
    pub torn_bytes: u64,
}

/// Checks every frame of the segment at `path` whose first sequence is
/// `first`, and returns how many are intact from the start. The writer
/// truncates the file there on restart; nothing after the first bad frame
/// is trusted.
///
/// # Errors
/// The file cannot be read.
pub fn scan_segment(path: &Path, first: u64) -> Result<SegmentScan> {
    let mut f = File::open(path).map_err(|e| Error::io("open journal segment", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io("stat journal segment", path, e))?
        .len();
    let mut buf = vec![0u8; READ_FRAMES * FRAME_BYTES * 8];
    let mut body = [0u64; BODY_WORDS];
    let mut frames = 0u64;
    let mut off = 0u64;
    'outer: while off < len {
        let want = ((len - off) as usize).min(buf.len());
        f.read_exact(&mut buf[..want])
            .map_err(|e| Error::io("read journal segment", path, e))?;
        for chunk in buf[..want].chunks(FRAME_BYTES) {
            if !decode_frame(first + frames, chunk, &mut body) {
                break 'outer;
            }
            frames += 1;
        }
        off += want as u64;
    }
    Ok(SegmentScan {
        frames,
        torn_bytes: len - frames * FRAME_BYTES as u64,
    })
}

/// What a [`JournalReader`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalRead {
    /// The frame of the asked sequence is in the output.
    Frame,
    /// Nothing at that sequence yet: it is past what the journal holds now.
    End,
    /// The journal does not hold sequences from the asked one to `to`
    /// (deleted by retention, or never journaled); it resumes at `to + 1`.
    Missing {
        /// Last missing sequence.
        to: u64,
    },
}

/// A reader of one partition's journal: frames by sequence number, in
/// blocks read with `pread`, each frame's CRC checked.
pub struct JournalReader {
    dir: PathBuf,
    segments: Vec<u64>,
    open: Option<(u64, File)>,
    /// Frames as read from disk, 8 words each (tag, then the body): words,
    /// not bytes, so a body can be handed out in place.
    buf: Vec<[u64; 8]>,
    buf_first: u64,
    buf_frames: u64,
}

impl std::fmt::Debug for JournalReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalReader")
            .field("dir", &self.dir)
            .field("segments", &self.segments.len())
            .finish()
    }
}

impl JournalReader {
    /// A reader of the journal in `dir` (one partition's directory).
    /// `None` when there is no such directory.
    ///
    /// # Errors
    /// The directory cannot be read.
    pub fn open(dir: &Path) -> Result<Option<JournalReader>> {
        if !dir.is_dir() {
            return Ok(None);
        }
        Ok(Some(JournalReader {
            dir: dir.to_path_buf(),
            segments: list_segments(dir)?,
            open: None,
            buf: vec![[0u64; 8]; READ_FRAMES],
            buf_first: 0,
            buf_frames: 0,
        }))
    }

    /// The partition's journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Looks at the directory again (new segments, segments deleted by
    /// retention).
    ///
    /// # Errors
    /// The directory cannot be read.
    pub fn refresh(&mut self) -> Result<()> {
        self.segments = list_segments(&self.dir)?;
        Ok(())
    }

    /// The oldest sequence the journal holds, if any.
    pub fn oldest(&self) -> Option<u64> {
        self.segments.first().copied()
    }

    fn segment_path(&self, first: u64) -> PathBuf {
        self.dir.join(segment_name(first))
    }

    /// Reads frame `seq` into `out`.
    ///
    /// # Errors
    /// An I/O error, or a frame that fails its check in a segment that is
    /// not the newest ([`Error::Corrupt`], naming the file and sequence).
    pub fn read(&mut self, seq: u64, out: &mut [u64; BODY_WORDS]) -> Result<JournalRead> {
        match self.load(seq)? {
            JournalRead::Frame => {}
            other => return Ok(other),
        }
        let f = &self.buf[(seq - self.buf_first) as usize];
        out.copy_from_slice(&f[1..]);
        Ok(JournalRead::Frame)
    }

    /// Makes sure the block in memory holds `seq` (reading the next one
    /// from disk if not): [`JournalRead::Frame`] when it does, then
    /// [`buffered`](Self::buffered) hands out the frames from `seq` on.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    #[inline]
    pub fn load(&mut self, seq: u64) -> Result<JournalRead> {
        self.load_at_most(seq, READ_FRAMES as u64)
    }

    /// [`load`](Self::load) for a reader that wants at most `frames` from
    /// `seq` on (a run of its own between others' it passes over): a block
    /// read from disk is no longer than that.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    #[inline]
    pub fn load_at_most(&mut self, seq: u64, frames: u64) -> Result<JournalRead> {
        if seq < self.buf_first || seq >= self.buf_first + self.buf_frames {
            return self.fill(seq, frames.clamp(1, READ_FRAMES as u64) as usize);
        }
        Ok(JournalRead::Frame)
    }

    /// The checked frames in memory from `seq` to the end of the block,
    /// each 8 words: the tag, then the 7 body words (use `&f[1..]`). Empty
    /// unless [`load`](Self::load)`(seq)` said `Frame`.
    #[inline]
    pub fn buffered(&self, seq: u64) -> &[[u64; 8]] {
        if seq < self.buf_first || seq >= self.buf_first + self.buf_frames {
            return &[];
        }
        &self.buf[(seq - self.buf_first) as usize..self.buf_frames as usize]
    }

    /// Reads a block of up to `limit` frames starting at `seq` into the
    /// buffer.
    fn fill(&mut self, seq: u64, limit: usize) -> Result<JournalRead> {
        self.buf_frames = 0;
        let mut refreshed = false;
        loop {
            let i = self.segments.partition_point(|&f| f <= seq);
            if i == 0 {
                if let Some(&oldest) = self.segments.first() {
                    return Ok(JournalRead::Missing { to: oldest - 1 });
                }
                if refreshed {
                    return Ok(JournalRead::End);
                }
                self.refresh()?;
                refreshed = true;
                continue;
            }
            let first = self.segments[i - 1];
            if self.open.as_ref().is_none_or(|(f, _)| *f != first) {
                let path = self.segment_path(first);
                match File::open(&path) {
                    Ok(f) => self.open = Some((first, f)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && !refreshed => {
                        // Deleted by retention since we listed.
                        self.refresh()?;
                        refreshed = true;
                        continue;
                    }
                    Err(e) => return Err(Error::io("open journal segment", &path, e)),
                }
            }
            let Some((_, file)) = self.open.as_ref() else {
                return Ok(JournalRead::End);
            };
            let off = (seq - first) * FRAME_BYTES as u64;
            let got = read_at_most(file, &mut self.buf.bytes_mut()[..limit * FRAME_BYTES], off)
                .map_err(|e| Error::io("read journal segment", &self.segment_path(first), e))?;
            let frames = (got / FRAME_BYTES) as u64;
            // Every frame's check, in one tight loop over the block (the
            // CPU overlaps the frames' CRCs); the block ends at the first
            // bad one.
            if cfg!(target_endian = "big") {
                for w in self.buf[..frames as usize].as_flattened_mut() {
                    *w = u64::from_le(*w);
                }
            }
            let valid = self.buf[..frames as usize]
                .iter()
                .enumerate()
                .take_while(|(k, f)| frame_ok(seq + *k as u64, f))
                .count() as u64;
            if valid > 0 {
                self.buf_first = seq;
                self.buf_frames = valid;
                return Ok(JournalRead::Frame);
            }
            if frames > 0 {
                if self.segments.get(i).is_none() {
                    // The newest segment's tail: being written, or torn by
                    // a crash the writer has not yet cut.
                    return Ok(JournalRead::End);
                }
                return Err(Error::Corrupt {
                    path: self.segment_path(first),
                    what: format!("journal frame of sequence {seq} fails its check"),
                });
            }
            // Past this segment's end: a later segment, or nothing yet.
            if let Some(&next) = self.segments.get(i) {
                return Ok(JournalRead::Missing { to: next - 1 });
            }
            if refreshed {
                return Ok(JournalRead::End);
            }
            self.refresh()?;
            refreshed = true;
        }
    }

    /// The first sequence whose event time is at or after `t_ns` (in
    /// sequence order), or `None` when every journaled event is older.
    /// Uses each segment's time index, then reads at most one block.
    ///
    /// # Errors
    /// I/O errors; corruption as in [`read`](Self::read).
    pub fn seek_time(&mut self, t_ns: u64) -> Result<Option<u64>> {
        self.refresh()?;
        let mut body = [0u64; BODY_WORDS];
        for si in 0..self.segments.len() {
            let first = self.segments[si];
            let maxima = read_index(&self.dir.join(index_name(first)));
            // The first indexed block whose running max reaches t.
            let block = maxima.partition_point(|&m| m < t_ns) as u64;
            if block == maxima.len() as u64 && si + 1 < self.segments.len() {
                // Every indexed block is older; the unindexed tail of a
                // closed segment is at most one block: look there below.
                let tail_from = first + block * INDEX_EVERY;
                if tail_from >= self.segments[si + 1] {
                    continue;
                }
            }
            let mut seq = first + block * INDEX_EVERY;
            let end = self.segments.get(si + 1).copied().unwrap_or(u64::MAX);
            while seq < end {
                match self.read(seq, &mut body)? {
                    JournalRead::Frame => {
                        if frame_time(&body) >= t_ns {
                            return Ok(Some(seq));
                        }
                        seq += 1;
                    }
                    JournalRead::End | JournalRead::Missing { .. } => break,
                }
            }
        }
        Ok(None)
    }
}

/// Whether a frame read as words (tag, body) is intact and of `seq`.
#[inline]
fn frame_ok(seq: u64, f: &[u64; 8]) -> bool {
    let (tag, body) = (f[0], &f[1..]);
    let Ok(body) = <&[u64; BODY_WORDS]>::try_from(body) else {
        return false;
    };
    tag & 0xffff_ffff == seq & 0xffff_ffff && (tag >> 32) as u32 == crc_of(seq, body)
}

/// Reads into a slice of words as bytes (`pread`, below).
trait AsBytesMut {
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl AsBytesMut for Vec<[u64; 8]> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len() * FRAME_BYTES;
        // SAFETY: the words are plain integers with no padding or invalid
        // bit patterns; the byte view covers exactly their memory and
        // borrows `self` mutably for as long as it lives.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// `pread` until `buf` is full or the file ends; returns the bytes read.
fn read_at_most(f: &File, buf: &mut [u8], mut off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                off += k as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A segment's time index: the running max of event times at the end of
/// each complete block of [`INDEX_EVERY`] frames. Missing or short is
/// fine: readers then scan frames.
pub fn read_index(path: &Path) -> Vec<u64> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameBody;
    use std::io::Write as _;

    fn body(i: u64) -> [u64; BODY_WORDS] {
        FrameBody::trade(7, 1_000 + i * 10, 100 + i as i64, 1).to_words()
    }

    fn write_segment(dir: &Path, first: u64, n: u64) {
        let mut f = File::create(dir.join(segment_name(first))).expect("create");
        let mut idx = Vec::new();
        let mut max = 0;
        let mut frame = [0u8; FRAME_BYTES];
        for i in 0..n {
            let b = body(first + i);
            max = max.max(frame_time(&b));
            encode_frame(first + i, &b, &mut frame);
            f.write_all(&frame).expect("write");
            if (i + 1) % INDEX_EVERY == 0 {
                idx.extend_from_slice(&max.to_le_bytes());
            }
        }
        std::fs::write(dir.join(index_name(first)), idx).expect("index");
    }

    #[test]
    fn partition_dirs_are_the_topic_partition_directories_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in [
            "md~eq.0",
            "md~eq.1",
            "md~eq.0.replaced-1700000000",
            "bars",
            "other.7",
            "x.y",
        ] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        std::fs::write(dir.path().join(".lock"), b"").expect("lock");
        std::fs::write(dir.path().join("file.3"), b"").expect("file");
        let got: Vec<(String, u32)> = partition_dirs(dir.path())
            .into_iter()
            .map(|(t, p, _)| (t, p))
            .collect();
        assert_eq!(
            got,
            vec![
                ("md~eq".into(), 0),
                ("md~eq".into(), 1),
                ("other".into(), 7)
            ]
        );
        assert!(partition_dirs(&dir.path().join("none")).is_empty());
    }

    #[test]
    fn the_crc_instruction_and_the_portable_crc_agree() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..10_000 {
            let mut w = [0u64; BODY_WORDS];
            for v in &mut w {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *v = x;
            }
            assert_eq!(crc_of(x, &w), crc_soft(x, &w));
        }
        // The standard check value of CRC-32C over "123456789".
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn a_frame_round_trips_and_any_flipped_bit_or_other_sequence_fails() {
        let b = body(3);
        let mut f = [0u8; FRAME_BYTES];
        encode_frame(1 << 40 | 3, &b, &mut f);
        let mut out = [0u64; BODY_WORDS];
        assert!(decode_frame(1 << 40 | 3, &f, &mut out));
        assert_eq!(out, b);
        assert!(
            !decode_frame(3, &f, &mut out),
            "high bits of the sequence are checked"
        );
        for bit in 0..FRAME_BYTES * 8 {
            let mut g = f;
            g[bit / 8] ^= 1 << (bit % 8);
            assert!(!decode_frame(1 << 40 | 3, &g, &mut out), "bit {bit}");
        }
        assert!(!decode_frame(1 << 40 | 3, &[0u8; FRAME_BYTES], &mut out));
    }

    #[test]
    fn reads_across_segments_report_what_retention_removed_and_stop_at_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_segment(dir.path(), 1, 3000);
        write_segment(dir.path(), 3001, 500);
        let mut r = JournalReader::open(dir.path()).expect("open").expect("dir");
        let mut out = [0u64; BODY_WORDS];
        for seq in 1..=3500 {
            assert_eq!(r.read(seq, &mut out).expect("read"), JournalRead::Frame);
            assert_eq!(out, body(seq));
        }
        assert_eq!(r.read(3501, &mut out).expect("read"), JournalRead::End);
        std::fs::remove_file(dir.path().join(segment_name(1))).expect("rm");
        r.refresh().expect("refresh");
        assert_eq!(
            r.read(5, &mut out).expect("read"),
            JournalRead::Missing { to: 3000 }
        );
        assert_eq!(r.oldest(), Some(3001));
    }

    #[test]
    fn a_gap_between_segments_is_reported_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_segment(dir.path(), 1, 10);
        write_segment(dir.path(), 100, 10);
        let mut r = JournalReader::open(dir.path()).expect("open").expect("dir");
        let mut out = [0u64; BODY_WORDS];
        assert_eq!(r.read(10, &mut out).expect("read"), JournalRead::Frame);
        assert_eq!(
            r.read(11, &mut out).expect("read"),
            JournalRead::Missing { to: 99 }
        );
        assert_eq!(r.read(100, &mut out).expect("read"), JournalRead::Frame);
    }

    #[test]
    fn a_torn_tail_is_found_by_the_scan_and_is_the_end_for_a_reader() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_segment(dir.path(), 1, 100);
        let path = dir.path().join(segment_name(1));
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        // Half a frame, then a zero page (a power loss), after frame 100.
        f.write_all(&[0xAB; 32]).expect("write");
        f.write_all(&[0u8; 4096]).expect("write");
        drop(f);
        let s = scan_segment(&path, 1).expect("scan");
        assert_eq!(s.frames, 100);
        assert_eq!(s.torn_bytes, 32 + 4096);
        let mut r = JournalReader::open(dir.path()).expect("open").expect("dir");
        let mut out = [0u64; BODY_WORDS];
        assert_eq!(r.read(100, &mut out).expect("read"), JournalRead::Frame);
        assert_eq!(r.read(101, &mut out).expect("read"), JournalRead::End);
    }

    #[test]
    fn a_bad_frame_in_an_older_segment_is_corruption_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_segment(dir.path(), 1, 10);
        write_segment(dir.path(), 11, 10);
        let path = dir.path().join(segment_name(1));
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[5 * FRAME_BYTES + 20] ^= 0x40;
        std::fs::write(&path, bytes).expect("write");
        let mut r = JournalReader::open(dir.path()).expect("open").expect("dir");
        let mut out = [0u64; BODY_WORDS];
        let e = r.read(6, &mut out).expect_err("corrupt");
        let msg = e.to_string();
        assert!(
            msg.contains("00000000000000000001.seg") && msg.contains("sequence 6"),
            "{msg}"
        );
    }

    #[test]
    fn a_time_seek_lands_on_the_first_event_at_or_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_segment(dir.path(), 1, 5000);
        write_segment(dir.path(), 5001, 2500);
        let mut r = JournalReader::open(dir.path()).expect("open").expect("dir");
        // body(i) has ts_event 1000 + 10 i.
        assert_eq!(r.seek_time(0).expect("seek"), Some(1));
        assert_eq!(r.seek_time(1_010).expect("seek"), Some(1));
        assert_eq!(r.seek_time(1_011).expect("seek"), Some(2));
        assert_eq!(r.seek_time(1_000 + 10 * 4321).expect("seek"), Some(4321));
        assert_eq!(
            r.seek_time(1_000 + 10 * 6000 - 5).expect("seek"),
            Some(6000)
        );
        assert_eq!(r.seek_time(1_000 + 10 * 7500).expect("seek"), Some(7500));
        assert_eq!(r.seek_time(1_000 + 10 * 7500 + 1).expect("seek"), None);
    }

    #[test]
    fn epochs_map_sequences_to_their_writer() {
        let e = [(1, 1), (500, 2), (900, 5)];
        assert_eq!(epoch_of(&e, 0), None);
        assert_eq!(epoch_of(&e, 1), Some(1));
        assert_eq!(epoch_of(&e, 499), Some(1));
        assert_eq!(epoch_of(&e, 500), Some(2));
        assert_eq!(epoch_of(&e, 10_000), Some(5));
    }
}

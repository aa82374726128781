//! Ring files: creating, re-opening, validating and mapping them, and the
//! locks that make one writer and liveness-tracked readers.
//!
//! Files live under a node directory, by default `/dev/shm/tickwire/<node-id>/`:
//! `<topic, '/' as '~'>.<partition>.ring` and one `symbology` file.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::futex::realtime_ns;
use crate::layout::{
    ENDIAN_MARKER, HEADER_SIZE, LIVENESS_LOCK_BASE, MAX_CAPACITY, MIN_CAPACITY, READER_SLOTS,
    RING_MAGIC, RING_MAJOR, RING_MINOR, RingHeader, Slot, StaticBlock, topic_hash, valid_slot_size,
};
use crate::ring::{Clock, Liveness, RingRef};

/// Default root for node directories.
pub const DEFAULT_SHM_ROOT: &str = "/dev/shm/tickwire";

/// The file name of a topic partition's ring inside a node directory.
pub fn ring_file_name(topic: &str, partition: u32) -> String {
    format!("{}.{partition}.ring", topic.replace('/', "~"))
}

/// Checks a topic name: 1..=200 bytes of `[A-Za-z0-9._-/]`, no `..`, not
/// starting with `/`.
pub fn validate_topic(topic: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::Invalid {
            what: "topic name",
            why: format!("{topic:?}: {why}"),
        })
    };
    if topic.is_empty() || topic.len() > 200 {
        return bad("must be 1 to 200 bytes");
    }
    if topic.starts_with('/') || topic.contains("..") || topic.contains('~') {
        return bad("must not start with '/' or contain '..' or '~'");
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
    {
        return bad("only letters, digits, '.', '_', '-' and '/' are allowed");
    }
    Ok(())
}

/// What a writer asks for when it creates or re-opens a ring.
#[derive(Debug, Clone)]
pub struct RingParams {
    /// Topic name.
    pub topic: String,
    /// This partition.
    pub partition: u32,
    /// The topic's partition count.
    pub partitions: u32,
    /// Slots, a power of two.
    pub capacity: u64,
    /// Bytes per slot (64 for ticks).
    pub slot_size: u32,
}

/// A mapped ring file. The writer maps it read-write; a reader maps the
/// header read-write (its reader slot) and the slots read-only.
pub struct RingFile {
    path: PathBuf,
    file: File,
    header: MmapRaw,
    slots: MmapRaw,
    statics: StaticBlock,
}

// SAFETY: the mappings are plain shared memory accessed only through atomics
// (and the immutable static block); the handles may move between threads.
unsafe impl Send for RingFile {}
// SAFETY: see above; all shared access is atomic.
unsafe impl Sync for RingFile {}

impl RingFile {
    /// Creates the ring if it does not exist, or re-opens it (never
    /// truncating or recreating it), and takes the writer lock.
    ///
    /// # Errors
    /// [`Error::WriterLocked`] if another writer holds it; [`Error::Mismatch`]
    /// if it exists with another partition count, capacity or slot size;
    /// any validation error of [`RingFile::open_reader`].
    pub fn open_writer(dir: &Path, params: &RingParams) -> Result<RingFile> {
        validate_topic(&params.topic)?;
        validate_capacity(params.capacity, "capacity")?;
        if !valid_slot_size(params.slot_size) {
            return Err(Error::Invalid {
                what: "slot size",
                why: format!("{} is not a multiple of 64 in 64..=4096", params.slot_size),
            });
        }
        if params.partition >= params.partitions {
            return Err(Error::Invalid {
                what: "partition",
                why: format!(
                    "{} is not below the partition count {}",
                    params.partition, params.partitions
                ),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        let path = dir.join(ring_file_name(&params.topic, params.partition));
        if !path.exists() {
            create_ring_file(&path, params)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        lock_exclusive(&file, &path)?;
        let statics = validate(&file, &path)?;
        let check = |what, on_disk: u64, requested: u64| {
            if on_disk != requested {
                Err(Error::Mismatch {
                    path: path.clone(),
                    what,
                    on_disk,
                    requested,
                })
            } else {
                Ok(())
            }
        };
        check(
            "partition count",
            statics.partitions as u64,
            params.partitions as u64,
        )?;
        check(
            "partition",
            statics.partition as u64,
            params.partition as u64,
        )?;
        check("capacity", statics.capacity, params.capacity)?;
        check(
            "slot size",
            statics.slot_size as u64,
            params.slot_size as u64,
        )?;
        check("topic hash", statics.topic_hash, topic_hash(&params.topic))?;
        let (header, slots) = map(&file, &path, &statics, true)?;
        let rf = RingFile {
            path,
            file,
            header,
            slots,
            statics,
        };
        rf.header().writer.writer_pid.store(
            std::process::id() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(rf)
    }

    /// Opens an existing ring as a reader and validates it.
    ///
    /// # Errors
    /// I/O errors, and a clear error for a wrong magic, an unknown major
    /// version, another byte order, impossible sizes or a short file.
    pub fn open_reader(path: &Path) -> Result<RingFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        let statics = validate(&file, path)?;
        let (header, slots) = map(&file, path, &statics, false)?;
        Ok(RingFile {
            path: path.to_path_buf(),
            file,
            header,
            slots,
            statics,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The static header fields.
    pub fn statics(&self) -> &StaticBlock {
        &self.statics
    }

    /// The mapped header.
    pub fn header(&self) -> &RingHeader {
        // SAFETY: the header mapping is HEADER_SIZE >= size_of::<RingHeader>()
        // bytes, page-aligned, and `RingHeader` is `ShmSafe` (valid for any
        // bytes, only mutated through atomics).
        unsafe { &*(self.header.as_ptr() as *const RingHeader) }
    }

    /// The ring, for the protocol in [`crate::ring`].
    pub fn ring(&self) -> RingRef<'_> {
        let h = self.header();
        // SAFETY: the slot mapping is `capacity * 64` bytes (validated
        // against the file length), page-aligned, and `Slot` is `ShmSafe`.
        let slots = unsafe {
            std::slice::from_raw_parts(
                self.slots.as_ptr() as *const Slot,
                self.statics.capacity as usize,
            )
        };
        RingRef::new(&h.writer, &h.waiter, &h.registry, &h.readers, slots)
    }

    /// A liveness-lock handle on this file's descriptor.
    pub fn liveness(&self) -> FileLiveness {
        FileLiveness {
            fd: self.file.as_raw_fd(),
        }
    }
}

fn validate_capacity(capacity: u64, field: &'static str) -> Result<()> {
    if !capacity.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
        return Err(Error::Invalid {
            what: field,
            why: format!("{capacity} is not a power of two in {MIN_CAPACITY}..={MAX_CAPACITY}"),
        });
    }
    Ok(())
}

fn create_ring_file(path: &Path, params: &RingParams) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io("create", &tmp, e))?;
    let len = HEADER_SIZE as u64 + params.capacity * params.slot_size as u64;
    file.set_len(len).map_err(|e| Error::io("size", &tmp, e))?;
    let statics = StaticBlock {
        magic: RING_MAGIC,
        major: RING_MAJOR,
        minor: RING_MINOR,
        header_size: HEADER_SIZE as u32,
        slot_size: params.slot_size,
        endian: ENDIAN_MARKER,
        capacity: params.capacity,
        partition: params.partition,
        partitions: params.partitions,
        topic_hash: topic_hash(&params.topic),
        reader_slots: READER_SLOTS as u32,
        reserved0: 0,
        created_ns: realtime_ns(),
        reserved: [0; 8],
    };
    // SAFETY: `StaticBlock` is `#[repr(C)]` integers that fill its 128 bytes
    // exactly (const-asserted: no padding), so every byte is initialised.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            &statics as *const StaticBlock as *const u8,
            std::mem::size_of::<StaticBlock>(),
        )
    };
    std::os::unix::fs::FileExt::write_all_at(&file, bytes, 0)
        .map_err(|e| Error::io("write header", &tmp, e))?;
    drop(file);
    // Appear atomically, and never replace a ring another process created
    // meanwhile.
    let from =
        std::ffi::CString::new(tmp.as_os_str().as_encoded_bytes()).map_err(|_| Error::Invalid {
            what: "path",
            why: "contains NUL".into(),
        })?;
    let to = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        Error::Invalid {
            what: "path",
            why: "contains NUL".into(),
        }
    })?;
    // SAFETY: both are valid NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(&tmp);
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(Error::io("rename into place", path, err));
        }
    }
    Ok(())
}

/// Takes the exclusive writer lock (`flock`, non-blocking) on a file.
pub(crate) fn lock_exclusive(file: &File, path: &Path) -> Result<()> {
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Error::WriterLocked {
                path: path.to_path_buf(),
            }
        } else {
            Error::io("lock", path, err)
        });
    }
    Ok(())
}

/// The file's length, or [`Error::Short`] if below `need`.
pub(crate) fn len_at_least(file: &File, path: &Path, need: u64) -> Result<u64> {
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    if len < need {
        return Err(Error::Short {
            path: path.to_path_buf(),
            len,
            need,
        });
    }
    Ok(len)
}

fn validate(file: &File, path: &Path) -> Result<StaticBlock> {
    let len = len_at_least(file, path, HEADER_SIZE as u64)?;
    let mut buf = [0u8; std::mem::size_of::<StaticBlock>()];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, 0)
        .map_err(|e| Error::io("read header", path, e))?;
    // SAFETY: `StaticBlock` is plain integers: any bytes are a valid value;
    // read_unaligned copes with the buffer's alignment.
    let s: StaticBlock = unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const StaticBlock) };
    let bad = |field, value: u64, expected: String| {
        Err(Error::BadHeader {
            path: path.to_path_buf(),
            field,
            value,
            expected,
        })
    };
    if s.magic != RING_MAGIC {
        return Err(Error::BadMagic {
            path: path.to_path_buf(),
            what: "ring",
            found: s.magic,
            expected: RING_MAGIC,
        });
    }
    if s.endian != ENDIAN_MARKER {
        return bad(
            "endian",
            s.endian as u64,
            format!("{ENDIAN_MARKER:#x}: the ring was written on a machine of another byte order"),
        );
    }
    if s.major != RING_MAJOR {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
            found_major: s.major,
            found_minor: s.minor,
            known_major: RING_MAJOR,
            known_minor: RING_MINOR,
        });
    }
    if s.header_size as usize != HEADER_SIZE {
        return bad(
            "header_size",
            s.header_size as u64,
            format!("{HEADER_SIZE} for layout {RING_MAJOR}.x"),
        );
    }
    if !valid_slot_size(s.slot_size) {
        return bad(
            "slot_size",
            s.slot_size as u64,
            "a multiple of 64 in 64..=4096".into(),
        );
    }
    if !s.capacity.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&s.capacity) {
        return bad(
            "capacity",
            s.capacity,
            format!("a power of two in {MIN_CAPACITY}..={MAX_CAPACITY}"),
        );
    }
    if s.reader_slots as usize != READER_SLOTS {
        return bad(
            "reader_slots",
            s.reader_slots as u64,
            format!("{READER_SLOTS}"),
        );
    }
    if s.partitions == 0 || s.partition >= s.partitions {
        return bad(
            "partition",
            s.partition as u64,
            format!("below the partition count {}", s.partitions),
        );
    }
    let need = HEADER_SIZE as u64 + s.capacity * s.slot_size as u64;
    if len < need {
        return Err(Error::Short {
            path: path.to_path_buf(),
            len,
            need,
        });
    }
    Ok(s)
}

fn map(file: &File, path: &Path, s: &StaticBlock, writer: bool) -> Result<(MmapRaw, MmapRaw)> {
    let header = MmapOptions::new()
        .len(HEADER_SIZE)
        .map_raw(file)
        .map_err(|e| Error::io("map header", path, e))?;
    let opts = {
        let mut o = MmapOptions::new();
        o.offset(HEADER_SIZE as u64)
            .len((s.capacity * s.slot_size as u64) as usize);
        o
    };
    let slots = if writer {
        opts.map_raw(file)
    } else {
        opts.map_raw_read_only(file)
    }
    .map_err(|e| Error::io("map slots", path, e))?;
    Ok((header, slots))
}

/// Liveness locks: OFD write locks on byte `LIVENESS_LOCK_BASE + index`.
/// The kernel drops them when the owning open file description closes, which
/// includes the process dying.
#[derive(Clone, Copy, Debug)]
pub struct FileLiveness {
    fd: RawFd,
}

impl FileLiveness {
    fn fcntl(&self, index: usize, kind: i32) -> bool {
        let mut fl: libc::flock = {
            // SAFETY: `flock` is plain integers; all-zero is a valid value.
            unsafe { std::mem::zeroed() }
        };
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = (LIVENESS_LOCK_BASE + index as u64) as libc::off_t;
        fl.l_len = 1;
        // SAFETY: F_OFD_SETLK with a valid flock struct on our descriptor.
        unsafe { libc::fcntl(self.fd, libc::F_OFD_SETLK, &mut fl) == 0 }
    }
}

impl Liveness for FileLiveness {
    fn try_lock(&self, index: usize) -> bool {
        self.fcntl(index, libc::F_WRLCK)
    }

    fn unlock(&self, index: usize) {
        self.fcntl(index, libc::F_UNLCK);
    }
}

/// CLOCK_MONOTONIC, for tether budgets.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    #[inline]
    fn now_ns(&self) -> u64 {
        crate::futex::monotonic_ns()
    }
}

/// A ring's files inside a node directory for a topic: every partition path.
pub fn partition_paths(dir: &Path, topic: &str, partitions: u32) -> Vec<PathBuf> {
    (0..partitions)
        .map(|p| dir.join(ring_file_name(topic, p)))
        .collect()
}

/// A ring opened for writing together with its protocol state: what a
/// broker shard owns for each partition.
pub struct PartitionWriter {
    // Field order matters: `core` borrows `file`'s mapping and is dropped
    // before it.
    core: crate::ring::WriterCore<'static, FileLiveness, MonotonicClock>,
    file: RingFile,
}

impl PartitionWriter {
    /// Creates or re-opens the ring (see [`RingFile::open_writer`]) and
    /// recovers its sequence: the epoch is bumped and sequences continue
    /// after the last committed stamp.
    ///
    /// # Errors
    /// As [`RingFile::open_writer`].
    pub fn open(dir: &Path, params: &RingParams) -> Result<PartitionWriter> {
        let file = RingFile::open_writer(dir, params)?;
        // SAFETY: the ring references point into `file`'s mappings, which stay
        // at fixed addresses until `file` drops; `core` is dropped first
        // (field order) and the 'static lifetime never leaves this type.
        let ring = unsafe { std::mem::transmute::<RingRef<'_>, RingRef<'static>>(file.ring()) };
        let core = crate::ring::WriterCore::recover(ring, file.liveness(), MonotonicClock);
        Ok(PartitionWriter { core, file })
    }

    /// Writes and commits one frame body; returns its sequence.
    #[inline]
    pub fn publish(&mut self, body: &[u64; crate::frame::BODY_WORDS]) -> u64 {
        self.core.publish(body)
    }

    /// Whether the next publish may wait for a tethered reader (see
    /// [`WriterCore::at_gate`](crate::ring::WriterCore::at_gate)).
    #[inline]
    pub fn at_gate(&self) -> bool {
        self.core.at_gate()
    }

    /// Ends a batch (publishes the sequence, wakes waiters).
    #[inline]
    pub fn flush(&mut self) -> u64 {
        self.core.flush()
    }

    /// Reclaims reader slots of dead processes.
    pub fn reclaim_dead(&mut self) -> usize {
        self.core.reclaim_dead()
    }

    /// The protocol state.
    pub fn core(&self) -> &crate::ring::WriterCore<'static, FileLiveness, MonotonicClock> {
        &self.core
    }

    /// The file.
    pub fn file(&self) -> &RingFile {
        &self.file
    }

    /// Reader slots currently owned (live or not yet reclaimed).
    pub fn live_readers(&self) -> u32 {
        self.file
            .header()
            .readers
            .iter()
            .filter(|r| {
                crate::layout::unpack_state(r.state_gen.load(std::sync::atomic::Ordering::Acquire))
                    .1
                    != crate::layout::STATE_FREE
            })
            .count() as u32
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.core.ring().epoch()
    }
}

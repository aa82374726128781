//! Ring files: creating, re-opening, validating and mapping them, and the
//! locks that make one writer and liveness-tracked readers (the layout is
//! drawn in [`crate::layout`]).
//!
//! Files live under a node directory, by default `/dev/shm/tickwire/<node-id>/`:
//! `<topic, '/' as '~'>.<partition>.ring` (data), `<..>.<partition>.readers`
//! (reader state) and one `symbology` file.
//!
//! - [`PartitionWriter`] owns a ring opened for writing and the writer's
//!   protocol state; [`PartitionReader`] owns a ring opened for reading and
//!   one reader's cursor and reader slot. Every view either hands out
//!   borrows from it, so no safe code can keep a reference to a mapping
//!   after it is unmapped.
//! - A reader maps the data file read-only: nothing a reader does can change
//!   the header or a slot. It writes only the reader-state file. A reader
//!   without write access to that file reads untethered, takes no reader
//!   slot and cannot block on the futex (it polls).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::futex::realtime_ns;
use crate::layout::{
    ENDIAN_MARKER, HEADER_SIZE, LIVENESS_LOCK_BASE, MAX_CAPACITY, MIN_CAPACITY, READER_SLOTS,
    READERS_FILE_SIZE, READERS_MAGIC, RING_MAGIC, RING_MAJOR, RING_MINOR, ReadersHeader,
    ReadersStatic, RingHeader, Slot, StaticBlock, StaticHeader, WRITER_CLOSED, topic_hash,
    valid_slot_size,
};
use crate::ring::{Clock, Liveness, Read, ReaderCore, ReaderRegistration, RingRef, Tether};
use crate::shm::Region;

/// Default root for node directories.
pub const DEFAULT_SHM_ROOT: &str = "/dev/shm/tickwire";

/// The data file name of a topic partition's ring inside a node directory:
/// the topic with `/` replaced by `~`, then `.<partition>.ring`.
pub fn ring_file_name(topic: &str, partition: u32) -> String {
    format!("{}.{partition}.ring", topic.replace('/', "~"))
}

/// The reader-state file that goes with a data file: `.ring` -> `.readers`.
pub fn readers_path(ring_path: &Path) -> PathBuf {
    ring_path.with_extension("readers")
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

/// Permissions of the files a writer creates (applied when it creates
/// them; an existing file keeps its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileModes {
    /// Data files (`.ring`, `symbology`): readers need read access.
    pub data: u32,
    /// Reader-state files (`.readers`): readers need read and write access.
    pub readers: u32,
    /// Group id to give the files (`None`: the writer's own group).
    pub group: Option<u32>,
}

impl Default for FileModes {
    fn default() -> Self {
        FileModes {
            data: 0o640,
            readers: 0o660,
            group: None,
        }
    }
}

/// What a writer asks for when it creates or re-opens a ring.
#[derive(Debug, Clone)]
pub struct RingParams {
    /// Topic name.
    pub topic: String,
    /// This partition.
    pub partition: u32,
    /// The topic's partition count (a ring created when the topic had
    /// fewer partitions is opened as it is: partitions can grow).
    pub partitions: u32,
    /// Slots, a power of two.
    pub capacity: u64,
    /// Bytes per slot (64 for ticks).
    pub slot_size: u32,
    /// Modes and group of files it creates.
    pub modes: FileModes,
}

impl RingParams {
    /// Bytes the ring's two files take.
    pub fn file_bytes(&self) -> u64 {
        HEADER_SIZE as u64
            + self.capacity.saturating_mul(self.slot_size as u64)
            + READERS_FILE_SIZE as u64
    }
}

/// The device and inode of a file: tells a replaced file from the one mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
}

impl Identity {
    fn of(file: &File, path: &Path) -> Result<Identity> {
        let m = file.metadata().map_err(|e| Error::io("stat", path, e))?;
        Ok(Identity {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Whether the ring at a path is still the one that was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileStatus {
    /// The same file is at the path.
    Same,
    /// Nothing is at the path any more (the topic or node directory was removed).
    Removed,
    /// Another file is at the path (the ring was deleted and created anew).
    Replaced,
}

/// A mapped ring: its data file (the writer maps it read-write, a reader
/// read-only) and its reader-state file.
pub struct RingFile {
    path: PathBuf,
    file: File,
    data: MmapRaw,
    readers_file: Option<File>,
    readers: ReadersMemory,
    statics: StaticBlock,
    identity: Identity,
    writable: bool,
}

/// Where the reader state lives: the mapped `.readers` file, or (for a
/// reader without write access to it) private memory nobody else sees.
enum ReadersMemory {
    Mapped(MmapRaw),
    Private(Box<ReadersHeader>),
}

impl RingFile {
    /// Creates the ring if it does not exist, or re-opens it (never
    /// truncating or recreating it), and takes the writer lock. Returns the
    /// file and whether it was created now.
    ///
    /// # Errors
    /// [`Error::WriterLocked`] if another writer holds it; [`Error::Mismatch`]
    /// if it exists with a larger partition count (a topic grows, never
    /// shrinks), another capacity or slot size;
    /// [`Error::NoSpace`] if the file system cannot hold it; any validation
    /// error of [`RingFile::open_reader`].
    pub fn open_writer(dir: &Path, params: &RingParams) -> Result<(RingFile, bool)> {
        RingFile::open_writer_at(dir, params, 1)
    }

    /// [`open_writer`](Self::open_writer); a ring created now starts at
    /// sequence `first_seq` (see [`StaticBlock::first_seq`]); an existing
    /// one goes on where it is.
    ///
    /// # Errors
    /// As [`open_writer`](Self::open_writer).
    pub fn open_writer_at(
        dir: &Path,
        params: &RingParams,
        first_seq: u64,
    ) -> Result<(RingFile, bool)> {
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
        let created = !path.exists() && create_ring_file(&path, params, first_seq)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        lock_writer(&file, &path)?;
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
        // A topic's partitions may grow, never shrink: a ring created when
        // the topic had fewer partitions keeps that count in its statics.
        if statics.partitions > params.partitions {
            check(
                "partition count",
                statics.partitions as u64,
                params.partitions as u64,
            )?;
        }
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
        let data = MmapOptions::new()
            .len(data_len(&statics))
            .map_raw(&file)
            .map_err(|e| Error::io("map", &path, e))?;
        // Only the writer (holding the lock) creates or replaces the
        // reader-state file, so two creators never fight over it.
        let rpath = readers_path(&path);
        let readers_file = match open_readers(&rpath, &statics, true) {
            Ok(f) => f,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                create_readers_file(&rpath, &statics, params.modes)?
            }
            Err(e @ Error::Io { .. }) => return Err(e),
            // Left from another ring, or damaged: reader state is only
            // liveness and cursors, so a fresh file loses nothing.
            Err(_) => create_readers_file(&rpath, &statics, params.modes)?,
        };
        let readers = map_readers(&readers_file, &rpath, true)?;
        let identity = Identity::of(&file, &path)?;
        let rf = RingFile {
            path,
            file,
            data,
            readers_file: Some(readers_file),
            readers: ReadersMemory::Mapped(readers),
            statics,
            identity,
            writable: true,
        };
        rf.header().writer.writer_pid.store(
            std::process::id() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok((rf, created))
    }

    /// Opens an existing ring as a reader and validates it: the data file
    /// read-only, the reader-state file read-write when this process may
    /// write it (else reader state is private and the reader cannot
    /// register; see [`RingFile::can_register`]).
    ///
    /// # Errors
    /// I/O errors (a permission error names the file, its mode and group),
    /// and a clear error for a wrong magic, an unknown major version,
    /// another byte order, impossible sizes, a short file, or a missing or
    /// mismatched reader-state file.
    pub fn open_reader(path: &Path) -> Result<RingFile> {
        let file = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        let statics = validate(&file, path)?;
        let data = MmapOptions::new()
            .len(data_len(&statics))
            .map_raw_read_only(&file)
            .map_err(|e| Error::io("map", path, e))?;
        let rpath = readers_path(path);
        // A writer creating the ring renames the data file into place
        // first and creates the reader-state file just after: a reader that
        // comes in between waits for it, briefly.
        let mut tries = 0;
        while !rpath.exists() && tries < 100 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            tries += 1;
        }
        let (readers_file, readers) = match open_readers(&rpath, &statics, true) {
            Ok(f) => {
                let m = map_readers(&f, &rpath, true)?;
                (Some(f), ReadersMemory::Mapped(m))
            }
            Err(Error::Permission { .. }) => {
                // No write access: validate it is readable and matching,
                // then keep reader state private.
                open_readers(&rpath, &statics, false)?;
                (None, ReadersMemory::Private(Box::new(zeroed_readers())))
            }
            Err(e) => return Err(e),
        };
        let identity = Identity::of(&file, path)?;
        Ok(RingFile {
            path: path.to_path_buf(),
            file,
            data,
            readers_file,
            readers,
            statics,
            identity,
            writable: false,
        })
    }

    /// The data file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The static header fields.
    pub fn statics(&self) -> &StaticBlock {
        &self.statics
    }

    /// The data file's header (read-only for readers: only atomics' loads
    /// are ever made through it outside the writer).
    pub fn header(&self) -> &RingHeader {
        match Region::of(&self.data).get::<RingHeader>(0) {
            Some(h) => h,
            // The mapping is data_len() >= HEADER_SIZE bytes, page-aligned.
            None => unreachable!("ring mapping smaller than its header"),
        }
    }

    fn readers_header(&self) -> &ReadersHeader {
        match &self.readers {
            ReadersMemory::Mapped(m) => match Region::of(m).get::<ReadersHeader>(0) {
                Some(h) => h,
                None => unreachable!("reader-state mapping smaller than its header"),
            },
            ReadersMemory::Private(b) => b,
        }
    }

    /// The ring, for the protocol in [`crate::ring`].
    pub fn ring(&self) -> RingRef<'_> {
        let h = self.header();
        let r = self.readers_header();
        let Some(slots) =
            Region::of(&self.data).slice::<Slot>(HEADER_SIZE, self.statics.capacity as usize)
        else {
            unreachable!("ring mapping shorter than its validated length")
        };
        let ring = RingRef::new(&h.writer, &r.waiter, &r.registry, &r.readers, slots)
            .starting_at(self.statics.first_seq);
        if self.writable {
            ring
        } else {
            ring.read_only()
        }
    }

    /// Whether this process may take a reader slot (it can write the
    /// reader-state file): needed for tethered reading and futex waits.
    pub fn can_register(&self) -> bool {
        self.readers_file.is_some()
    }

    /// A liveness-lock handle on the reader-state file.
    pub fn liveness(&self) -> FileLiveness {
        FileLiveness {
            fd: self.readers_file.as_ref().map_or(-1, |f| f.as_raw_fd()),
        }
    }

    /// Whether a process holds the writer lock now (a syscall: call it when
    /// idle, not per event).
    pub fn writer_alive(&self) -> bool {
        ofd_lock(
            self.file.as_raw_fd(),
            libc::F_OFD_GETLK,
            libc::F_RDLCK,
            WRITER_LOCK_BYTE,
        )
        .is_some_and(|t| t != libc::F_UNLCK)
    }

    /// Whether a process holds reader slot `index`'s liveness lock now: a
    /// reader that died (or closed) has none. A syscall: call it when idle.
    /// `false` when this process cannot open the reader-state file.
    pub fn reader_alive(&self, index: usize) -> bool {
        let Some(f) = &self.readers_file else {
            return false;
        };
        ofd_lock(
            f.as_raw_fd(),
            libc::F_OFD_GETLK,
            libc::F_WRLCK,
            LIVENESS_LOCK_BASE + index as u64,
        )
        .is_some_and(|t| t != libc::F_UNLCK)
    }

    /// Whether the writer closed the ring gracefully.
    pub fn writer_closed(&self) -> bool {
        self.ring().writer_state() == WRITER_CLOSED
    }

    /// Whether the path still names this file (a syscall: when idle).
    pub fn status(&self) -> FileStatus {
        match std::fs::metadata(&self.path) {
            Ok(m) if m.dev() == self.identity.dev && m.ino() == self.identity.ino => {
                FileStatus::Same
            }
            Ok(_) => FileStatus::Replaced,
            Err(_) => FileStatus::Removed,
        }
    }
}

fn zeroed_readers() -> ReadersHeader {
    // SAFETY: `ReadersHeader` is `ShmSafe`: integers and atomics of
    // integers, for which all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

fn data_len(s: &StaticBlock) -> usize {
    (HEADER_SIZE as u64 + s.capacity * s.slot_size as u64) as usize
}

/// The byte of the data file the writer's OFD lock covers.
const WRITER_LOCK_BYTE: u64 = 0;

/// One OFD lock call on one byte; for `F_OFD_GETLK` returns the type that
/// would block (`F_UNLCK` if none), else `Some(F_UNLCK)` on success.
fn ofd_lock(fd: RawFd, cmd: i32, kind: i32, byte: u64) -> Option<i32> {
    if fd < 0 {
        return None;
    }
    let mut fl: libc::flock = {
        // SAFETY: `flock` is plain integers; all-zero is a valid value.
        unsafe { std::mem::zeroed() }
    };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: an OFD lock command with a valid flock struct on a descriptor
    // we own.
    let rc = unsafe { libc::fcntl(fd, cmd, &mut fl) };
    if rc != 0 {
        return None;
    }
    Some(if cmd == libc::F_OFD_GETLK {
        fl.l_type as i32
    } else {
        libc::F_UNLCK
    })
}

/// Takes the ring's writer lock: an OFD write lock on byte 0 of the data
/// file (a reader can ask whether it is held without taking anything).
fn lock_writer(file: &File, path: &Path) -> Result<()> {
    retry_lock(
        path,
        || read_writer_pid(file),
        || {
            if ofd_lock(
                file.as_raw_fd(),
                libc::F_OFD_SETLK,
                libc::F_WRLCK,
                WRITER_LOCK_BYTE,
            )
            .is_some()
            {
                return Ok(true);
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
                _ => Err(err),
            }
        },
    )
}

/// How long a writer lock held by someone else is waited for before the
/// open is refused. A lock outlives its holder's `close` while a process
/// that forked in that moment still has a copy of the descriptor (until it
/// execs), or while a killed predecessor is being torn down; a real second
/// writer is refused after this.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs `try_lock` (Ok(true) taken, Ok(false) held by another) until it
/// takes the lock or [`LOCK_PATIENCE`] has passed.
fn retry_lock(
    path: &Path,
    pid: impl Fn() -> u64,
    mut try_lock: impl FnMut() -> std::io::Result<bool>,
) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        match try_lock() {
            Ok(true) => return Ok(()),
            Ok(false) if start.elapsed() < LOCK_PATIENCE => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Ok(false) => {
                return Err(Error::WriterLocked {
                    path: path.to_path_buf(),
                    pid: pid(),
                });
            }
            Err(e) => return Err(Error::io("lock", path, e)),
        }
    }
}

/// The pid the current writer recorded in the header (0 if unreadable).
fn read_writer_pid(file: &File) -> u64 {
    let mut b = [0u8; 8];
    match std::os::unix::fs::FileExt::read_exact_at(file, &mut b, 128 + 24) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => 0,
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

/// Creates a ring's data file under a temporary name, with its space
/// allocated up front (a tmpfs that cannot hold it fails here, with the
/// size, instead of a bus error later), and renames it into place unless
/// another process created it meanwhile. Returns whether it did.
fn create_ring_file(path: &Path, params: &RingParams, first_seq: u64) -> Result<bool> {
    let len = HEADER_SIZE as u64 + params.capacity * params.slot_size as u64;
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
        first_seq: first_seq.max(1),
        reserved: [0; 7],
    };
    create_file(
        path,
        len,
        statics.as_bytes(),
        params.modes.data,
        params.modes.group,
        false,
    )
}

/// Creates (or replaces) a ring's reader-state file, paired with the data
/// file by its `created_ns`.
fn create_readers_file(path: &Path, statics: &StaticBlock, modes: FileModes) -> Result<File> {
    let head = ReadersStatic {
        magic: READERS_MAGIC,
        major: RING_MAJOR,
        minor: RING_MINOR,
        reader_slots: READER_SLOTS as u32,
        endian: ENDIAN_MARKER,
        reserved0: 0,
        ring_created_ns: statics.created_ns,
        reserved: [0; 12],
    };
    create_file(
        path,
        READERS_FILE_SIZE as u64,
        head.as_bytes(),
        modes.readers,
        modes.group,
        true,
    )?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))
}

/// Writes `head` at the start of a new file of `len` bytes (allocated with
/// `posix_fallocate`), sets its mode and group, and renames it to `path`:
/// replacing what is there when `replace`, else only if nothing is (returns
/// `false` when another process created it first).
pub(crate) fn create_file(
    path: &Path,
    len: u64,
    head: &[u8],
    mode: u32,
    group: Option<u32>,
    replace: bool,
) -> Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!(
        "{}.tmp-{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io("create", &tmp, e))?;
    let cleanup = |e: Error| {
        let _ = std::fs::remove_file(&tmp);
        e
    };
    allocate(&file, &tmp, path, len).map_err(cleanup)?;
    std::os::unix::fs::FileExt::write_all_at(&file, head, 0)
        .map_err(|e| cleanup(Error::io("write header", &tmp, e)))?;
    if let Some(gid) = group {
        // SAFETY: fchown on a descriptor we own; -1 leaves the owner as is.
        if unsafe { libc::fchown(file.as_raw_fd(), u32::MAX, gid) } != 0 {
            return Err(cleanup(Error::io(
                "set group of",
                path,
                std::io::Error::last_os_error(),
            )));
        }
    }
    // Set explicitly: the umask must not narrow what readers need.
    // SAFETY: fchmod on a descriptor we own.
    if unsafe { libc::fchmod(file.as_raw_fd(), mode as libc::mode_t) } != 0 {
        return Err(cleanup(Error::io(
            "set mode of",
            path,
            std::io::Error::last_os_error(),
        )));
    }
    drop(file);
    if replace {
        std::fs::rename(&tmp, path)
            .map_err(|e| cleanup(Error::io("rename into place", path, e)))?;
        return Ok(true);
    }
    // Appear atomically, and never replace a file another process created
    // meanwhile.
    let cstr = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| Error::Invalid {
            what: "path",
            why: format!("{} contains NUL", p.display()),
        })
    };
    let (from, to) = (cstr(&tmp).map_err(cleanup)?, cstr(path).map_err(cleanup)?);
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
        return Ok(false);
    }
    Ok(true)
}

/// Allocates a file's blocks now: on tmpfs a sparse file that later cannot
/// be backed is a SIGBUS, not an error.
fn allocate(file: &File, tmp: &Path, path: &Path, len: u64) -> Result<()> {
    // SAFETY: posix_fallocate on a descriptor we own.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        libc::ENOSPC | libc::EFBIG => Err(Error::NoSpace {
            path: path.to_path_buf(),
            need: len,
        }),
        // A file system without fallocate: size it (sparse) instead.
        libc::EOPNOTSUPP | libc::EINVAL => file.set_len(len).map_err(|e| Error::io("size", tmp, e)),
        e => Err(Error::io(
            "allocate",
            tmp,
            std::io::Error::from_raw_os_error(e),
        )),
    }
}

/// Reads a static header block from the start of a file (not through a
/// mapping: it is validated before anything is mapped).
fn read_header<T: crate::layout::StaticHeader>(file: &File, path: &Path) -> Result<T> {
    let mut v = T::default();
    std::os::unix::fs::FileExt::read_exact_at(file, v.as_bytes_mut(), 0)
        .map_err(|e| Error::io("read header", path, e))?;
    Ok(v)
}

/// Opens and validates a reader-state file against its data file.
fn open_readers(path: &Path, statics: &StaticBlock, write: bool) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    len_at_least(&file, path, READERS_FILE_SIZE as u64)?;
    let h: ReadersStatic = read_header(&file, path)?;
    if h.magic != READERS_MAGIC {
        return Err(Error::BadMagic {
            path: path.to_path_buf(),
            what: "reader-state",
            found: h.magic,
            expected: READERS_MAGIC,
        });
    }
    if h.major != RING_MAJOR {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
            found_major: h.major,
            found_minor: h.minor,
            known_major: RING_MAJOR,
            known_minor: RING_MINOR,
        });
    }
    let bad = |field, value: u64, expected: String| Error::bad_header(path, field, value, expected);
    if h.endian != ENDIAN_MARKER {
        return bad("endian", h.endian as u64, format!("{ENDIAN_MARKER:#x}"));
    }
    if h.reader_slots as usize != READER_SLOTS {
        return bad(
            "reader_slots",
            h.reader_slots as u64,
            format!("{READER_SLOTS}"),
        );
    }
    if h.ring_created_ns != statics.created_ns {
        return bad(
            "ring_created_ns",
            h.ring_created_ns,
            format!(
                "{}, the data file's created_ns (this reader-state file belongs to another ring)",
                statics.created_ns
            ),
        );
    }
    Ok(file)
}

fn map_readers(file: &File, path: &Path, write: bool) -> Result<MmapRaw> {
    let o = {
        let mut o = MmapOptions::new();
        o.len(READERS_FILE_SIZE);
        o
    };
    if write {
        o.map_raw(file)
    } else {
        o.map_raw_read_only(file)
    }
    .map_err(|e| Error::io("map", path, e))
}

/// Takes the exclusive writer lock (`flock`, non-blocking) on a file.
pub(crate) fn lock_exclusive(file: &File, path: &Path, pid: impl Fn() -> u64) -> Result<()> {
    retry_lock(path, pid, || {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(false)
        } else {
            Err(err)
        }
    })
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
    let s: StaticBlock = read_header(file, path)?;
    let bad = |field, value: u64, expected: String| Error::bad_header(path, field, value, expected);
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
        return Err(Error::SlotsShort {
            path: path.to_path_buf(),
            len,
            need,
            capacity: s.capacity,
            slot_size: s.slot_size,
        });
    }
    Ok(s)
}

/// Liveness locks: OFD write locks on byte `LIVENESS_LOCK_BASE + index` of
/// the reader-state file. The kernel drops them when the owning open file
/// description closes, which includes the process dying.
#[derive(Clone, Copy, Debug)]
pub struct FileLiveness {
    fd: RawFd,
}

impl FileLiveness {
    fn fcntl(&self, index: usize, kind: i32) -> bool {
        ofd_lock(
            self.fd,
            libc::F_OFD_SETLK,
            kind,
            LIVENESS_LOCK_BASE + index as u64,
        )
        .is_some()
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

/// How many partitions a topic has in a node directory: the count partition
/// 0 was created with, or more when the topic grew since (a later
/// partition's ring exists, created with the larger count). `None` when
/// partition 0 has no ring.
///
/// # Errors
/// A ring that cannot be opened or validated.
pub fn topic_partitions(dir: &Path, topic: &str) -> Result<Option<u32>> {
    let first = dir.join(ring_file_name(topic, 0));
    if !first.exists() {
        return Ok(None);
    }
    let mut count = RingFile::open_reader(&first)?.statics().partitions;
    loop {
        let next = dir.join(ring_file_name(topic, count));
        if !next.exists() {
            return Ok(Some(count));
        }
        let grown = RingFile::open_reader(&next)?.statics().partitions;
        if grown <= count {
            return Ok(Some(count));
        }
        count = grown;
    }
}

/// A ring's files inside a node directory for a topic: every partition path.
pub fn partition_paths(dir: &Path, topic: &str, partitions: u32) -> Vec<PathBuf> {
    (0..partitions)
        .map(|p| dir.join(ring_file_name(topic, p)))
        .collect()
}

/// A ring opened for writing together with its protocol state: what a
/// broker shard owns for each partition. On drop it closes the stream
/// gracefully (readers see the end of the stream).
pub struct PartitionWriter {
    // Field order matters: `core` borrows `file`'s mapping and is dropped
    // before it. The 'static lifetime never leaves this type: `core()`
    // hands it out shortened to a borrow of `self`.
    core: crate::ring::WriterCore<'static, FileLiveness, MonotonicClock>,
    file: RingFile,
    created: bool,
}

impl PartitionWriter {
    /// Creates or re-opens the ring (see [`RingFile::open_writer`]) and
    /// recovers its sequence: what the last writer left is checked, the
    /// epoch is bumped and sequences continue after the last committed stamp.
    ///
    /// # Errors
    /// As [`RingFile::open_writer`]; [`Error::Corrupt`] naming the file and
    /// the field when the ring holds what the protocol cannot have written.
    pub fn open(dir: &Path, params: &RingParams) -> Result<PartitionWriter> {
        PartitionWriter::open_after(dir, params, None)
    }

    /// [`open`](Self::open); a ring created now continues a stream that
    /// ended at `after` = (sequence, epoch) (its journal's last event): it
    /// starts at the next sequence, under the next epoch, so sequences and
    /// message ids never repeat. An existing ring goes on where it is.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn open_after(
        dir: &Path,
        params: &RingParams,
        after: Option<(u64, u64)>,
    ) -> Result<PartitionWriter> {
        let first = after.map_or(1, |(seq, _)| seq + 1);
        let (file, created) = RingFile::open_writer_at(dir, params, first)?;
        if created && let Some((_, epoch)) = after {
            // `recover` below bumps it: the new writer's epoch is the next.
            file.header()
                .writer
                .epoch
                .store(epoch, std::sync::atomic::Ordering::Release);
        }
        // SAFETY: the ring references point into `file`'s mappings, which
        // stay at fixed addresses until `file` drops; `core` is dropped
        // first (field order) and every accessor shortens 'static to a
        // borrow of `self`.
        let ring = unsafe { std::mem::transmute::<RingRef<'_>, RingRef<'static>>(file.ring()) };
        let core = crate::ring::WriterCore::recover(ring, file.liveness(), MonotonicClock)
            .map_err(|e| Error::Corrupt {
                path: file.path().to_path_buf(),
                what: e.to_string(),
            })?;
        Ok(PartitionWriter {
            core,
            file,
            created,
        })
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

    /// The protocol state, borrowed from this writer.
    pub fn core(&self) -> &crate::ring::WriterCore<'_, FileLiveness, MonotonicClock> {
        &self.core
    }

    /// The file.
    pub fn file(&self) -> &RingFile {
        &self.file
    }

    /// Whether this open created the ring (else it resumed an existing one).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The next sequence [`publish`](Self::publish) will assign.
    pub fn next_seq(&self) -> u64 {
        self.core.next_seq()
    }

    /// Reader slots currently owned (live or not yet reclaimed).
    pub fn live_readers(&self) -> u32 {
        self.core
            .ring()
            .readers()
            .iter()
            .filter(|r| {
                crate::layout::unpack_state(r.state_gen.load(std::sync::atomic::Ordering::Acquire))
                    .1
                    != crate::layout::STATE_FREE
            })
            .count() as u32
    }

    /// The current epoch.
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.core.ring().epoch()
    }
}

impl Drop for PartitionWriter {
    fn drop(&mut self) {
        self.core.close();
    }
}

/// Where a [`PartitionReader`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// After the last published sequence.
    Latest,
    /// The oldest sequence the ring still holds.
    Earliest,
    /// This sequence (one that left the ring reads as a gap).
    Sequence(u64),
}

/// A ring opened for reading with one reader's protocol state: its cursor
/// and, when registered, its reader slot. What shm-client holds per
/// partition.
pub struct PartitionReader {
    // Field order matters: `reg` and `core` borrow `file`'s mappings and
    // are dropped before it. The 'static lifetime never leaves this type.
    reg: Option<ReaderRegistration<'static, FileLiveness>>,
    core: ReaderCore<'static>,
    file: RingFile,
}

impl PartitionReader {
    /// Opens the ring at `path` and places the cursor. With `register`,
    /// takes a reader slot (tethered with `tether_budget_ns`, else
    /// untethered) when this process may write the reader-state file.
    ///
    /// # Errors
    /// As [`RingFile::open_reader`]; [`Error::ReadersFull`] when a tethered
    /// reader finds every slot taken; [`Error::ReadOnlyReaders`] when a
    /// tethered reader may not write the reader-state file.
    pub fn open(
        path: &Path,
        start: StartAt,
        tether_budget_ns: Option<u64>,
        slack: Option<u64>,
    ) -> Result<PartitionReader> {
        let file = RingFile::open_reader(path)?;
        if tether_budget_ns.is_some() && !file.can_register() {
            return Err(Error::ReadOnlyReaders {
                path: readers_path(path),
                detail: describe_access(&readers_path(path)),
            });
        }
        // SAFETY: as in `PartitionWriter::open`: the references point into
        // `file`'s mappings (or its boxed private reader state), which stay
        // put until `file` drops, after `reg` and `core` (field order).
        let ring = unsafe { std::mem::transmute::<RingRef<'_>, RingRef<'static>>(file.ring()) };
        let published = ring.published();
        let cursor = match start {
            StartAt::Latest => published + 1,
            StartAt::Earliest => ring.oldest(published),
            StartAt::Sequence(s) => s.max(1),
        };
        let mut core = ReaderCore::new(ring, cursor);
        if let Some(s) = slack {
            core.set_slack(s);
        }
        let reg = if file.can_register() {
            ReaderRegistration::claim(
                ring,
                file.liveness(),
                cursor,
                tether_budget_ns.is_some(),
                tether_budget_ns.unwrap_or(0),
                std::process::id() as u64,
            )
        } else {
            None
        };
        if reg.is_none() && tether_budget_ns.is_some() {
            return Err(Error::ReadersFull {
                path: readers_path(path),
                slots: ring.readers().len(),
            });
        }
        Ok(PartitionReader { reg, core, file })
    }

    /// Reads the frame at the cursor into `out` (a seqlock read).
    #[inline]
    pub fn try_read(&mut self, out: &mut [u64; crate::frame::BODY_WORDS]) -> Read {
        self.core.try_read(out)
    }

    /// Whether the slot at the cursor holds a committed frame.
    #[inline]
    pub fn ready(&self) -> bool {
        self.core.ready()
    }

    /// The next sequence to read.
    #[inline]
    pub fn cursor(&self) -> u64 {
        self.core.cursor()
    }

    /// Moves the cursor (a replay joining the ring, a journal writer
    /// resuming after what it holds) and publishes it, if registered. A
    /// tethered reader moving its cursor back only holds the writer from
    /// the writer's next look at the readers: what it wrote before may
    /// already have lapped the new cursor (that reads as a lap).
    pub fn set_cursor(&mut self, cursor: u64) {
        self.core.set_cursor(cursor);
        self.store_cursor(self.core.cursor());
    }

    /// Publishes the cursor to the writer (once per poll), if registered.
    #[inline]
    pub fn store_cursor(&self, cursor: u64) {
        if let Some(r) = &self.reg {
            r.store_cursor(cursor);
        }
    }

    /// Whether the writer untethered this reader since the last call.
    #[inline]
    pub fn check_tether(&mut self) -> Tether {
        match self.reg.as_mut() {
            Some(r) => r.check(),
            None => Tether::Unchanged,
        }
    }

    /// This reader's slot, when registered: its index and the slot (a
    /// subscription group's member publishes its acknowledged cursor there
    /// and reads its coordinator's signal word).
    pub fn slot(&self) -> Option<(usize, &crate::layout::ReaderSlot)> {
        let r = self.reg.as_ref()?;
        Some((r.index(), &self.core.ring().readers()[r.index()]))
    }

    /// Whether this reader holds a reader slot (it can block on the futex).
    pub fn is_registered(&self) -> bool {
        self.reg.is_some()
    }

    /// The ring, borrowed from this reader.
    pub fn ring(&self) -> RingRef<'_> {
        self.core.ring()
    }

    /// The file.
    pub fn file(&self) -> &RingFile {
        &self.file
    }

    /// Sets the waiter flag in the ring's futex word, asking the writer to
    /// wake blocked readers after its next batch (SeqCst: pairs with the
    /// writer's SeqCst fence between its commit and its look at the flag).
    /// `false` for an unregistered reader, whose reader state is private:
    /// nobody would wake it.
    pub fn arm_wait(&self) -> bool {
        if self.reg.is_none() {
            return false;
        }
        self.core
            .ring()
            .waiter_word()
            .fetch_or(1, std::sync::atomic::Ordering::SeqCst);
        true
    }

    /// The futex word and the value to wait on (flag set), after
    /// [`arm_wait`](Self::arm_wait); `None` for an unregistered reader.
    pub fn wait_word(&self) -> Option<(&std::sync::atomic::AtomicU32, u32)> {
        self.reg.as_ref()?;
        let w = self.core.ring().waiter_word();
        Some((w, w.load(std::sync::atomic::Ordering::Relaxed) | 1))
    }
}

/// Mode, owner and group of a file, and this process's ids: for a
/// permission error a user can act on.
pub(crate) fn describe_access(path: &Path) -> String {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    match std::fs::metadata(path) {
        Ok(m) => {
            use std::os::unix::fs::PermissionsExt;
            format!(
                "mode {:04o}, owner uid {}, group gid {}; this process runs as uid {uid}, gid {gid} \
                 (readers need read access to the .ring and symbology files and read-write access to the \
                 .readers file: run as the broker's user, or in the group set by node.group)",
                m.permissions().mode() & 0o7777,
                m.uid(),
                m.gid()
            )
        }
        Err(e) => format!("cannot stat it: {e}"),
    }
}

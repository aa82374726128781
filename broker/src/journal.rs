//! The journal writer: every committed frame of every partition appended to
//! segment files on disk, by one thread that reads the rings as a gating
//! reader.
//!
//! ```text
//!  partition rings ──(tethered reader slot, never untethered)──> journal thread
//!                                                                 │ frame + CRC into a 256 KiB buffer per partition
//!                                                                 │ one write in flight per partition (io_uring, or write(2))
//!                                                                 └ cursor published only for what the file holds
//! ```
//!
//! - The journal's reader slot on each ring is tethered with an unbounded
//!   budget, and its cursor is published only up to what has been written
//!   to the segment file. A ring writer therefore never overwrites a frame
//!   the journal has not written: if the disk cannot keep up, the shard
//!   waits at its gate, its ingest queue fills and sources are told to slow
//!   down. The journal never skips.
//! - Its registration is taken before the ring's writer starts (at broker
//!   start, and before a new topic's rings reach their shard), at the
//!   sequence after the journal's last intact frame: after a crash the
//!   ring still holds what the journal had not written, and it is written
//!   first. When the ring no longer holds it (the journal was off), the
//!   journal starts a new segment at the ring's oldest frame and logs the
//!   gap; readers see it as an exact missing range.
//! - On start the newest segment is scanned: a torn tail (a crash mid-write,
//!   a power loss) is cut and logged. A ring created anew beside a journal
//!   (a reboot emptied a tmpfs node directory) starts after the journal's
//!   last sequence ([`continues`]); a journal still ahead of its ring (not
//!   that ring's) is moved aside, not mixed.
//! - `fsync_interval_ms` bounds what a power loss can take: what was
//!   written in the last interval. A killed process loses nothing written.
//!   A full segment is synced as it is closed. With io_uring the
//!   fdatasyncs run in the kernel's workers while the journal goes on
//!   writing (a sync holding up the thread would stall ingest at its gate
//!   for as long as the disk takes); with write(2) they wait.
//! - Retention deletes whole segments whose last write is older than the
//!   topic's retention, and the oldest segments past a size cap; never the
//!   segment being written.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tickwire_proto::file::{PartitionReader, StartAt};
use tickwire_proto::frame::BODY_WORDS;
use tickwire_proto::journal::{
    EPOCHS_FILE, FRAME_BYTES, INDEX_EVERY, SegmentScan, encode_frame, frame_time, index_name,
    list_segments, partition_dir, read_epochs, scan_segment, segment_name,
};
use tickwire_proto::ring::Read;

use crate::config::JournalIo;
use crate::engine::BrokerError;

/// How long a stopping journal keeps trying writes that fail.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// How often retention looks at the segments: a quarter of the shortest
/// retention, within these bounds.
const RETENTION_EVERY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Counters of the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Frames written to segment files.
    pub events: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Write calls (or io_uring writes) completed.
    pub writes: u64,
    /// Writes that failed (each retried until it succeeds).
    pub write_errors: u64,
    /// fdatasyncs of segment files completed (a full segment as it is
    /// closed, the one being written every `fsync_interval_ms`).
    pub syncs: u64,
    /// fdatasyncs that failed: what they covered may be lost to a power
    /// loss (never to a killed process).
    pub sync_errors: u64,
    /// Segments deleted by retention.
    pub segments_deleted: u64,
    /// Frames never journaled (the ring had moved past the journal at start).
    pub gap_frames: u64,
    /// Partitions journaled now.
    pub partitions: u64,
    /// "io_uring" or "write".
    pub io: &'static str,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    bytes: AtomicU64,
    writes: AtomicU64,
    write_errors: AtomicU64,
    syncs: AtomicU64,
    sync_errors: AtomicU64,
    segments_deleted: AtomicU64,
    gap_frames: AtomicU64,
    partitions: AtomicU64,
}

enum Command {
    Add(Box<Part>),
    Remove {
        topic: String,
        done: std::sync::mpsc::Sender<()>,
    },
}

struct Shared {
    commands: Mutex<Vec<Command>>,
    has_commands: AtomicBool,
    /// The broker is stopping: writes that keep failing are given up.
    stop_requested: AtomicBool,
    /// The shards have stopped: write what the rings hold, then end.
    stop: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
    counters: Counters,
}

/// Settings resolved from [`JournalConfig`].
#[derive(Debug, Clone)]
pub struct JournalSettings {
    /// Root directory.
    pub root: PathBuf,
    /// Retention for topics that set none.
    pub retention: Duration,
    /// Size cap per partition (0: none).
    pub max_bytes: u64,
    /// Frames per segment.
    pub segment_frames: u64,
    /// Bytes per write.
    pub write_bytes: usize,
    /// fdatasync interval (`None`: never explicitly).
    pub fsync: Option<Duration>,
}

/// The running journal writer. See the module docs.
pub struct Journal {
    shared: Arc<Shared>,
    settings: JournalSettings,
    io_name: &'static str,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Held (flock) while the journal is open.
    _lock: File,
}

impl Journal {
    /// Prepares the journal under `settings.root` (created if missing) and
    /// chooses how it writes (io_uring when asked for or available, else
    /// write(2)); logged. The thread starts with
    /// [`start_thread`](Self::start_thread); partitions are added with
    /// [`open_partition`](Self::open_partition) and [`add`](Self::add).
    ///
    /// # Errors
    /// The directory cannot be created; `io = "uring"` and io_uring is refused.
    pub fn new(settings: JournalSettings, io: JournalIo) -> Result<Journal, BrokerError> {
        std::fs::create_dir_all(&settings.root)
            .map_err(|e| journal_err("create", &settings.root, e))?;
        // One broker per journal: two nodes given the same directory would
        // interleave unrelated sequences into the same segments.
        let lock_path = settings.root.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| journal_err("open", &lock_path, e))?;
        // SAFETY: flock on a descriptor we own; non-blocking.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(BrokerError::Journal(format!(
                "{} is in use by another tickwire serve (each node needs a journal directory of its own: set journal.dir)",
                settings.root.display()
            )));
        }
        let io_name = match io {
            JournalIo::Plain => "write",
            JournalIo::Uring | JournalIo::Auto => match io_uring::IoUring::new(8) {
                Ok(_) => "io_uring",
                Err(e) if io == JournalIo::Uring => {
                    return Err(BrokerError::Journal(format!(
                        "journal.io = \"uring\" but io_uring is refused here: {e}"
                    )));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring is refused here; the journal writes with write(2)");
                    "write"
                }
            },
        };
        remove_expired_replaced(&settings.root, settings.retention);
        tracing::info!(dir = %settings.root.display(), io = io_name, retention = %humantime::format_duration(settings.retention), segment_bytes = settings.segment_frames * FRAME_BYTES as u64, "journal open");
        Ok(Journal {
            shared: Arc::new(Shared {
                commands: Mutex::new(Vec::new()),
                has_commands: AtomicBool::new(false),
                stop_requested: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                thread: OnceLock::new(),
                counters: Counters::default(),
            }),
            settings,
            io_name,
            thread: Mutex::new(None),
            _lock: lock,
        })
    }

    /// Retention of topics that set none.
    pub fn default_retention(&self) -> Duration {
        self.settings.retention
    }

    /// The journal's root directory.
    pub fn root(&self) -> &Path {
        &self.settings.root
    }

    /// Opens a partition's journal and takes its tethered reader slot on
    /// the ring at `ring_path`. Call it before the ring's writer writes
    /// (the journal's cursor must be in place first); the partition is
    /// journaled once [`add`](Self::add)ed.
    ///
    /// # Errors
    /// The ring cannot be read or has no free reader slot; the journal
    /// directory or its newest segment cannot be read, cut or written.
    pub fn open_partition(
        &self,
        topic: &str,
        partition: u32,
        ring_path: &Path,
        retention: Option<Duration>,
    ) -> Result<PreparedPartition, BrokerError> {
        let part = Part::open(
            &self.settings,
            topic,
            partition,
            ring_path,
            retention.unwrap_or(self.settings.retention),
            &self.shared.counters,
        )?;
        Ok(PreparedPartition(Box::new(part)))
    }

    /// Starts journaling a partition opened with [`open_partition`](Self::open_partition).
    pub fn add(&self, p: PreparedPartition) {
        self.command(Command::Add(p.0));
    }

    /// Starts the journal thread (pinned to `core` when given).
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn start_thread(&self, core: Option<usize>) -> Result<(), BrokerError> {
        let shared = self.shared.clone();
        let settings = self.settings.clone();
        let uring = self.io_name == "io_uring";
        let handle = std::thread::Builder::new()
            .name("tickwire-journal".into())
            .spawn(move || {
                if let Some(c) = core
                    && !core_affinity::set_for_current(core_affinity::CoreId { id: c })
                {
                    tracing::warn!(core = c, "could not pin the journal thread; it runs unpinned");
                }
                let io = if uring {
                    match io_uring::IoUring::new(256) {
                        Ok(r) => Io::Uring(Box::new(r)),
                        Err(e) => {
                            tracing::warn!(error = %e, "io_uring refused on the journal thread; using write(2)");
                            Io::Plain(Vec::new())
                        }
                    }
                } else {
                    Io::Plain(Vec::new())
                };
                Writer {
                    shared: shared.clone(),
                    settings,
                    io,
                    parts: Vec::new(),
                    removals: Vec::new(),
                    last_sync: Instant::now(),
                    last_retention: Instant::now(),
                    syncs: Vec::new(),
                    next_sync: 0,
                }
                .run();
            })
            .map_err(|e| BrokerError::Journal(format!("cannot start the journal thread: {e}")))?;
        let _ = self.shared.thread.set(handle.thread().clone());
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    }

    /// Stops journaling every partition of `topic` once what its rings
    /// hold is written (their writers closed them first), then deletes
    /// its journal. Waits up to 10 s.
    pub fn remove_topic(&self, topic: &str) {
        let (done, wait) = std::sync::mpsc::channel();
        self.command(Command::Remove {
            topic: topic.to_string(),
            done,
        });
        if wait.recv_timeout(Duration::from_secs(10)).is_err() {
            tracing::warn!(
                topic,
                "the journal did not finish the deleted topic's partitions within 10 s; its files stay"
            );
            return;
        }
        let enc = topic.replace('/', "~");
        for (t, _, path) in tickwire_proto::journal::partition_dirs(&self.settings.root) {
            if t == enc
                && let Err(err) = std::fs::remove_dir_all(&path)
            {
                tracing::warn!(dir = %path.display(), error = %err, "a deleted topic's journal could not be removed");
            }
        }
    }

    fn command(&self, c: Command) {
        self.shared
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c);
        self.shared.has_commands.store(true, Ordering::Release);
        if let Some(t) = self.shared.thread.get() {
            t.unpark();
        }
    }

    /// Counters.
    pub fn stats(&self) -> JournalStats {
        let c = &self.shared.counters;
        JournalStats {
            events: c.events.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            sync_errors: c.sync_errors.load(Ordering::Relaxed),
            segments_deleted: c.segments_deleted.load(Ordering::Relaxed),
            gap_frames: c.gap_frames.load(Ordering::Relaxed),
            partitions: c.partitions.load(Ordering::Relaxed),
            io: self.io_name,
        }
    }

    /// The broker is stopping (before its shards stop): from now on,
    /// writes that have failed for 5 s are given up, so that a full or
    /// gone disk never keeps a shard waiting for the journal at shutdown.
    pub fn request_stop(&self) {
        self.shared.stop_requested.store(true, Ordering::Release);
        if let Some(t) = self.shared.thread.get() {
            t.unpark();
        }
    }

    /// Writes what the rings still hold (their writers stopped first),
    /// syncs, and stops the thread.
    pub fn shutdown(&self) {
        self.shared.stop_requested.store(true, Ordering::Release);
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.shared.thread.get() {
            t.unpark();
        }
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("the journal thread panicked");
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A partition whose journal is open and whose reader slot is taken,
/// waiting for [`Journal::add`].
pub struct PreparedPartition(Box<Part>);

fn journal_err(op: &str, path: &Path, e: std::io::Error) -> BrokerError {
    BrokerError::Journal(format!("{op} {}: {e}", path.display()))
}

/// The segment being written.
struct Segment {
    first: u64,
    file: File,
    path: PathBuf,
    index: File,
    /// Frames encoded for it (written, in flight or buffered).
    frames: u64,
    /// Running max of event times over its encoded frames.
    run_max: u64,
    unsynced: bool,
}

impl Segment {
    fn create(dir: &Path, first: u64) -> Result<Segment, BrokerError> {
        let path = dir.join(segment_name(first));
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| journal_err("create", &path, e))?;
        let ipath = dir.join(index_name(first));
        let index = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&ipath)
            .map_err(|e| journal_err("create", &ipath, e))?;
        Ok(Segment {
            first,
            file,
            path,
            index,
            frames: 0,
            run_max: 0,
            unsynced: true,
        })
    }

    /// Reopens the newest segment after cutting its torn tail, rebuilding
    /// its time index from its frames.
    fn resume(dir: &Path, first: u64, frames: u64) -> Result<Segment, BrokerError> {
        let path = dir.join(segment_name(first));
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .open(&path)
            .map_err(|e| journal_err("open", &path, e))?;
        file.set_len(frames * FRAME_BYTES as u64)
            .map_err(|e| journal_err("truncate", &path, e))?;
        let mut run_max = 0;
        let mut index = Vec::new();
        let mut buf = vec![0u8; FRAME_BYTES * INDEX_EVERY as usize];
        let mut body = [0u64; BODY_WORDS];
        let mut done = 0u64;
        while done < frames {
            let n = (frames - done).min(INDEX_EVERY);
            let bytes = &mut buf[..n as usize * FRAME_BYTES];
            file.read_exact_at(bytes, done * FRAME_BYTES as u64)
                .map_err(|e| journal_err("read", &path, e))?;
            for (i, c) in bytes.chunks_exact(FRAME_BYTES).enumerate() {
                tickwire_proto::journal::decode_frame(first + done + i as u64, c, &mut body);
                run_max = run_max.max(frame_time(&body));
            }
            done += n;
            if n == INDEX_EVERY {
                index.extend_from_slice(&run_max.to_le_bytes());
            }
        }
        let ipath = dir.join(index_name(first));
        std::fs::write(&ipath, &index).map_err(|e| journal_err("write", &ipath, e))?;
        let index = OpenOptions::new()
            .append(true)
            .open(&ipath)
            .map_err(|e| journal_err("open", &ipath, e))?;
        Ok(Segment {
            first,
            file,
            path,
            index,
            frames,
            run_max,
            unsynced: false,
        })
    }
}

/// A write in flight.
struct InFlight {
    buf: Vec<u8>,
    first_seq: u64,
    frames: u64,
    /// Byte offset of `buf[0]` in the segment file.
    offset: u64,
    /// Bytes of `buf` written so far.
    done: usize,
    /// When a failed write may be tried again.
    retry_at: Option<Instant>,
}

/// One partition's journal state.
struct Part {
    id: u64,
    topic: String,
    partition: u32,
    dir: PathBuf,
    retention: Duration,
    reader: PartitionReader,
    seg: Segment,
    /// Frames encoded, not yet handed to a write.
    buf: Vec<u8>,
    buf_first: u64,
    inflight: Option<InFlight>,
    spare: Option<Vec<u8>>,
    /// Index entries waiting for their frames to be written: (last seq, max).
    index_pending: Vec<(u64, u64)>,
    /// The next sequence not yet in the file (the cursor the ring sees).
    durable_next: u64,
    closing: bool,
    last_error_log: Option<Instant>,
    /// Since when its writes fail (cleared by one that succeeds).
    failing_since: Option<Instant>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Part {
    fn open(
        s: &JournalSettings,
        topic: &str,
        partition: u32,
        ring_path: &Path,
        retention: Duration,
        counters: &Counters,
    ) -> Result<Part, BrokerError> {
        let dir = partition_dir(&s.root, topic, partition);
        std::fs::create_dir_all(&dir).map_err(|e| journal_err("create", &dir, e))?;
        let mut reader = PartitionReader::open(ring_path, StartAt::Latest, Some(u64::MAX), None)?;
        let ring = reader.ring();
        let published = ring.published();
        let oldest = ring.oldest(published);
        let (epoch, epoch_start) = (ring.epoch(), ring.epoch_start_seq());
        let newest = newest_segment(&dir)?;
        if let Some((first, scan)) = &newest
            && scan.torn_bytes > 0
        {
            tracing::warn!(segment = %dir.join(segment_name(*first)).display(), intact_frames = scan.frames, cut_bytes = scan.torn_bytes, "journal: cutting a torn tail left by a crash");
        }
        let mut last = newest.map(|(first, scan)| (first, scan.frames));
        // An empty newest segment ends where its name says the one before did.
        let mut end = last.map_or(0, |(f, n)| f + n - 1);
        if end > published {
            let aside = PathBuf::from(format!(
                "{}.replaced-{}",
                dir.display(),
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            ));
            tracing::warn!(journal = %dir.display(), journal_end = end, ring_published = published, moved_to = %aside.display(),
                "journal: the journal is ahead of its ring (the ring was created anew); moving the old journal aside");
            std::fs::rename(&dir, &aside).map_err(|e| journal_err("rename", &dir, e))?;
            std::fs::create_dir_all(&dir).map_err(|e| journal_err("create", &dir, e))?;
            last = None;
            end = 0;
        }
        let start = if end + 1 >= oldest {
            end + 1
        } else {
            if end > 0 || oldest > 1 {
                tracing::warn!(
                    topic,
                    partition,
                    journal_end = end,
                    ring_oldest = oldest,
                    lost = oldest - end - 1,
                    "journal: the ring no longer holds what the journal is missing (the journal was off, or its disk refused writes at the last shutdown); sequences in between are not journaled"
                );
                counters
                    .gap_frames
                    .fetch_add(oldest - end - 1, Ordering::Relaxed);
            }
            oldest
        };
        reader.set_cursor(start);
        let seg = match last {
            Some((first, frames)) if start == first + frames && frames < s.segment_frames => {
                Segment::resume(&dir, first, frames)?
            }
            Some((first, 0)) => {
                // An empty newest segment (created, never written): replace it.
                let _ = std::fs::remove_file(dir.join(segment_name(first)));
                let _ = std::fs::remove_file(dir.join(index_name(first)));
                Segment::create(&dir, start)?
            }
            _ => Segment::create(&dir, start)?,
        };
        let epochs = read_epochs(&dir);
        if epochs.last().is_none_or(|&(_, e)| e != epoch) {
            use std::io::Write as _;
            let path = dir.join(EPOCHS_FILE);
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| journal_err("open", &path, e))?;
            writeln!(f, "{} {epoch}", epoch_start.max(start))
                .map_err(|e| journal_err("write", &path, e))?;
        }
        tracing::info!(topic, partition, from_seq = start, segment = %seg.path.display(), "journal: partition open");
        Ok(Part {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            topic: topic.to_string(),
            partition,
            dir,
            retention,
            reader,
            seg,
            buf: Vec::new(),
            buf_first: start,
            inflight: None,
            spare: None,
            index_pending: Vec::new(),
            durable_next: start,
            closing: false,
            last_error_log: None,
            failing_since: None,
        })
    }

    /// Reads what the ring has into the buffer, up to the buffer's size and
    /// the segment's end. Returns frames read.
    fn fill(&mut self, s: &JournalSettings, frames_cap: usize) -> usize {
        if self.buf.capacity() == 0 {
            self.buf = self
                .spare
                .take()
                .unwrap_or_else(|| Vec::with_capacity(frames_cap * FRAME_BYTES));
            self.buf_first = self.next_seq_after_inflight();
        }
        let mut body = [0u64; BODY_WORDS];
        let mut frame = [0u8; FRAME_BYTES];
        let mut n = 0;
        while self.buf.len() < frames_cap * FRAME_BYTES && self.seg.frames < s.segment_frames {
            match self.reader.try_read(&mut body) {
                Read::Frame(seq) => {
                    encode_frame(seq, &body, &mut frame);
                    self.buf.extend_from_slice(&frame);
                    let seg = &mut self.seg;
                    seg.run_max = seg.run_max.max(frame_time(&body));
                    seg.frames += 1;
                    if seg.frames.is_multiple_of(INDEX_EVERY) {
                        self.index_pending.push((seq, seg.run_max));
                    }
                    n += 1;
                }
                Read::Empty => break,
                Read::Lapped { from, to } => {
                    // Cannot happen while the slot stays tethered; if the
                    // registration was lost, say exactly what is missing.
                    tracing::error!(topic = %self.topic, partition = self.partition, from, to,
                        "journal: lapped by the ring writer; these sequences are not journaled");
                    break;
                }
            }
        }
        n
    }

    fn next_seq_after_inflight(&self) -> u64 {
        match &self.inflight {
            Some(w) => w.first_seq + w.frames,
            None => self.durable_next,
        }
    }

    /// Whether the segment is complete and everything of it written.
    fn segment_done(&self, s: &JournalSettings) -> bool {
        self.seg.frames >= s.segment_frames && self.buf.is_empty() && self.inflight.is_none()
    }
}

enum Io {
    Uring(Box<io_uring::IoUring>),
    /// write(2): each write completes at once; its result waits here to be
    /// reaped like an io_uring completion.
    Plain(Vec<(u64, i32)>),
}

struct Writer {
    shared: Arc<Shared>,
    settings: JournalSettings,
    io: Io,
    parts: Vec<Part>,
    removals: Vec<(String, std::sync::mpsc::Sender<()>)>,
    last_sync: Instant,
    last_retention: Instant,
    /// fdatasyncs in flight through io_uring.
    syncs: Vec<PendingSync>,
    next_sync: u64,
}

/// Marks the user data of an fdatasync's completion (a partition's write
/// carries the partition's id, which never reaches this bit).
const SYNC_TAG: u64 = 1 << 63;

/// An fdatasync in flight: the file stays open until it completes.
struct PendingSync {
    token: u64,
    file: File,
    path: PathBuf,
}

impl Writer {
    fn run(mut self) {
        self.shared
            .counters
            .partitions
            .store(self.parts.len() as u64, Ordering::Relaxed);
        let frames_cap = (self.settings.write_bytes / FRAME_BYTES).max(1);
        let mut idle = 0u32;
        loop {
            if self.shared.has_commands.load(Ordering::Acquire) {
                self.apply_commands();
            }
            let stopping = self.shared.stop.load(Ordering::Acquire);
            let mut work = 0usize;
            for i in 0..self.parts.len() {
                let s = &self.settings;
                let p = &mut self.parts[i];
                work += p.fill(s, frames_cap);
                let full =
                    p.buf.len() >= frames_cap * FRAME_BYTES || p.seg.frames >= s.segment_frames;
                // Write a full buffer, or whatever is there when the ring is drained.
                if p.inflight.is_none() && !p.buf.is_empty() && (full || !p.reader.ready()) {
                    submit(&mut self.io, p);
                    work += 1;
                }
            }
            work += self.reap();
            for i in 0..self.parts.len() {
                self.retry_failed(i);
                if self.parts[i].segment_done(&self.settings) {
                    self.roll(i);
                }
            }
            self.finish_removals();
            if self
                .settings
                .fsync
                .is_some_and(|d| self.last_sync.elapsed() >= d)
            {
                self.sync_all();
            }
            // At most every 100 ms: is retention due?
            if self.last_retention.elapsed() >= RETENTION_EVERY.0 {
                let every = self
                    .parts
                    .iter()
                    .map(|p| p.retention / 4)
                    .min()
                    .unwrap_or(RETENTION_EVERY.1)
                    .clamp(RETENTION_EVERY.0, RETENTION_EVERY.1);
                if self.last_retention.elapsed() >= every {
                    self.last_retention = Instant::now();
                    for i in 0..self.parts.len() {
                        self.retention(i);
                    }
                }
            }
            if work > 0 {
                idle = 0;
                continue;
            }
            let pending = self
                .parts
                .iter()
                .any(|p| p.inflight.is_some() || !p.buf.is_empty());
            if stopping && !pending {
                break;
            }
            if self.shared.stop_requested.load(Ordering::Acquire)
                && self
                    .parts
                    .iter()
                    .any(|p| p.failing_since.is_some_and(|t| t.elapsed() >= STOP_WAIT))
            {
                // A disk that takes no more writes (full, gone) while the
                // broker stops: give up, releasing the rings (their shards
                // may be waiting for us to commit their last events). What
                // is unwritten stays in the rings; the next start journals
                // what they still hold.
                let unwritten: Vec<String> = self
                    .parts
                    .iter()
                    .map(|p| format!("{}/{} from {}", p.topic, p.partition, p.durable_next))
                    .collect();
                tracing::error!(partitions = ?unwritten, "journal: writes still failing at shutdown; stopping without them (the rings keep those events and the next start journals them)");
                for p in &mut self.parts {
                    // A write the kernel may still be doing keeps its buffer.
                    std::mem::forget(p.inflight.take());
                }
                self.parts.clear();
                break;
            }
            idle = idle.saturating_add(1);
            if pending {
                self.wait_completion();
            } else if idle > 64 {
                // Nothing to write: the rings are read again in a while
                // (the shards never wait for that unless a ring is full).
                std::thread::park_timeout(Duration::from_micros(if idle > 1000 {
                    1000
                } else {
                    200
                }));
            } else {
                std::thread::yield_now();
            }
        }
        self.sync_all_now();
        self.shared.counters.partitions.store(0, Ordering::Relaxed);
    }

    fn apply_commands(&mut self) {
        self.shared.has_commands.store(false, Ordering::Release);
        let cmds = std::mem::take(
            &mut *self
                .shared
                .commands
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for c in cmds {
            match c {
                Command::Add(p) => self.parts.push(*p),
                Command::Remove { topic, done } => {
                    for p in &mut self.parts {
                        if p.topic == topic {
                            p.closing = true;
                        }
                    }
                    self.removals.push((topic, done));
                }
            }
        }
        self.shared
            .counters
            .partitions
            .store(self.parts.len() as u64, Ordering::Relaxed);
    }

    /// Drops partitions of deleted topics once everything their (closed)
    /// rings hold is written.
    fn finish_removals(&mut self) {
        if self.removals.is_empty() {
            return;
        }
        self.parts.retain(|p| {
            let drained =
                p.closing && p.buf.is_empty() && p.inflight.is_none() && !p.reader.ready();
            !drained
        });
        let parts = &self.parts;
        self.removals.retain(|(topic, done)| {
            if parts.iter().any(|p| &p.topic == topic) {
                return true;
            }
            let _ = done.send(());
            false
        });
        self.shared
            .counters
            .partitions
            .store(self.parts.len() as u64, Ordering::Relaxed);
    }

    /// Completes finished writes; returns how many completed.
    fn reap(&mut self) -> usize {
        let mut done = Vec::new();
        match &mut self.io {
            Io::Uring(ring) => {
                for cqe in ring.completion() {
                    done.push((cqe.user_data(), cqe.result()));
                }
            }
            Io::Plain(finished) => std::mem::swap(&mut done, finished),
        }
        let n = done.len();
        for (id, res) in done {
            if id & SYNC_TAG != 0 {
                self.sync_done(id, res);
            } else if let Some(i) = self.parts.iter().position(|p| p.id == id) {
                self.completed(i, res);
            }
        }
        n
    }

    /// Blocks until a write completes, at most 1 ms.
    fn wait_completion(&mut self) {
        match &mut self.io {
            Io::Uring(ring) => {
                let ts = io_uring::types::Timespec::new().nsec(1_000_000);
                let args = io_uring::types::SubmitArgs::new().timespec(&ts);
                let _ = ring.submitter().submit_with_args(1, &args);
            }
            Io::Plain(_) => std::thread::park_timeout(Duration::from_micros(200)),
        }
    }

    /// A write returned `res` (bytes written, or -errno).
    fn completed(&mut self, i: usize, res: i32) {
        let counters = &self.shared.counters;
        let p = &mut self.parts[i];
        let Some(w) = p.inflight.as_mut() else { return };
        if res < 0 {
            let e = std::io::Error::from_raw_os_error(-res);
            counters.write_errors.fetch_add(1, Ordering::Relaxed);
            w.retry_at = Some(Instant::now() + Duration::from_millis(100));
            p.failing_since.get_or_insert_with(Instant::now);
            if p.last_error_log
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                p.last_error_log = Some(Instant::now());
                tracing::error!(segment = %p.seg.path.display(), error = %e,
                    "journal: write failed; retrying every 100 ms (ingest to this partition waits: nothing is skipped)");
            }
            return;
        }
        p.failing_since = None;
        w.done += res as usize;
        if w.done < w.buf.len() {
            // A short write: the rest goes next.
            w.retry_at = Some(Instant::now());
            return;
        }
        let Some(mut w) = p.inflight.take() else {
            return;
        };
        counters.events.fetch_add(w.frames, Ordering::Relaxed);
        counters
            .bytes
            .fetch_add(w.buf.len() as u64, Ordering::Relaxed);
        counters.writes.fetch_add(1, Ordering::Relaxed);
        p.durable_next = w.first_seq + w.frames;
        // The ring may now reuse what the file holds.
        p.reader.store_cursor(p.durable_next);
        p.seg.unsynced = true;
        let ready = p
            .index_pending
            .iter()
            .take_while(|(seq, _)| *seq < p.durable_next)
            .count();
        if ready > 0 {
            let mut bytes = Vec::with_capacity(ready * 8);
            for (_, m) in p.index_pending.drain(..ready) {
                bytes.extend_from_slice(&m.to_le_bytes());
            }
            use std::io::Write as _;
            if let Err(e) = p.seg.index.write_all(&bytes) {
                // The index only speeds up time seeks; readers scan without it.
                tracing::warn!(segment = %p.seg.path.display(), error = %e, "journal: time index not written");
            }
        }
        w.buf.clear();
        w.done = 0;
        if p.buf.capacity() == 0 {
            p.buf = std::mem::take(&mut w.buf);
            p.buf_first = p.durable_next;
        } else {
            p.spare = Some(std::mem::take(&mut w.buf));
        }
    }

    fn retry_failed(&mut self, i: usize) {
        let p = &mut self.parts[i];
        if let Some(w) = p.inflight.as_mut()
            && w.retry_at.is_some_and(|t| Instant::now() >= t)
        {
            w.retry_at = None;
            write_inflight(&mut self.io, p);
        }
    }

    /// Starts the next segment once the current one is complete and written.
    fn roll(&mut self, i: usize) {
        let next = self.parts[i].durable_next;
        let p = &mut self.parts[i];
        match Segment::create(&p.dir, next) {
            Ok(seg) => {
                let full = std::mem::replace(&mut p.seg, seg);
                p.buf.clear();
                p.buf_first = next;
                p.index_pending.clear();
                // The full segment is synced without holding up the next one.
                self.sync_file(full.file, full.path);
            }
            Err(e) => {
                // Tried again on the next loop; the ring waits meanwhile.
                if p.last_error_log
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                {
                    p.last_error_log = Some(Instant::now());
                    tracing::error!(error = %e, "journal: cannot start the next segment; retrying");
                }
            }
        }
    }

    /// Starts an fdatasync of every segment written to since the last one.
    /// A segment whose previous fdatasync is still running is left for the
    /// next interval.
    fn sync_all(&mut self) {
        self.last_sync = Instant::now();
        let mut due = Vec::new();
        for p in &mut self.parts {
            if p.seg.unsynced && !self.syncs.iter().any(|s| s.path == p.seg.path) {
                p.seg.unsynced = false;
                match p.seg.file.try_clone() {
                    Ok(f) => due.push((f, p.seg.path.clone())),
                    Err(e) => {
                        tracing::debug!(segment = %p.seg.path.display(), error = %e, "journal: fdatasync in the foreground");
                        sync_now(&p.seg.file, &p.seg.path, &self.shared.counters);
                    }
                }
            }
        }
        if !due.is_empty() {
            self.sync_symbology_copy();
        }
        for (file, path) in due {
            self.sync_file(file, path);
        }
    }

    /// fdatasync of the symbology's copy beside the journal (written by the
    /// router as instruments appear), waiting for it, before the segments':
    /// an id in a frame a sync made durable was in the copy before the
    /// frame was written, so it is durable too. Clean (no new instrument
    /// since the last one), it costs a system call.
    fn sync_symbology_copy(&self) {
        let path = self
            .settings
            .root
            .join(tickwire_proto::symbology::SYMBOLOGY_FILE);
        let Ok(f) = File::open(&path) else {
            return;
        };
        if let Err(e) = f.sync_data() {
            tracing::error!(copy = %path.display(), error = %e,
                "journal: fdatasync of the symbology copy failed; the newest instrument ids may not survive a power loss");
        }
    }

    /// fdatasync of `file` without waiting for it: through io_uring, the
    /// file kept open until its completion is reaped ([`Self::sync_done`]); at
    /// once with write(2), or when the submission queue takes no more.
    fn sync_file(&mut self, file: File, path: PathBuf) {
        if let Io::Uring(ring) = &mut self.io {
            let token = SYNC_TAG | self.next_sync;
            self.next_sync += 1;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
            let sqe = io_uring::opcode::Fsync::new(io_uring::types::Fd(fd))
                .flags(io_uring::types::FsyncFlags::DATASYNC)
                .build()
                .user_data(token);
            // SAFETY: the operation refers to no memory of ours, and its fd
            // stays open (the file is kept in `syncs`) until it completes.
            if unsafe { push_and_submit(ring, &sqe) } {
                self.syncs.push(PendingSync { token, file, path });
                return;
            }
        }
        sync_now(&file, &path, &self.shared.counters);
    }

    /// An fdatasync started by [`Self::sync_file`] returned `res` (0, or -errno).
    fn sync_done(&mut self, token: u64, res: i32) {
        let Some(i) = self.syncs.iter().position(|s| s.token == token) else {
            return;
        };
        let s = self.syncs.swap_remove(i);
        let res = if res < 0 {
            Err(std::io::Error::from_raw_os_error(-res))
        } else {
            Ok(())
        };
        synced(&s.path, res, &self.shared.counters);
    }

    /// Syncs everything written before returning: at the end of the run.
    fn sync_all_now(&mut self) {
        self.sync_symbology_copy();
        for s in std::mem::take(&mut self.syncs) {
            sync_now(&s.file, &s.path, &self.shared.counters);
        }
        for p in &mut self.parts {
            if p.seg.unsynced {
                p.seg.unsynced = false;
                sync_now(&p.seg.file, &p.seg.path, &self.shared.counters);
            }
        }
    }

    /// Deletes whole segments past the partition's retention or size cap,
    /// never the one being written.
    fn retention(&mut self, i: usize) {
        let max_bytes = self.settings.max_bytes;
        let p = &self.parts[i];
        let Ok(segs) = list_segments(&p.dir) else {
            return;
        };
        let mut sizes: Vec<(u64, u64, Option<SystemTime>)> = segs
            .iter()
            .filter(|&&f| f < p.seg.first)
            .filter_map(|&f| {
                let m = std::fs::metadata(p.dir.join(segment_name(f))).ok()?;
                Some((f, m.len(), m.modified().ok()))
            })
            .collect();
        let mut total: u64 =
            sizes.iter().map(|s| s.1).sum::<u64>() + p.seg.frames * FRAME_BYTES as u64;
        let cutoff = SystemTime::now().checked_sub(p.retention);
        let mut deleted = 0;
        sizes.sort_unstable_by_key(|s| s.0);
        for (first, len, mtime) in sizes {
            let old = matches!((mtime, cutoff), (Some(m), Some(c)) if m < c);
            let over = max_bytes > 0 && total > max_bytes;
            if !old && !over {
                break;
            }
            for f in [segment_name(first), index_name(first)] {
                if let Err(e) = std::fs::remove_file(p.dir.join(&f))
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(file = %p.dir.join(&f).display(), error = %e, "journal: retention could not delete a segment");
                }
            }
            total = total.saturating_sub(len);
            deleted += 1;
        }
        if deleted > 0 {
            self.shared
                .counters
                .segments_deleted
                .fetch_add(deleted, Ordering::Relaxed);
            tracing::info!(topic = %p.topic, partition = p.partition, segments = deleted, "journal: retention deleted old segments");
        }
    }
}

/// fdatasync of `file`, waiting for it.
fn sync_now(file: &File, path: &Path, counters: &Counters) {
    synced(path, file.sync_data(), counters);
}

/// Counts an fdatasync's result; a failure is logged as an error.
fn synced(path: &Path, res: std::io::Result<()>, counters: &Counters) {
    counters.syncs.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = res {
        counters.sync_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(segment = %path.display(), error = %e,
            "journal: fdatasync failed; what it covered is written but may not survive a power loss");
    }
}

/// Queues `sqe` (submitting what waits first when the queue is full) and
/// submits it; `false` when the queue would not take it.
///
/// # Safety
/// What `sqe` refers to (buffer, file descriptor) stays valid until its
/// completion is reaped.
unsafe fn push_and_submit(ring: &mut io_uring::IoUring, sqe: &io_uring::squeue::Entry) -> bool {
    // SAFETY: the caller keeps what the entry refers to valid.
    if unsafe { ring.submission().push(sqe).is_err() } {
        let _ = ring.submit();
        // SAFETY: as above.
        if unsafe { ring.submission().push(sqe).is_err() } {
            return false;
        }
    }
    if let Err(e) = ring.submit() {
        // Queued all the same: the next submit takes it.
        tracing::warn!(error = %e, "journal: io_uring submit failed; retrying");
    }
    true
}

/// Hands the part's buffer to a write.
fn submit(io: &mut Io, p: &mut Part) {
    let buf = std::mem::take(&mut p.buf);
    let frames = (buf.len() / FRAME_BYTES) as u64;
    p.inflight = Some(InFlight {
        offset: (p.buf_first - p.seg.first) * FRAME_BYTES as u64,
        first_seq: p.buf_first,
        frames,
        buf,
        done: 0,
        retry_at: None,
    });
    p.buf_first += frames;
    write_inflight(io, p);
}

/// Issues (the rest of) the part's in-flight write.
fn write_inflight(io: &mut Io, p: &mut Part) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&p.seg.file);
    let Some(w) = p.inflight.as_mut() else { return };
    let rest = &w.buf[w.done..];
    let off = w.offset + w.done as u64;
    match io {
        Io::Uring(ring) => {
            let sqe = io_uring::opcode::Write::new(
                io_uring::types::Fd(fd),
                rest.as_ptr(),
                rest.len() as u32,
            )
            .offset(off)
            .build()
            .user_data(p.id);
            // SAFETY: the buffer is owned by `p.inflight` and neither moved
            // (a Vec's heap buffer stays put) nor freed until this write's
            // completion is reaped: `inflight` is only taken in `completed`,
            // and a partition is dropped only with nothing in flight (on
            // removal and at the end of `run`).
            if !unsafe { push_and_submit(ring, &sqe) } {
                w.retry_at = Some(Instant::now());
            }
        }
        Io::Plain(finished) => {
            let res = match p.seg.file.write_at(rest, off) {
                Ok(n) => n.min(i32::MAX as usize) as i32,
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            };
            finished.push((p.id, res));
        }
    }
}

/// Deletes journals moved aside (`<partition>.replaced-<unix secs>`: their
/// ring was created anew) once they are older than `retention`.
fn remove_expired_replaced(root: &Path, retention: Duration) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((_, secs)) = name.rsplit_once(".replaced-") else {
            continue;
        };
        let Ok(secs) = secs.parse::<u64>() else {
            continue;
        };
        if now.saturating_sub(secs) < retention.as_secs() {
            continue;
        }
        match std::fs::remove_dir_all(e.path()) {
            Ok(()) => {
                tracing::info!(dir = %e.path().display(), "journal: deleted a replaced journal past its retention")
            }
            Err(err) => {
                tracing::warn!(dir = %e.path().display(), error = %err, "journal: a replaced journal could not be deleted")
            }
        }
    }
}

/// Where the stream of a partition whose ring does not exist yet ends in
/// its journal under `root`: (last sequence, the writer epoch that wrote
/// it), so that the ring created now continues it
/// ([`PartitionWriter::open_after`](tickwire_proto::file::PartitionWriter::open_after))
/// instead of starting again at 1 beside a journal that holds the past:
/// what a reboot does to a tmpfs node directory. `None` when the ring
/// exists (it goes on where it is) or the journal holds nothing.
///
/// # Errors
/// The journal's newest segment cannot be read.
pub fn continues(
    root: &Path,
    ring: &Path,
    topic: &str,
    partition: u32,
) -> Result<Option<(u64, u64)>, BrokerError> {
    if ring.exists() {
        return Ok(None);
    }
    let dir = partition_dir(root, topic, partition);
    let Some((first, scan)) = newest_segment(&dir)? else {
        return Ok(None);
    };
    let end = first + scan.frames - 1;
    if end == 0 {
        return Ok(None);
    }
    let epoch = tickwire_proto::journal::epoch_of(&read_epochs(&dir), end).unwrap_or(0);
    tracing::info!(
        topic,
        partition,
        journal_end = end,
        epoch,
        "ring created anew beside its journal (the node directory was emptied, as a reboot does to /dev/shm): it continues the journal's sequences"
    );
    Ok(Some((end, epoch)))
}

/// The newest segment of a partition's journal in `dir`: its first
/// sequence and what its scan found (intact frames, torn bytes).
fn newest_segment(dir: &Path) -> Result<Option<(u64, SegmentScan)>, BrokerError> {
    let Some(&first) = list_segments(dir)?.last() else {
        return Ok(None);
    };
    Ok(Some((
        first,
        scan_segment(&dir.join(segment_name(first)), first)?,
    )))
}

/// Makes `<node_dir>/journal` lead to `root` (a symlink when the journal
/// is elsewhere), so readers of the node directory find it.
///
/// # Errors
/// A real directory of that name is in the way, or the link cannot be made.
pub fn link_from_node_dir(node_dir: &Path, root: &Path) -> Result<(), BrokerError> {
    let link = node_dir.join("journal");
    if link == root {
        return Ok(());
    }
    match std::fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => {
            if std::fs::read_link(&link).ok().as_deref() == Some(root) {
                return Ok(());
            }
            std::fs::remove_file(&link).map_err(|e| journal_err("replace link", &link, e))?;
        }
        Ok(_) => {
            return Err(BrokerError::Journal(format!(
                "{} is a directory, but journal.dir is {}: move one or set journal.dir to it",
                link.display(),
                root.display()
            )));
        }
        Err(_) => {}
    }
    std::os::unix::fs::symlink(root, &link).map_err(|e| journal_err("link", &link, e))
}

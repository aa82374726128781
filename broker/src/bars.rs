//! The bar builder: one thread that tails every partition's journal and
//! writes one-minute bars per instrument to the bar store
//! (`<journal root>/bars`, format in [`tickwire_proto::bars`]).
//!
//! It reads the journal, not the rings: it holds no reader slot, so it
//! can never slow ingest, and it sees every event the journal has, in
//! sequence order, with no gap but what retention deleted. It is at most a
//! poll interval (100 ms) behind the journal, which is itself a write
//! behind the ring.
//!
//! A minute's bars are written once the partition's event time has passed
//! the minute's end by `history.lateness`; a partition that has gone quiet
//! (nothing new for the lateness) has its open minutes written by the
//! clock instead. Events for a minute already written are counted as
//! late and left out.
//!
//! Per partition it keeps `<bars>/<topic>.<partition>.state` ("resume
//! sequence, closed-through minute, watermark, journal directory inode"),
//! written after the bars it covers are on disk. After a restart it reads
//! again from the resume sequence (the first event of any minute still
//! open) and rebuilds the open minutes; events of closed minutes are left
//! out as they were the first time, and a bar written twice replaces
//! itself, so a crash at any point neither loses nor doubles a bar.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tickwire_proto::bars::{
    BARS_DIR, Bar, BarBuilder, BarFile, Folded, OpenMinutes, bar_input, bar_path,
};
use tickwire_proto::frame::{ArchivedFrameBody, BODY_WORDS};
use tickwire_proto::futex::realtime_ns;
use tickwire_proto::journal::{JournalRead, JournalReader};

use crate::engine::BrokerError;

/// How often the thread looks for new journal data once it has read all.
const POLL: Duration = Duration::from_millis(100);
/// Most events read from one partition before looking at the others.
const SLICE: u64 = 1 << 16;
/// How often the journal root is listed for new or deleted partitions.
const RESCAN: Duration = Duration::from_secs(1);
/// How often bar files are checked against the retention.
const SWEEP: Duration = Duration::from_secs(3600);
/// How often a partition's open minutes are published while it folds
/// events (at once when it closes minutes).
const PUBLISH: Duration = Duration::from_millis(50);

/// Each partition's open minutes, by topic (`/` as `~`) and partition.
type OpenBook = std::sync::Mutex<HashMap<String, BTreeMap<u32, Arc<OpenMinutes>>>>;

/// The bar builder's settings.
#[derive(Debug, Clone)]
pub struct BarSettings {
    /// The journal root (bars go to its `bars` directory).
    pub journal_root: PathBuf,
    /// How long after a minute's end (in event time) it is closed; events
    /// for it that come later are left out and counted as late.
    pub lateness: Duration,
    /// Events stamped further than this ahead of the clock are left out
    /// (a source with a wrong clock must not close everyone's minutes).
    pub max_skew: Duration,
    /// Bars older than this are deleted (`None`: kept for ever). A file
    /// is rewritten without its old bars once they reach an eighth of the
    /// retention, so a bar lives between 1 and 1 1/8 retentions.
    pub retention: Option<Duration>,
    /// Pin the builder's thread to this core (the journal's: the builder
    /// reads what the journal writes, and stays off the sources' cores).
    pub core: Option<usize>,
}

/// The bar builder's counters.
#[derive(Debug, Default)]
pub struct BarCounters {
    /// Events folded into bars.
    pub events: AtomicU64,
    /// Bars written.
    pub bars: AtomicU64,
    /// Events left out: their minute was closed.
    pub late: AtomicU64,
    /// Events left out: stamped too far ahead of the clock.
    pub future: AtomicU64,
    /// Errors (a journal that cannot be read, a bar that cannot be written).
    pub errors: AtomicU64,
    /// Bars deleted by the retention.
    pub expired: AtomicU64,
}

/// The running bar builder.
#[derive(Debug)]
pub struct Bars {
    counters: Arc<BarCounters>,
    book: Arc<OpenBook>,
    stop: Arc<AtomicBool>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Bars {
    /// Starts the thread.
    ///
    /// # Errors
    /// The bar directory cannot be created, or the thread not spawned.
    pub fn start(settings: BarSettings) -> Result<Bars, BrokerError> {
        let dir = settings.journal_root.join(BARS_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| {
            BrokerError::Journal(format!("create bar directory {}: {e}", dir.display()))
        })?;
        let counters = Arc::new(BarCounters::default());
        let book = Arc::new(OpenBook::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut run = Run {
            settings,
            dir,
            parts: HashMap::new(),
            counters: counters.clone(),
            book: book.clone(),
            last_scan: None,
            last_sweep: None,
        };
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tickwire-bars".into())
            .spawn(move || run.run(&stop2))
            .map_err(|e| BrokerError::Journal(format!("spawn the bar builder: {e}")))?;
        Ok(Bars {
            counters,
            book,
            stop,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Its counters.
    pub fn counters(&self) -> &BarCounters {
        &self.counters
    }

    /// The open minutes of `topic`'s partitions, as last published (at
    /// most [`PUBLISH`] behind what the builder has folded, itself at most
    /// a poll behind the journal).
    pub fn open_minutes(&self, topic: &str) -> Vec<(u32, Arc<OpenMinutes>)> {
        let book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        book.get(&topic.replace('/', "~"))
            .map_or_else(Vec::new, |parts| {
                parts.iter().map(|(&p, o)| (p, o.clone())).collect()
            })
    }

    /// Stops the thread (it finishes the partition it is reading, at most
    /// [`SLICE`] events) and waits for it.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A partition's saved position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    resume: u64,
    closed_through: u64,
    watermark: u64,
    inode: u64,
}

impl State {
    fn load(path: &Path) -> Option<State> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut it = text.split_ascii_whitespace().map(str::parse::<u64>);
        Some(State {
            resume: it.next()?.ok()?,
            closed_through: it.next()?.ok()?,
            watermark: it.next()?.ok()?,
            inode: it.next()?.ok()?,
        })
    }

    /// Writes the state through a temporary file and a rename, synced, so
    /// a crash leaves the old state or the new one.
    fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("state.tmp");
        let text = format!(
            "{} {} {} {}\n",
            self.resume, self.closed_through, self.watermark, self.inode
        );
        {
            let f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut &f, text.as_bytes())?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, path)
    }
}

/// One partition being read.
struct Part {
    /// `<topic with / as ~>`, as the journal and bar store name it.
    topic: String,
    /// Its partition.
    partition: u32,
    journal: PathBuf,
    state_path: PathBuf,
    reader: Option<JournalReader>,
    builder: BarBuilder,
    next: u64,
    inode: u64,
    /// When the last event was read (the clock closes an idle
    /// partition's minutes only once it has been idle for the lateness).
    last_event: Instant,
    /// Closed bars not yet written (a write failed: retried each step).
    pending: Vec<(u32, Bar)>,
    /// When the last error was logged (one line per minute at most).
    warned: Option<Instant>,
    /// Events folded since its open minutes were last published.
    dirty: bool,
    /// When they were.
    published: Option<Instant>,
}

struct Run {
    settings: BarSettings,
    dir: PathBuf,
    parts: HashMap<PathBuf, Part>,
    counters: Arc<BarCounters>,
    book: Arc<OpenBook>,
    last_scan: Option<Instant>,
    last_sweep: Option<Instant>,
}

fn inode_of(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return 0,
    })
}

impl Run {
    fn run(&mut self, stop: &AtomicBool) {
        if let Some(c) = self.settings.core
            && !core_affinity::set_for_current(core_affinity::CoreId { id: c })
        {
            tracing::warn!(core = c, "could not pin the bar builder; it runs unpinned");
        }
        tracing::info!(dir = %self.dir.display(), lateness = %humantime::format_duration(self.settings.lateness), "bar builder started");
        while !stop.load(Ordering::Acquire) {
            if self.last_scan.is_none_or(|t| t.elapsed() >= RESCAN) {
                self.scan();
                self.last_scan = Some(Instant::now());
            }
            if self.last_sweep.is_none_or(|t| t.elapsed() >= SWEEP) {
                self.last_sweep = Some(Instant::now());
                if let Some(keep) = self.settings.retention {
                    self.sweep(keep, stop);
                }
            }
            let mut busy = false;
            let keys: Vec<PathBuf> = self.parts.keys().cloned().collect();
            for k in keys {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                if let Some(mut p) = self.parts.remove(&k) {
                    busy |= self.step(&mut p);
                    self.parts.insert(k, p);
                }
            }
            if !busy {
                std::thread::park_timeout(POLL);
            }
        }
        tracing::info!("bar builder stopped");
    }

    /// Finds the journal's partition directories (`<topic>.<n>`).
    fn scan(&mut self) {
        let mut seen = Vec::new();
        for (topic, partition, path) in
            tickwire_proto::journal::partition_dirs(&self.settings.journal_root)
        {
            seen.push(path.clone());
            if self.parts.contains_key(&path) {
                continue;
            }
            let name = format!("{topic}.{partition}");
            let state_path = self.dir.join(format!("{name}.state"));
            let inode = inode_of(&path);
            let saved = State::load(&state_path);
            let lateness = self.settings.lateness.as_nanos() as u64;
            let (next, builder) = match saved {
                Some(s) if s.inode == inode => (
                    s.resume,
                    BarBuilder::new(lateness, s.closed_through, s.watermark),
                ),
                Some(s) => {
                    // The journal was made anew (its ring was): read it
                    // from its start, keeping what was closed closed.
                    tracing::info!(dir = %path.display(), "bars: the journal was replaced; building from its oldest event");
                    (0, BarBuilder::new(lateness, s.closed_through, s.watermark))
                }
                None => (0, BarBuilder::new(lateness, 0, 0)),
            };
            self.parts.insert(
                path.clone(),
                Part {
                    topic: topic.to_string(),
                    partition,
                    journal: path,
                    state_path,
                    reader: None,
                    builder,
                    next,
                    inode,
                    pending: Vec::new(),
                    last_event: Instant::now(),
                    warned: None,
                    dirty: true,
                    published: None,
                },
            );
        }
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        self.parts.retain(|k, p| {
            let keep = seen.contains(k);
            if !keep && let Some(t) = book.get_mut(&p.topic) {
                t.remove(&p.partition);
            }
            keep
        });
        book.retain(|_, t| !t.is_empty());
    }

    /// Deletes bars older than `keep` from every bar file ([`SWEEP`]ly, on
    /// this thread: it is the only writer of the files).
    fn sweep(&self, keep: Duration, stop: &AtomicBool) {
        let before = tickwire_proto::bars::Interval::M1
            .bucket(realtime_ns().saturating_sub(keep.as_nanos() as u64));
        let slack = keep.as_nanos() as u64 / 8;
        let (mut files, mut bars, mut failed) = (0u64, 0u64, 0u64);
        let topics = std::fs::read_dir(&self.dir).into_iter().flatten().flatten();
        let files_of = |topic: std::fs::DirEntry| {
            std::fs::read_dir(topic.path())
                .into_iter()
                .flatten()
                .flatten()
        };
        let all = topics
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .flat_map(files_of);
        // Stopping ends the sweep between files; what it did is still counted.
        for e in all.take_while(|_| !stop.load(Ordering::Acquire)) {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "bars") {
                continue;
            }
            match BarFile::expire(&path, before, slack) {
                Ok(0) => {}
                Ok(n) => {
                    files += 1;
                    bars += n;
                }
                Err(err) => {
                    failed += 1;
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(file = %path.display(), error = %err, "bars: old bars not deleted");
                }
            }
        }
        self.counters.expired.fetch_add(bars, Ordering::Relaxed);
        if bars > 0 || failed > 0 {
            tracing::info!(files, bars, failed, retention = %humantime::format_duration(keep), "bars past the retention deleted");
        }
    }

    fn warn(&self, p: &mut Part, what: &str, err: &dyn std::fmt::Display) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        if p.warned
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            p.warned = Some(Instant::now());
            tracing::warn!(journal = %p.journal.display(), error = %err, "bars: {what}");
        }
    }

    /// Reads up to [`SLICE`] events of one partition and closes what it
    /// can. True when it read something.
    fn step(&self, p: &mut Part) -> bool {
        if p.reader.is_none() {
            match JournalReader::open(&p.journal) {
                Ok(r) => p.reader = r,
                Err(e) => {
                    self.warn(p, "cannot open the journal", &e);
                    return false;
                }
            }
        }
        let Some(reader) = p.reader.as_mut() else {
            return false;
        };
        if p.next == 0 {
            if let Err(e) = reader.refresh() {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(journal = %p.journal.display(), error = %e, "bars: cannot list the journal");
                return false;
            }
            match reader.oldest() {
                Some(s) => p.next = s,
                None => return false,
            }
        }
        let max_ns = realtime_ns().saturating_add(self.settings.max_skew.as_nanos() as u64);
        let start = p.next;
        let mut caught_up = false;
        let mut err: Option<tickwire_proto::Error> = None;
        let (mut events, mut late, mut future) = (0u64, 0u64, 0u64);
        while p.next - start < SLICE {
            match reader.load(p.next) {
                Ok(JournalRead::Frame) => {
                    for f in reader.buffered(p.next) {
                        let Ok(words) = <&[u64; BODY_WORDS]>::try_from(&f[1..]) else {
                            break;
                        };
                        let body = ArchivedFrameBody::from_words(words);
                        if let Some(e) = bar_input(p.next, body) {
                            match p.builder.fold(&e, max_ns) {
                                Folded::Bar => events += 1,
                                Folded::Late => late += 1,
                                Folded::Future => future += 1,
                            }
                        }
                        p.next += 1;
                    }
                }
                Ok(JournalRead::End) => {
                    // New segments (and retention's deletions) show up on a refresh.
                    if let Err(e) = reader.refresh() {
                        err = Some(e);
                    }
                    match reader.load(p.next) {
                        Ok(JournalRead::End) | Err(_) => {
                            caught_up = true;
                            break;
                        }
                        Ok(_) => continue,
                    }
                }
                Ok(JournalRead::Missing { to }) => {
                    tracing::info!(journal = %p.journal.display(), from = p.next, to, "bars: events no longer journaled are left out of the bars");
                    p.next = to + 1;
                }
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        self.counters.events.fetch_add(events, Ordering::Relaxed);
        self.counters.late.fetch_add(late, Ordering::Relaxed);
        self.counters.future.fetch_add(future, Ordering::Relaxed);
        if let Some(e) = err {
            // A corrupt frame in an older segment: it cannot be read past.
            self.warn(p, "cannot read the journal", &e);
        }
        if p.next > start {
            p.last_event = Instant::now();
            p.dirty = true;
        }
        // The clock closes minutes only of a partition that has read all
        // there is and then had nothing for the lateness: a source that is
        // merely slow (a backlog trickling in) is closed by event time.
        let idle = caught_up && p.last_event.elapsed() >= self.settings.lateness;
        let closed = p.builder.close(idle.then(realtime_ns));
        p.pending.extend(closed);
        if !p.pending.is_empty() {
            self.write(p);
        } else if p.dirty && p.published.is_none_or(|t| t.elapsed() >= PUBLISH) {
            self.publish(p);
        }
        p.next > start
    }

    /// Publishes the partition's open minutes (and bars it could not
    /// write) for readers ([`Bars::open_minutes`]).
    fn publish(&self, p: &mut Part) {
        let open = Arc::new(p.builder.open_minutes(&p.pending));
        self.book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(p.topic.clone())
            .or_default()
            .insert(p.partition, open);
        p.dirty = false;
        p.published = Some(Instant::now());
    }

    /// Writes closed bars, syncs them, publishes the open minutes, then
    /// saves the partition's state.
    /// Bars that could not be written (a full disk) stay pending and are
    /// tried again at the next step; the state is saved only once none
    /// is, so a restart builds them again from the journal.
    fn write(&self, p: &mut Part) {
        let mut failed = None;
        let pending = std::mem::take(&mut p.pending);
        for (inst, bar) in pending {
            let path = bar_path(&self.dir, &p.topic.replace('~', "/"), inst, p.partition);
            let r = BarFile::create(&path, inst).and_then(|mut f| {
                f.put(&bar)?;
                f.sync()
            });
            match r {
                Ok(()) => {
                    self.counters.bars.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    p.pending.push((inst, bar));
                    failed = Some(e);
                }
            }
        }
        // Readers now take the written minutes from the store; only then
        // is the state (and so `complete_through`) moved past them.
        self.publish(p);
        if let Some(e) = failed {
            self.warn(p, "cannot write bars", &e);
            return;
        }
        let state = State {
            resume: p.builder.resume_seq(p.next),
            closed_through: p.builder.closed_through(),
            watermark: p.builder.watermark(),
            inode: p.inode,
        };
        if let Err(e) = state.save(&p.state_path) {
            let msg = format!("{}: {e}", p.state_path.display());
            self.warn(p, "cannot save the bar state", &msg);
        }
    }
}

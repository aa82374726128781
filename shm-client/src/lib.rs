//! Read tickwire market data straight out of shared memory.
//!
//! A [`Subscriber`] maps a topic's partition rings from a node directory
//! (default `/dev/shm/tickwire/default`) and hands you each event as a
//! reference into one 64-byte copy: no allocation, no syscall and no other
//! copy on the hot path. When you fall behind you learn exactly which
//! sequence numbers you missed ([`Event::Gap`]); a tethered subscriber holds
//! the writer back (at most its budget) instead of losing anything.
//!
//! ```
//! # let dir = tempfile::tempdir()?;
//! # let mut feed = shm_client::testing::TopicWriter::create(dir.path(), "market-data/normalized/equities", 1, 1024)?;
//! # feed.publish_trade(0, "AAPL", "NASDAQ", "USD", 150.25, 100)?;
//! # feed.flush();
//! use shm_client::{Event, Start, Subscriber};
//!
//! let mut sub = Subscriber::builder("market-data/normalized/equities")
//!     .node_dir(dir.path())          // default: $TICKWIRE_NODE_DIR or /dev/shm/tickwire/default
//!     .start(Start::Earliest)
//!     .open()?;
//! sub.poll(1024, |event| match event {
//!     Event::Tick(t) => println!("{} {:?} @ {:?}", t.seq, t.symbol(), t.price()),
//!     Event::Gap { partition, from, to } => eprintln!("lost {from}..={to} on partition {partition}"),
//!     other => eprintln!("{other:?}"), // untethered, writer closed or replaced
//! });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod filter;
pub mod group;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use filter::Filter;
use filter::{CompiledFilter, KeyMask};
use tickwire_proto::file::{
    FileStatus, PartitionReader, StartAt, partition_paths, ring_file_name, topic_partitions,
};
use tickwire_proto::frame::BODY_WORDS;
use tickwire_proto::journal::{JournalRead, JournalReader};
use tickwire_proto::ring::{Read, Tether};
pub use tickwire_proto::symbology::{Entry, Symbology};
pub use tickwire_proto::{ArchivedFrameBody, FrameBody, Kind};
use tickwire_proto::{frame, futex};

/// Where a subscriber starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// After the last published event: only what comes next.
    #[default]
    Latest,
    /// The oldest event kept: the journal's oldest when the node keeps a
    /// journal (`<node dir>/journal`), else the oldest still in each ring.
    /// What is replayed from the journal joins the live ring with no gap
    /// and no duplicate.
    Earliest,
    /// At this sequence number on every partition: from the journal when
    /// it has left the ring. A sequence neither holds yields an
    /// [`Event::Gap`] with the exact range, and reading goes on after it.
    Sequence(u64),
    /// The oldest event still in each ring, never the journal's older
    /// ones (what a reader that wants recent history and then live wants,
    /// such as a latest-value table).
    RingEarliest,
    /// At the first event (in sequence order) whose event time is at or
    /// after this UTC time in nanoseconds, per partition: found through the
    /// journal's time index, then in the ring; Latest when every event
    /// kept is older.
    Time(u64),
}

/// How [`Subscriber::recv`] waits when nothing is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Spin on the next slot: lowest latency, one core at 100%.
    BusySpin,
    /// Spin `spins` times, then `sched_yield` between looks.
    SpinThenYield {
        /// Spins before yielding.
        spins: u32,
    },
    /// Spin `spins` times, then block on the ring's futex; the writer wakes
    /// blocked readers at most once per batch.
    Futex {
        /// Spins before blocking.
        spins: u32,
    },
}

impl Default for WaitStrategy {
    fn default() -> Self {
        WaitStrategy::Futex { spins: 2_000 }
    }
}

/// Errors opening a subscriber.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A ring or symbology file is missing, foreign, corrupt or incompatible.
    #[error(transparent)]
    Shm(#[from] tickwire_proto::Error),
    /// The topic has no rings in the node directory.
    #[error(
        "topic {topic:?} has no rings in {dir} (is the broker running with this topic and node directory?)"
    )]
    NoSuchTopic {
        /// Topic.
        topic: String,
        /// Node directory.
        dir: PathBuf,
    },
    /// A requested partition does not exist.
    #[error("topic {topic:?} has {partitions} partitions; partition {partition} does not exist")]
    NoSuchPartition {
        /// Topic.
        topic: String,
        /// Partition count.
        partitions: u32,
        /// Asked for.
        partition: u32,
    },
    /// The ring holds frames of another size than this client reads.
    #[error("{path}: slot size {slot_size} is not the 64-byte tick slot this subscriber reads")]
    SlotSize {
        /// Ring file.
        path: PathBuf,
        /// Its slot size.
        slot_size: u32,
    },
    /// A filter is invalid.
    #[error("invalid filter: {0}")]
    Filter(String),
    /// The filter names symbols or venues, and the node's symbology table
    /// (which maps them to instrument ids) cannot be read.
    #[error("the filter needs the node's symbology table, which cannot be used: {0}")]
    Symbology(String),
    /// A subscription group could not be joined, or refused an
    /// acknowledgement.
    #[error("subscription group: {0}")]
    Group(String),
}

/// One event, in order per partition. More kinds may come in later
/// versions: match with a `_` arm.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A trade or a quote.
    Tick(Tick<'a>),
    /// Sequences `from..=to` of `partition` were overwritten before this
    /// subscriber read them; reading continues at `to + 1`.
    Gap {
        /// Partition.
        partition: u32,
        /// First lost sequence.
        from: u64,
        /// Last lost sequence.
        to: u64,
    },
    /// The writer stopped waiting for this tethered subscriber on
    /// `partition` (it held the writer longer than its budget); from now on
    /// it may be lapped there, which shows as a `Gap`.
    Untethered {
        /// Partition.
        partition: u32,
    },
    /// The partition's writer is gone and this subscriber has read
    /// everything it committed: it closed the stream gracefully
    /// ([`CloseReason::EndOfStream`]) or died ([`CloseReason::WriterDied`]).
    /// Reading goes on if a writer opens the same ring again (a broker
    /// restart on the same node directory): the sequence continues under a
    /// new epoch, and [`Event::Reopened`] says so.
    Closed {
        /// Partition.
        partition: u32,
        /// How the writer went.
        reason: CloseReason,
    },
    /// A writer opened the ring again after [`Event::Closed`].
    Reopened {
        /// Partition.
        partition: u32,
        /// The new writer's epoch.
        epoch: u64,
    },
    /// The topic grew: this subscriber (of all partitions) now reads
    /// `partition` too, from its first event. Comes before any of its events.
    PartitionAdded {
        /// The new partition.
        partition: u32,
        /// Its writer's epoch.
        epoch: u64,
    },
    /// The ring file this subscriber maps was removed, or replaced by a new
    /// ring (the node directory was deleted and the broker started again):
    /// nothing more will ever arrive on this mapping. Open a new subscriber.
    Replaced {
        /// Partition.
        partition: u32,
        /// Removed (nothing at the path) or replaced (another file there).
        removed: bool,
    },
}

/// Why a partition's writer is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The writer marked the end of the stream (a graceful shutdown).
    EndOfStream,
    /// The writer died: its lock is gone but it never marked the end.
    WriterDied,
}

/// A trade or quote, borrowed from the subscriber's one-slot copy.
#[derive(Clone, Copy)]
pub struct Tick<'a> {
    /// Partition it was read from.
    pub partition: u32,
    /// Its sequence number in that partition.
    pub seq: u64,
    /// The frame body, in its archived (wire) layout.
    pub body: &'a ArchivedFrameBody,
    /// How many times a subscription group delivered this event to a
    /// member before (one that died, left or was removed without
    /// acknowledging it); 0 outside groups.
    pub redeliveries: u32,
    symbology: Option<&'a Symbology>,
}

impl std::fmt::Debug for Tick<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tick")
            .field("partition", &self.partition)
            .field("seq", &self.seq)
            .field("body", self.body)
            .finish()
    }
}

impl<'a> Tick<'a> {
    /// Trade or quote (`None` for a kind this version does not know).
    pub fn kind(&self) -> Option<Kind> {
        self.body.kind()
    }
    /// The instrument's symbology entry.
    pub fn instrument(&self) -> Option<&'a Entry> {
        self.symbology?.get(self.body.instrument_id())
    }
    /// The symbol, if the instrument resolves.
    pub fn symbol(&self) -> Option<&'a str> {
        self.instrument().map(Entry::symbol)
    }
    /// Trade price or bid price as a decimal.
    pub fn price(&self) -> Option<f64> {
        frame::price_to_f64(self.body.px_a())
    }
    /// Ask price as a decimal (quotes).
    pub fn ask_price(&self) -> Option<f64> {
        frame::price_to_f64(self.body.px_b())
    }
}

/// Counters a subscriber keeps.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Ticks handed to the caller.
    pub delivered: u64,
    /// Ticks read and dropped by the filter.
    pub filtered: u64,
    /// Gap events.
    pub gaps: u64,
    /// Sequences lost in gaps.
    pub lost: u64,
    /// Times a partition was untethered.
    pub untethered: u64,
    /// Ticks read from the journal (replayed) rather than the ring.
    pub replayed: u64,
    /// Journal frames that could not be read (each also a one-sequence
    /// gap); [`Subscriber::journal_error`] says why.
    pub journal_errors: u64,
    /// Sequences passed over unread because the caller of
    /// [`Subscriber::poll_selected`] wanted none of them.
    pub passed_over: u64,
}

/// What the subscriber last told the caller about a partition's writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterSeen {
    Live,
    Closed,
    Replaced,
}

/// Builds a [`Subscriber`].
#[derive(Debug, Clone)]
pub struct SubscriberBuilder {
    topic: String,
    node_dir: Option<PathBuf>,
    partitions: Option<Vec<u32>>,
    start: Start,
    positions: Vec<(u32, u64)>,
    tether: Option<Duration>,
    filter: Filter,
    wait: WaitStrategy,
    slack: Option<u64>,
    journal_dir: Option<PathBuf>,
    journal_fill: Option<bool>,
    use_journal: bool,
}

/// The node directory a subscriber uses when none is given:
/// `$TICKWIRE_NODE_DIR`, else `/dev/shm/tickwire/default`.
pub fn default_node_dir() -> PathBuf {
    std::env::var_os("TICKWIRE_NODE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(tickwire_proto::file::DEFAULT_SHM_ROOT).join("default"))
}

impl SubscriberBuilder {
    /// The node directory holding the rings.
    pub fn node_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.node_dir = Some(dir.into());
        self
    }
    /// Only these partitions (default: all).
    pub fn partitions(mut self, partitions: impl IntoIterator<Item = u32>) -> Self {
        self.partitions = Some(partitions.into_iter().collect());
        self
    }
    /// Start position for every partition.
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }
    /// Resume one partition at `next_seq` (overrides [`start`](Self::start)
    /// for it), e.g. from [`Subscriber::positions`] saved before a restart.
    pub fn resume_at(mut self, partition: u32, next_seq: u64) -> Self {
        self.positions.push((partition, next_seq));
        self
    }
    /// Lossless: the writer waits for this subscriber, but for at most
    /// `budget` at a time; then it is untethered ([`Event::Untethered`]).
    pub fn tethered(mut self, budget: Duration) -> Self {
        self.tether = Some(budget);
        self
    }
    /// Only events passing `filter`.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }
    /// How [`Subscriber::recv`] waits.
    pub fn wait(mut self, wait: WaitStrategy) -> Self {
        self.wait = wait;
        self
    }
    /// After a lap, resume this many slots past the oldest one still held
    /// (default capacity / 8), so the next read is not lapped at once.
    pub fn lap_slack(mut self, slots: u64) -> Self {
        self.slack = Some(slots);
        self
    }
    /// Where the node's journal is (default `<node dir>/journal`, which the
    /// broker makes a link to wherever it keeps it).
    pub fn journal_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.journal_dir = Some(dir.into());
        self
    }
    /// Read the rings only, never the journal: Earliest is the oldest event
    /// each ring holds, and a sequence that has left the ring is a gap.
    pub fn ring_only(mut self) -> Self {
        self.use_journal = false;
        self
    }
    /// When the ring laps this subscriber, read what it missed from the
    /// journal instead of reporting a gap (it keeps replaying from disk
    /// until it catches up with the ring). Default: on for starts in the
    /// past (Earliest, a sequence, a time), off for Latest, whose readers
    /// usually want the newest data and an exact gap notice.
    pub fn journal_fill(mut self, on: bool) -> Self {
        self.journal_fill = Some(on);
        self
    }

    /// Maps the rings and registers a reader slot on each partition. A
    /// partition whose files are not there yet (a broker that is creating
    /// them) is waited for, up to a second.
    ///
    /// # Errors
    /// [`Error::NoSuchTopic`] if the node directory has no rings for the
    /// topic; [`Error::NoSuchPartition`]; [`Error::Shm`] for a file that is
    /// missing, corrupt, of an unknown major version, or (tethered) a ring
    /// whose reader slots are all taken; [`Error::Filter`].
    pub fn open(self) -> Result<Subscriber, Error> {
        let dir = self.node_dir.clone().unwrap_or_else(default_node_dir);
        let Some(count) = topic_partitions(&dir, &self.topic)? else {
            return Err(Error::NoSuchTopic {
                topic: self.topic.clone(),
                dir,
            });
        };
        let wanted: Vec<u32> = self
            .partitions
            .clone()
            .unwrap_or_else(|| (0..count).collect());
        let (symbology, symbology_error) = match Symbology::open(&dir) {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e)),
        };
        if let Some(e) = &symbology_error
            && self.filter.needs_symbology()
        {
            return Err(Error::Symbology(e.to_string()));
        }
        let filter = CompiledFilter::compile(&self.filter, symbology.as_ref())?;
        let paths = partition_paths(&dir, &self.topic, count);
        let journal_root = self
            .journal_dir
            .clone()
            .unwrap_or_else(|| dir.join("journal"));
        let mut parts = Vec::with_capacity(wanted.len());
        for &p in &wanted {
            let Some(path) = paths.get(p as usize) else {
                return Err(Error::NoSuchPartition {
                    topic: self.topic.clone(),
                    partitions: count,
                    partition: p,
                });
            };
            // A broker that is starting creates the partitions one by one:
            // give the rest a moment to appear after partition 0.
            let mut tries = 0;
            while !path.exists() && tries < 100 {
                std::thread::sleep(Duration::from_millis(10));
                tries += 1;
            }
            parts.push(Part::open(path, p, &self, &journal_root)?);
        }
        let follow = self.partitions.is_none().then(|| Follow {
            dir,
            journal_root,
            builder: self.clone().start(Start::Earliest),
        });
        Ok(Subscriber {
            parts,
            follow,
            next: 0,
            buf: [0; BODY_WORDS],
            filter,
            keys: None,
            symbology,
            symbology_error,
            wait: self.wait,
            stats: Stats::default(),
            last_check: std::time::Instant::now(),
            journal_error: None,
        })
    }
}

struct Part {
    partition: u32,
    reader: PartitionReader,
    stored: u64,
    seen: WriterSeen,
    /// A writer-state event waiting to be delivered on the next poll.
    pending: Option<Found>,
    /// The partition's journal, when the node keeps one and this
    /// subscriber reads from it.
    journal: Option<JournalSide>,
}

/// Replay from the journal, and the switch to the ring by sequence.
struct JournalSide {
    reader: JournalReader,
    /// Reading the journal (else the ring).
    replaying: bool,
    /// While replaying: the next sequence to read from the journal.
    next: u64,
    /// The ring's lap that sent us to the journal, until the journal
    /// delivers its first sequence: if the journal ends right there, it
    /// does not have it either, and the lap is a real gap.
    lap: Option<(u64, u64)>,
    /// Fill laps from the journal.
    fill: bool,
    /// Writer epochs by first sequence, read when first needed.
    epochs: Vec<(u64, u64)>,
}

impl Part {
    fn open(
        path: &Path,
        partition: u32,
        b: &SubscriberBuilder,
        journal_root: &Path,
    ) -> Result<Part, Error> {
        let start = b
            .positions
            .iter()
            .rev()
            .find(|(p, _)| *p == partition)
            .map(|&(_, s)| Start::Sequence(s))
            .unwrap_or(b.start);
        let journal = if b.use_journal {
            JournalReader::open(&tickwire_proto::journal::partition_dir(
                journal_root,
                &b.topic,
                partition,
            ))?
        } else {
            None
        };
        let fill = b.journal_fill.unwrap_or(start != Start::Latest);
        let budget = b.tether.map(|d| d.as_nanos().min(u64::MAX as u128) as u64);
        // A replay starts the ring reader at Latest: its reader slot never
        // holds the writer back while the journal is read.
        let ring_start = match start {
            Start::Latest => StartAt::Latest,
            Start::Earliest if journal.as_ref().and_then(|j| j.oldest()).is_some() => {
                StartAt::Latest
            }
            Start::Earliest | Start::RingEarliest => StartAt::Earliest,
            Start::Sequence(_) | Start::Time(_) => StartAt::Latest,
        };
        let mut reader = PartitionReader::open(path, ring_start, budget, b.slack)?;
        let slot_size = reader.file().statics().slot_size;
        if slot_size as usize != frame::SLOT_SIZE {
            return Err(Error::SlotSize {
                path: path.to_path_buf(),
                slot_size,
            });
        }
        let ring = reader.ring();
        let published = ring.published();
        let oldest = ring.oldest(published);
        let mut side = journal.map(|reader| JournalSide {
            reader,
            replaying: false,
            next: 0,
            lap: None,
            fill,
            epochs: Vec::new(),
        });
        // Where to begin: Some(seq) in the journal, else the ring's cursor.
        let replay_from = match (start, side.as_mut()) {
            (Start::Earliest, Some(j)) => j.reader.oldest(),
            (Start::Sequence(s), Some(_)) if s.max(1) < oldest => Some(s.max(1)),
            (Start::Sequence(s), None) => {
                reader.set_cursor(s.max(1));
                None
            }
            (Start::Sequence(s), Some(_)) => {
                reader.set_cursor(s);
                None
            }
            (Start::Time(t), j) => {
                let found = match j {
                    Some(j) => j.reader.seek_time(t)?,
                    None => None,
                };
                if found.is_none() {
                    let at = first_in_ring_at_or_after(&mut reader, oldest, t);
                    reader.set_cursor(at);
                }
                found
            }
            _ => None,
        };
        if let (Some(seq), Some(j)) = (replay_from, side.as_mut()) {
            j.replaying = true;
            j.next = seq;
        }
        let mut part = Part {
            partition,
            reader,
            stored: 0,
            seen: WriterSeen::Live,
            pending: None,
            journal: side.filter(|j| j.replaying || j.fill),
        };
        part.stored = part.writer_cursor();
        part.reader.store_cursor(part.stored);
        Ok(part)
    }

    /// The next sequence this subscriber reads on the partition.
    fn cursor(&self) -> u64 {
        match &self.journal {
            Some(j) if j.replaying => j.next,
            _ => self.reader.cursor(),
        }
    }

    /// The cursor the ring's writer sees: while replaying from the journal,
    /// past everything published, so a tethered subscriber never holds the
    /// writer back for what it reads from disk.
    fn writer_cursor(&self) -> u64 {
        match &self.journal {
            Some(j) if j.replaying => self.reader.ring().published() + 1,
            _ => self.reader.cursor(),
        }
    }

    fn replaying(&self) -> bool {
        self.journal.as_ref().is_some_and(|j| j.replaying)
    }

    /// Looks at the writer and the file (syscalls: only when idle) and
    /// queues what changed: closed, reopened, replaced.
    fn check_writer(&mut self) {
        if self.pending.is_some() || self.seen == WriterSeen::Replaced {
            return;
        }
        let file = self.reader.file();
        let status = file.status();
        if status != FileStatus::Same {
            self.seen = WriterSeen::Replaced;
            self.pending = Some(Found::Replaced(
                self.partition,
                status == FileStatus::Removed,
            ));
            return;
        }
        let alive = file.writer_alive();
        match (self.seen, alive) {
            (WriterSeen::Live, false) => {
                // Only once everything committed has been read.
                if self.reader.ready() {
                    return;
                }
                let reason = if file.writer_closed() {
                    CloseReason::EndOfStream
                } else {
                    CloseReason::WriterDied
                };
                self.seen = WriterSeen::Closed;
                self.pending = Some(Found::Closed(self.partition, reason));
            }
            (WriterSeen::Closed, true) => {
                self.seen = WriterSeen::Live;
                self.pending = Some(Found::Reopened(self.partition, self.reader.ring().epoch()));
            }
            _ => {}
        }
    }
}

/// A subscriber of all partitions: where to look for partitions the topic
/// grows later, and how to open them (from their first event).
struct Follow {
    dir: PathBuf,
    journal_root: PathBuf,
    builder: SubscriberBuilder,
}

/// A subscription to one topic's partition rings. See the crate docs.
pub struct Subscriber {
    parts: Vec<Part>,
    follow: Option<Follow>,
    next: usize,
    buf: [u64; BODY_WORDS],
    filter: CompiledFilter,
    /// A Key_Shared member's instruments: others' events are passed over.
    keys: Option<KeyMask>,
    symbology: Option<Symbology>,
    symbology_error: Option<tickwire_proto::Error>,
    wait: WaitStrategy,
    stats: Stats,
    last_check: std::time::Instant,
    journal_error: Option<String>,
}

#[derive(Clone, Copy)]
enum Found {
    Tick(u32, u64),
    Gap(u32, u64, u64),
    Untethered(u32),
    Closed(u32, CloseReason),
    Reopened(u32, u64),
    Added(u32, u64),
    Replaced(u32, bool),
}

impl Found {
    fn of(e: &Event<'_>) -> Found {
        match *e {
            Event::Tick(t) => Found::Tick(t.partition, t.seq),
            Event::Gap {
                partition,
                from,
                to,
            } => Found::Gap(partition, from, to),
            Event::Untethered { partition } => Found::Untethered(partition),
            Event::Closed { partition, reason } => Found::Closed(partition, reason),
            Event::Reopened { partition, epoch } => Found::Reopened(partition, epoch),
            Event::PartitionAdded { partition, epoch } => Found::Added(partition, epoch),
            Event::Replaced { partition, removed } => Found::Replaced(partition, removed),
        }
    }

    /// The event, for every kind but a tick (whose body is in the buffer).
    fn notice(self) -> Option<Event<'static>> {
        Some(match self {
            Found::Tick(..) => return None,
            Found::Gap(partition, from, to) => Event::Gap {
                partition,
                from,
                to,
            },
            Found::Untethered(partition) => Event::Untethered { partition },
            Found::Closed(partition, reason) => Event::Closed { partition, reason },
            Found::Reopened(partition, epoch) => Event::Reopened { partition, epoch },
            Found::Added(partition, epoch) => Event::PartitionAdded { partition, epoch },
            Found::Replaced(partition, removed) => Event::Replaced { partition, removed },
        })
    }
}

/// What a selective read does at a sequence (see
/// [`Subscriber::poll_selected`]).
enum Step {
    /// Nothing wanted before this sequence: move there unread.
    PassTo(u64),
    /// Read from here up to (not including) this sequence.
    ReadTo(u64),
}

impl Step {
    /// Asks `want` at `seq`; a pass over stops at `head` (one past what
    /// the writer published). At the head before the next run, one event
    /// is read and the question asked again.
    #[inline]
    fn at<W: FnMut(u32, u64) -> (u64, u64)>(
        want: &mut W,
        partition: u32,
        seq: u64,
        head: u64,
    ) -> Step {
        let (start, end) = want(partition, seq);
        if start <= seq {
            return Step::ReadTo(end.max(seq + 1));
        }
        let to = start.min(head);
        if to > seq {
            Step::PassTo(to)
        } else {
            Step::ReadTo(seq + 1)
        }
    }
}

/// How often an idle subscriber looks at its writers (a few syscalls).
const CHECK_EVERY: Duration = Duration::from_millis(100);

impl Subscriber {
    /// Starts building a subscriber for `topic`.
    pub fn builder(topic: impl Into<String>) -> SubscriberBuilder {
        SubscriberBuilder {
            topic: topic.into(),
            node_dir: None,
            partitions: None,
            start: Start::Latest,
            positions: Vec::new(),
            tether: None,
            filter: Filter::default(),
            wait: WaitStrategy::default(),
            slack: None,
            journal_dir: None,
            journal_fill: None,
            use_journal: true,
        }
    }

    /// Reads up to `max` events, visiting partitions round-robin (each poll
    /// starts one partition further), and calls `f` for each in order. Order
    /// holds within a partition, not across partitions. Cursors are stored
    /// for the writer once per partition per poll. Returns how many events
    /// `f` got; 0 means nothing was there.
    #[inline]
    pub fn poll<F: FnMut(Event<'_>)>(&mut self, max: usize, f: F) -> usize {
        self.poll_selected(max, |_, seq| (seq, u64::MAX), f)
    }

    /// Passes over, unread by the caller, every event whose instrument's
    /// Key_Shared slot is not in `cover` (`None`: none are passed over):
    /// a Key_Shared member's others' keys cost a bit test, not an event.
    /// An instrument the symbology table does not name yet is not passed
    /// over. Counted in [`Stats::passed_over`].
    pub(crate) fn pass_over_slots(&mut self, cover: Option<&group::wire::SlotSet>) {
        self.keys = cover.cloned().map(KeyMask::new);
    }

    /// [`poll`](Self::poll) for a caller that wants only some sequences
    /// (a group member's stripes, a standby's nothing). `want(partition,
    /// seq)` gives the next run the caller may want at or after `seq`,
    /// `(start, end)` (`(u64::MAX, u64::MAX)`: none): `seq..start` is passed
    /// over unread, up to what the writer has published, `start..end` is
    /// read (from the journal, no more than that), and `want` is asked
    /// again at `end`. It never hides a notice, nor a gap in what the
    /// caller wants (a lap reports from the first wanted sequence it
    /// lost); `f` gets every event read, wanted or not, so a run may be
    /// wider than what the caller takes.
    #[inline]
    pub fn poll_selected<W, F>(&mut self, max: usize, mut want: W, mut f: F) -> usize
    where
        W: FnMut(u32, u64) -> (u64, u64),
        F: FnMut(Event<'_>),
    {
        let Subscriber {
            parts,
            next,
            buf,
            filter,
            keys,
            symbology,
            stats,
            journal_error,
            ..
        } = self;
        let n_parts = parts.len();
        let mut n = 0;
        let mut budget = max.saturating_mul(16).max(1024);
        for _ in 0..n_parts {
            let part = &mut parts[*next];
            *next = if *next + 1 == n_parts { 0 } else { *next + 1 };
            if let Some(Found::Added(partition, epoch)) = part.pending {
                part.pending = None;
                n += 1;
                f(Event::PartitionAdded { partition, epoch });
            }
            if part.reader.check_tether() == Tether::Untethered {
                stats.untethered += 1;
                n += 1;
                f(Event::Untethered {
                    partition: part.partition,
                });
            }
            // One tick, from the ring (in `buf`) or the journal (in place).
            macro_rules! tick {
                ($seq:expr, $body:expr) => {{
                    let body = $body;
                    if keys
                        .as_mut()
                        .is_some_and(|k| !k.passes(body.instrument_id(), symbology.as_ref()))
                    {
                        stats.passed_over += 1;
                    } else if filter.matches(body, symbology.as_ref()) {
                        stats.delivered += 1;
                        n += 1;
                        f(Event::Tick(Tick {
                            redeliveries: 0,
                            partition: part.partition,
                            seq: $seq,
                            body,
                            symbology: symbology.as_ref(),
                        }));
                    } else {
                        stats.filtered += 1;
                    }
                }};
            }
            macro_rules! gap {
                ($from:expr, $to:expr) => {{
                    let (from, to) = ($from, $to);
                    stats.gaps += 1;
                    stats.lost += to - from + 1;
                    n += 1;
                    f(Event::Gap {
                        partition: part.partition,
                        from,
                        to,
                    });
                }};
            }
            // The caller's current run: read to its end without asking.
            let mut run_end = 0u64;
            while n < max && budget > 0 {
                if let Some(j) = part.journal.as_mut().filter(|j| j.replaying) {
                    let seq = j.next;
                    if seq >= run_end {
                        // Never past the ring's head, where the replay ends
                        // by joining the ring.
                        let head = part.reader.ring().published() + 1;
                        match Step::at(&mut want, part.partition, seq, head) {
                            Step::PassTo(to) => {
                                budget -= 1;
                                stats.passed_over += to - seq;
                                j.next = to;
                                continue;
                            }
                            Step::ReadTo(end) => run_end = end,
                        }
                    }
                    match j.reader.load_at_most(seq, run_end - seq) {
                        Ok(JournalRead::Frame) => {
                            // The block's checked frames, read in place.
                            let mut k = 0;
                            for fr in j.reader.buffered(seq) {
                                if n >= max || budget == 0 {
                                    break;
                                }
                                // The end of the caller's run: the outer
                                // loop asks it again.
                                if seq + k >= run_end {
                                    break;
                                }
                                budget -= 1;
                                let Ok(words) = <&[u64; BODY_WORDS]>::try_from(&fr[1..]) else {
                                    break;
                                };
                                tick!(seq + k, ArchivedFrameBody::from_words(words));
                                k += 1;
                            }
                            if k == 0 {
                                budget = budget.saturating_sub(1);
                            }
                            j.next = seq + k;
                            j.lap = None;
                            stats.replayed += k;
                        }
                        Ok(JournalRead::Missing { to }) => {
                            budget -= 1;
                            j.next = to + 1;
                            gap!(seq, to);
                        }
                        Ok(JournalRead::End) => {
                            budget -= 1;
                            j.replaying = false;
                            match j.lap.take() {
                                // Neither the ring nor the journal has it
                                // (no journal is being written): the gap
                                // the ring reported, and on from there.
                                Some((from, to)) if from == seq => {
                                    part.reader.set_cursor(to + 1);
                                    gap!(from, to);
                                }
                                // Join the ring by sequence: it holds `seq`
                                // unless the writer has moved on since,
                                // which reads as a lap and sends us back.
                                _ => part.reader.set_cursor(seq),
                            }
                        }
                        Err(e) => {
                            // A frame that cannot be read is reported as the
                            // exact one-sequence gap it is, and why.
                            budget -= 1;
                            j.next = seq + 1;
                            stats.journal_errors += 1;
                            *journal_error = Some(e.to_string());
                            gap!(seq, seq);
                        }
                    }
                    continue;
                }
                budget -= 1;
                let at = part.reader.cursor();
                if at >= run_end {
                    let head = part.reader.ring().published() + 1;
                    match Step::at(&mut want, part.partition, at, head) {
                        Step::PassTo(to) => {
                            stats.passed_over += to - at;
                            part.reader.set_cursor(to);
                            continue;
                        }
                        Step::ReadTo(end) => run_end = end,
                    }
                }
                match part.reader.try_read(buf) {
                    Read::Frame(seq) => tick!(seq, ArchivedFrameBody::from_words(buf)),
                    Read::Empty => {
                        if let Some(e) = part.pending.take().and_then(Found::notice) {
                            n += 1;
                            f(e);
                        }
                        break;
                    }
                    Read::Lapped { from, to } => {
                        if let Some(j) = part.journal.as_mut().filter(|j| j.fill) {
                            // What the ring no longer holds, the journal does.
                            j.replaying = true;
                            j.next = from;
                            j.lap = Some((from, to));
                            continue;
                        }
                        gap!(from, to);
                    }
                }
            }
            let c = part.writer_cursor();
            if c != part.stored {
                part.stored = c;
                part.reader.store_cursor(c);
            }
            if n >= max {
                break;
            }
        }
        n
    }

    fn next_found(&mut self) -> Option<Found> {
        let mut found = None;
        self.poll_found(&mut found);
        found
    }

    fn poll_found(&mut self, out: &mut Option<Found>) {
        // One event at most; the body stays in `self.buf`.
        let mut got: Option<Found> = None;
        self.poll(1, |e| got = Some(Found::of(&e)));
        *out = got;
    }

    fn event(&self, found: Found) -> Event<'_> {
        match found {
            Found::Tick(partition, seq) => Event::Tick(Tick {
                redeliveries: 0,
                partition,
                seq,
                body: ArchivedFrameBody::from_words(&self.buf),
                symbology: self.symbology.as_ref(),
            }),
            other => match other.notice() {
                Some(e) => e,
                None => unreachable!("only ticks have no notice"),
            },
        }
    }

    /// Looks at every partition's writer and file (a few syscalls each):
    /// whether the writer closed the stream, died, came back, or the ring
    /// was removed or replaced. What changed is delivered by the next
    /// [`poll`](Self::poll) as [`Event::Closed`], [`Event::Reopened`] or
    /// [`Event::Replaced`], after every event committed before it.
    /// [`recv`](Self::recv), [`recv_timeout`](Self::recv_timeout) and
    /// [`wait_for_data`](Self::wait_for_data) call it when idle (every
    /// 100 ms); a caller that only polls calls it itself when idle. `poll`
    /// never makes a syscall.
    pub fn check_writers(&mut self) {
        self.last_check = std::time::Instant::now();
        for p in &mut self.parts {
            p.check_writer();
        }
        self.follow_growth();
    }

    /// A subscriber of all partitions takes on partitions the topic grew,
    /// announced by [`Event::PartitionAdded`]. A ring that cannot be opened
    /// yet is tried again at the next check.
    fn follow_growth(&mut self) {
        let Some(follow) = &self.follow else { return };
        loop {
            let partition = self.parts.len() as u32;
            let path = follow
                .dir
                .join(ring_file_name(&follow.builder.topic, partition));
            if !path.exists() {
                return;
            }
            let Ok(mut part) = Part::open(&path, partition, &follow.builder, &follow.journal_root)
            else {
                return;
            };
            part.pending = Some(Found::Added(partition, part.reader.ring().epoch()));
            self.parts.push(part);
        }
    }

    /// Whether any partition has an event waiting: data or a writer notice.
    fn anything_ready(parts: &[Part]) -> bool {
        parts
            .iter()
            .any(|p| p.replaying() || p.reader.ready() || p.pending.is_some())
    }

    /// The next event, if one is there now.
    pub fn try_recv(&mut self) -> Option<Event<'_>> {
        let found = self.next_found()?;
        Some(self.event(found))
    }

    /// The next event, waiting for it with the configured [`WaitStrategy`].
    pub fn recv(&mut self) -> Event<'_> {
        loop {
            if let Some(found) = self.next_found() {
                return self.event(found);
            }
            self.wait_for_data(Duration::from_millis(100));
        }
    }

    /// The next event, or `None` after `timeout` with nothing.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Event<'_>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(found) = self.next_found() {
                return Some(self.event(found));
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            self.wait_for_data((deadline - now).min(Duration::from_millis(100)));
        }
    }

    /// Waits, per the strategy, until some partition may have data or
    /// `timeout` passes. Spurious returns are possible.
    pub fn wait_for_data(&mut self, timeout: Duration) {
        if self.last_check.elapsed() >= CHECK_EVERY {
            self.check_writers();
        }
        let ready = Self::anything_ready;
        let timeout = timeout.min(CHECK_EVERY);
        // Without a reader slot (no write access to the reader state) the
        // futex cannot be armed: nobody would wake us. Sleep-poll instead,
        // 50 us doubling to 1 ms, so an idle read-only reader costs no CPU.
        if let WaitStrategy::Futex { spins } = self.wait
            && !self.parts.iter().all(|p| p.reader.is_registered())
        {
            for _ in 0..spins {
                if ready(&self.parts) {
                    return;
                }
                std::hint::spin_loop();
            }
            let end = std::time::Instant::now() + timeout;
            let mut nap = Duration::from_micros(50);
            while !ready(&self.parts) && std::time::Instant::now() < end {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(1));
            }
            return;
        }
        match self.wait {
            WaitStrategy::BusySpin => {
                let end = std::time::Instant::now() + timeout;
                while !ready(&self.parts) && std::time::Instant::now() < end {
                    for _ in 0..64 {
                        std::hint::spin_loop();
                    }
                }
            }
            WaitStrategy::SpinThenYield { spins } => {
                for _ in 0..spins {
                    if ready(&self.parts) {
                        return;
                    }
                    std::hint::spin_loop();
                }
                let end = std::time::Instant::now() + timeout;
                while !ready(&self.parts) && std::time::Instant::now() < end {
                    std::thread::yield_now();
                }
            }
            WaitStrategy::Futex { spins } => {
                for _ in 0..spins {
                    if ready(&self.parts) {
                        return;
                    }
                    std::hint::spin_loop();
                }
                // Flags each ring's waiter word (SeqCst: pairs with the
                // writer's SeqCst fence between its commit and its look at
                // the flag, so either it sees our flag or we see its commit
                // below).
                for p in &self.parts {
                    p.reader.arm_wait();
                }
                if ready(&self.parts) {
                    return;
                }
                futex::wait_any(
                    self.parts.iter().filter_map(|p| p.reader.wait_word()),
                    timeout.as_nanos().min(u64::MAX as u128) as u64,
                );
            }
        }
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// (partition, next sequence) for each partition: save them to resume
    /// later with [`SubscriberBuilder::resume_at`].
    pub fn positions(&self) -> Vec<(u32, u64)> {
        self.parts
            .iter()
            .map(|p| (p.partition, p.cursor()))
            .collect()
    }

    /// The reader slot this subscriber holds on `partition`, when it holds
    /// one: (its index, the slot). A subscription group member publishes
    /// its acknowledged cursor there.
    pub fn reader_slot(
        &self,
        partition: u32,
    ) -> Option<(usize, &tickwire_proto::layout::ReaderSlot)> {
        self.parts
            .iter()
            .find(|p| p.partition == partition)?
            .reader
            .slot()
    }

    /// The next sequence this subscriber reads on `partition`.
    pub fn position(&self, partition: u32) -> Option<u64> {
        self.parts
            .iter()
            .find(|p| p.partition == partition)
            .map(Part::cursor)
    }

    /// The partitions this subscriber reads.
    pub fn partitions(&self) -> Vec<u32> {
        self.parts.iter().map(|p| p.partition).collect()
    }

    /// Events published but not yet read, summed over partitions (as of the
    /// writer's last batch).
    pub fn lag(&self) -> u64 {
        self.parts
            .iter()
            .map(|p| (p.reader.ring().published() + 1).saturating_sub(p.cursor()))
            .sum()
    }

    /// The writer epoch of a partition (bumped on every broker restart);
    /// with the sequence it forms the message id.
    pub fn epoch(&self, partition: u32) -> Option<u64> {
        self.parts
            .iter()
            .find(|p| p.partition == partition)
            .map(|p| p.reader.ring().epoch())
    }

    /// The epoch of the writer that committed `seq` on `partition` (the
    /// message id's epoch): from the journal's records for replayed
    /// events, else the ring's current writer.
    pub fn epoch_of(&mut self, partition: u32, seq: u64) -> Option<u64> {
        let p = self.parts.iter_mut().find(|p| p.partition == partition)?;
        let ring = p.reader.ring();
        if seq >= ring.epoch_start_seq() {
            return Some(ring.epoch());
        }
        let j = p.journal.as_mut()?;
        if let Some(e) = tickwire_proto::journal::epoch_of(&j.epochs, seq) {
            return Some(e);
        }
        j.epochs = tickwire_proto::journal::read_epochs(j.reader.dir());
        tickwire_proto::journal::epoch_of(&j.epochs, seq)
    }

    /// The writer epochs of `partition` as (first sequence, epoch), oldest
    /// first: the journal's records and the ring's current writer. Look a
    /// sequence up with [`tickwire_proto::journal::epoch_of`].
    pub fn epochs(&mut self, partition: u32) -> Vec<(u64, u64)> {
        let Some(p) = self.parts.iter_mut().find(|p| p.partition == partition) else {
            return Vec::new();
        };
        let ring = p.reader.ring();
        let current = (ring.epoch_start_seq(), ring.epoch());
        let mut out = match p.journal.as_mut() {
            Some(j) => {
                if j.epochs.last().is_none_or(|&(_, e)| e != current.1) {
                    j.epochs = tickwire_proto::journal::read_epochs(j.reader.dir());
                }
                j.epochs.clone()
            }
            None => Vec::new(),
        };
        if out.last().is_none_or(|&(_, e)| e != current.1) {
            out.push(current);
        }
        out
    }

    /// Whether `partition` is being replayed from the journal now.
    pub fn replaying(&self, partition: u32) -> bool {
        self.parts
            .iter()
            .any(|p| p.partition == partition && p.replaying())
    }

    /// Why the last journal frame could not be read, if one could not.
    pub fn journal_error(&self) -> Option<&str> {
        self.journal_error.as_deref()
    }

    /// The symbology table, when the node has one.
    pub fn symbology(&self) -> Option<&Symbology> {
        self.symbology.as_ref()
    }

    /// How many instruments in the node's symbology pass the filter's
    /// symbol, exchange and currency lists now (`None` when the filter has
    /// none): 0 means nothing can arrive until such an instrument appears.
    pub fn matching_instruments(&mut self) -> Option<u32> {
        self.filter.matching_instruments(self.symbology.as_ref())
    }

    /// How many of the subscribed partitions have a live writer now (a
    /// syscall each).
    pub fn live_writers(&self) -> usize {
        self.parts
            .iter()
            .filter(|p| p.reader.file().writer_alive())
            .count()
    }

    /// (partition, last published sequence) for each partition.
    pub fn published(&self) -> Vec<(u32, u64)> {
        self.parts
            .iter()
            .map(|p| (p.partition, p.reader.ring().published()))
            .collect()
    }

    /// Why the symbology table could not be opened (missing, corrupt, of
    /// another version), if it could not: ticks then carry no symbols.
    pub fn symbology_error(&self) -> Option<&tickwire_proto::Error> {
        self.symbology_error.as_ref()
    }

    /// The ring file of a partition (for tools).
    pub fn ring_path(&self, partition: u32) -> Option<&Path> {
        self.parts
            .iter()
            .find(|p| p.partition == partition)
            .map(|p| p.reader.file().path())
    }
}

/// The first sequence in the ring from `oldest` whose event time is at or
/// after `t`, else the next one to be written (Latest). The
/// reader's cursor is left anywhere: the caller sets it.
fn first_in_ring_at_or_after(reader: &mut PartitionReader, oldest: u64, t: u64) -> u64 {
    let mut buf = [0u64; BODY_WORDS];
    reader.set_cursor(oldest);
    loop {
        match reader.try_read(&mut buf) {
            Read::Frame(seq) => {
                if ArchivedFrameBody::from_words(&buf).ts_event() >= t {
                    return seq;
                }
            }
            // Lapped while looking: go on from where the ring put us.
            Read::Lapped { .. } => {}
            Read::Empty => return reader.cursor(),
        }
    }
}

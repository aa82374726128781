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
//!     Event::Untethered { partition } => eprintln!("partition {partition}: no longer tethered"),
//! });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod filter;
pub mod testing;

use std::path::{Path, PathBuf};
use std::time::Duration;

use filter::CompiledFilter;
pub use filter::Filter;
use tickwire_proto::file::{FileLiveness, RingFile, partition_paths};
use tickwire_proto::frame::BODY_WORDS;
use tickwire_proto::ring::{Read, ReaderCore, ReaderRegistration, Tether};
pub use tickwire_proto::symbology::{Entry, Symbology};
pub use tickwire_proto::{ArchivedFrameBody, FrameBody, Kind};
use tickwire_proto::{frame, futex};

/// Where a subscriber starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// After the last published event: only what comes next.
    #[default]
    Latest,
    /// The oldest event still in each ring (shared memory holds the last
    /// `capacity` events; older history is the journal's job).
    Earliest,
    /// At this sequence number on every partition. A sequence that has left
    /// the ring yields a [`Event::Gap`] and reading continues from the oldest.
    Sequence(u64),
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
}

/// One event, in order per partition.
#[derive(Debug, Clone, Copy)]
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

    /// Maps the rings and registers a reader slot on each partition.
    ///
    /// # Errors
    /// [`Error::NoSuchTopic`] if the node directory has no rings for the
    /// topic; [`Error::NoSuchPartition`]; [`Error::Shm`] for a file that is
    /// missing, corrupt, of an unknown major version, or (tethered) a ring
    /// whose reader slots are all taken; [`Error::Filter`].
    pub fn open(self) -> Result<Subscriber, Error> {
        let dir = self.node_dir.clone().unwrap_or_else(default_node_dir);
        let first = partition_paths(&dir, &self.topic, 1).remove(0);
        if !first.exists() {
            return Err(Error::NoSuchTopic {
                topic: self.topic.clone(),
                dir,
            });
        }
        let p0 = RingFile::open_reader(&first)?;
        let count = p0.statics().partitions;
        drop(p0);
        let wanted: Vec<u32> = self
            .partitions
            .clone()
            .unwrap_or_else(|| (0..count).collect());
        let symbology = Symbology::open(&dir).ok();
        let filter = CompiledFilter::compile(&self.filter, symbology.as_ref())?;
        let paths = partition_paths(&dir, &self.topic, count);
        let mut parts = Vec::with_capacity(wanted.len());
        for &p in &wanted {
            let Some(path) = paths.get(p as usize) else {
                return Err(Error::NoSuchPartition {
                    topic: self.topic.clone(),
                    partitions: count,
                    partition: p,
                });
            };
            let file = RingFile::open_reader(path)?;
            if file.statics().slot_size as usize != frame::SLOT_SIZE {
                return Err(Error::SlotSize {
                    path: path.clone(),
                    slot_size: file.statics().slot_size,
                });
            }
            parts.push(Part::open(file, p, &self)?);
        }
        Ok(Subscriber {
            parts,
            next: 0,
            buf: [0; BODY_WORDS],
            filter,
            symbology,
            wait: self.wait,
            stats: Stats::default(),
        })
    }
}

struct Part {
    partition: u32,
    // Field order matters: `reg` and `core` borrow the mapping inside
    // `file` and are dropped before it.
    reg: Option<ReaderRegistration<'static, FileLiveness>>,
    core: ReaderCore<'static>,
    stored: u64,
    file: RingFile,
}

impl Part {
    fn open(file: RingFile, partition: u32, b: &SubscriberBuilder) -> Result<Part, Error> {
        // SAFETY: the ring references point into `file`'s mappings, which
        // live at fixed addresses until `file` is dropped; `Part` drops `reg`
        // and `core` before `file` (field order) and never hands out the
        // 'static lifetime.
        let ring = unsafe {
            std::mem::transmute::<
                tickwire_proto::ring::RingRef<'_>,
                tickwire_proto::ring::RingRef<'static>,
            >(file.ring())
        };
        let published = ring.published();
        let oldest = published.saturating_sub(ring.capacity() - 1).max(1);
        let start = b
            .positions
            .iter()
            .rev()
            .find(|(p, _)| *p == partition)
            .map(|&(_, s)| Start::Sequence(s))
            .unwrap_or(b.start);
        let cursor = match start {
            Start::Latest => published + 1,
            Start::Earliest => oldest,
            Start::Sequence(s) => s.max(1),
        };
        let mut core = ReaderCore::new(ring, cursor);
        if let Some(s) = b.slack {
            core.set_slack(s);
        }
        let budget = b.tether.map(|d| d.as_nanos().min(u64::MAX as u128) as u64);
        let reg = ReaderRegistration::claim(
            ring,
            file.liveness(),
            cursor,
            budget.is_some(),
            budget.unwrap_or(0),
            std::process::id() as u64,
        );
        if reg.is_none() && budget.is_some() {
            return Err(Error::Shm(tickwire_proto::Error::ReadersFull {
                path: file.path().to_path_buf(),
                slots: ring.readers().len(),
            }));
        }
        Ok(Part {
            partition,
            reg,
            core,
            stored: cursor,
            file,
        })
    }
}

/// A subscription to one topic's partition rings. See the crate docs.
pub struct Subscriber {
    parts: Vec<Part>,
    next: usize,
    buf: [u64; BODY_WORDS],
    filter: CompiledFilter,
    symbology: Option<Symbology>,
    wait: WaitStrategy,
    stats: Stats,
}

#[derive(Clone, Copy)]
enum Found {
    Tick(u32, u64),
    Gap(u32, u64, u64),
    Untethered(u32),
}

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
        }
    }

    /// Reads up to `max` events, visiting partitions round-robin (each poll
    /// starts one partition further), and calls `f` for each in order. Order
    /// holds within a partition, not across partitions. Cursors are stored
    /// for the writer once per partition per poll. Returns how many events
    /// `f` got; 0 means nothing was there.
    #[inline]
    pub fn poll<F: FnMut(Event<'_>)>(&mut self, max: usize, mut f: F) -> usize {
        let Subscriber {
            parts,
            next,
            buf,
            filter,
            symbology,
            stats,
            ..
        } = self;
        let n_parts = parts.len();
        let mut n = 0;
        let mut budget = max.saturating_mul(16).max(1024);
        for _ in 0..n_parts {
            let part = &mut parts[*next];
            *next = if *next + 1 == n_parts { 0 } else { *next + 1 };
            if let Some(reg) = part.reg.as_mut()
                && reg.check() == Tether::Untethered
            {
                stats.untethered += 1;
                n += 1;
                f(Event::Untethered {
                    partition: part.partition,
                });
            }
            while n < max && budget > 0 {
                budget -= 1;
                match part.core.try_read(buf) {
                    Read::Frame(seq) => {
                        let body = ArchivedFrameBody::from_words(buf);
                        if filter.matches(body, symbology.as_ref()) {
                            stats.delivered += 1;
                            n += 1;
                            f(Event::Tick(Tick {
                                partition: part.partition,
                                seq,
                                body,
                                symbology: symbology.as_ref(),
                            }));
                        } else {
                            stats.filtered += 1;
                        }
                    }
                    Read::Empty => break,
                    Read::Lapped { from, to } => {
                        stats.gaps += 1;
                        stats.lost += to - from + 1;
                        n += 1;
                        f(Event::Gap {
                            partition: part.partition,
                            from,
                            to,
                        });
                    }
                }
            }
            let c = part.core.cursor();
            if c != part.stored {
                part.stored = c;
                if let Some(reg) = &part.reg {
                    reg.store_cursor(c);
                }
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
        self.poll(1, |e| {
            got = Some(match e {
                Event::Tick(t) => Found::Tick(t.partition, t.seq),
                Event::Gap {
                    partition,
                    from,
                    to,
                } => Found::Gap(partition, from, to),
                Event::Untethered { partition } => Found::Untethered(partition),
            })
        });
        *out = got;
    }

    fn event(&self, found: Found) -> Event<'_> {
        match found {
            Found::Tick(partition, seq) => Event::Tick(Tick {
                partition,
                seq,
                body: ArchivedFrameBody::from_words(&self.buf),
                symbology: self.symbology.as_ref(),
            }),
            Found::Gap(partition, from, to) => Event::Gap {
                partition,
                from,
                to,
            },
            Found::Untethered(partition) => Event::Untethered { partition },
        }
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
        let ready = |parts: &[Part]| parts.iter().any(|p| p.core.ready());
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
                for p in &self.parts {
                    // SeqCst: pairs with the writer's SeqCst fence between
                    // its commit and its look at the flag, so either it sees
                    // our flag or we see its commit below.
                    p.core
                        .ring()
                        .waiter_word()
                        .fetch_or(1, std::sync::atomic::Ordering::SeqCst);
                }
                if ready(&self.parts) {
                    return;
                }
                let words = self.parts.iter().map(|p| {
                    let w = p.core.ring().waiter_word();
                    (w, w.load(std::sync::atomic::Ordering::Relaxed) | 1)
                });
                futex::wait_any(words, timeout.as_nanos().min(u64::MAX as u128) as u64);
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
            .map(|p| (p.partition, p.core.cursor()))
            .collect()
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
            .map(|p| (p.core.ring().published() + 1).saturating_sub(p.core.cursor()))
            .sum()
    }

    /// The writer epoch of a partition (bumped on every broker restart);
    /// with the sequence it forms the message id.
    pub fn epoch(&self, partition: u32) -> Option<u64> {
        self.parts
            .iter()
            .find(|p| p.partition == partition)
            .map(|p| p.core.ring().epoch())
    }

    /// The symbology table, when the node has one.
    pub fn symbology(&self) -> Option<&Symbology> {
        self.symbology.as_ref()
    }

    /// The ring file of a partition (for tools).
    pub fn ring_path(&self, partition: u32) -> Option<&Path> {
        self.parts
            .iter()
            .find(|p| p.partition == partition)
            .map(|p| p.file.path())
    }
}

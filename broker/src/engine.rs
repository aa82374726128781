//! The engine: shard threads that own partitions, bounded ingest queues in
//! front of them, and commit completions back to the sources.
//!
//! ```text
//!  source ─ Ingest::try_send ─> ArrayQueue (one per shard, bounded) ─> shard thread
//!     ^                                                                  │ publish into the partition's ring
//!     └──────── completions: ArrayQueue (one per source, bounded) <──────┘ after the batch is flushed
//! ```
//!
//! A full shard queue is returned to the source as [`SendError::QueueFull`]: it must
//! slow down (the Pulsar bridge stops pulling). A source's completion queue
//! is as large as the number of acknowledgeable events it may have in
//! flight, so a shard never waits on a source.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use hdrhistogram::Histogram;
use tickwire_proto::file::{PartitionWriter, RingParams};
use tickwire_proto::frame::{BODY_WORDS, FrameBody, SLOT_SIZE, ingest_delta};
use tickwire_proto::futex::realtime_ns;
use tickwire_proto::symbology::SymbologyWriter;

use crate::config::{Config, IdleStrategy};
use crate::router::{Resolver, Route, RoutingTemplate};
use crate::versioned::Versioned;

/// Errors starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A ring or the symbology file could not be opened.
    #[error(transparent)]
    Shm(#[from] tickwire_proto::Error),
    /// The node directory cannot hold the rings.
    #[error(
        "no space left on device: the rings and symbology need {need} more bytes in {dir}, which has {available} free (a tmpfs such as /dev/shm is sized by its mount options)"
    )]
    NoSpace {
        /// Node directory.
        dir: std::path::PathBuf,
        /// Bytes still to create.
        need: u64,
        /// Bytes free there.
        available: u64,
    },
    /// The journal could not be opened or started.
    #[error("journal: {0}")]
    Journal(String),
    /// A shard thread could not be started.
    #[error("cannot start shard thread {shard}: {source}")]
    Thread {
        /// Shard.
        shard: usize,
        /// Cause.
        source: std::io::Error,
    },
}

/// Why [`Ingest::try_send`] did not take an event. Nothing was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The shard's ingest queue is full.
    #[error("shard {0} ingest queue is full")]
    QueueFull(usize),
    /// The source has as many acknowledgeable events in flight as its
    /// completion queue holds; drain completions first.
    #[error("too many events awaiting commit ({0}); drain completions")]
    InFlight(usize),
    /// The route names a topic or partition this broker does not have (it
    /// came from another broker's resolver). Retrying will not help.
    #[error("route to topic {topic} partition {partition} is not this broker's")]
    UnknownRoute {
        /// Topic index.
        topic: u32,
        /// Partition.
        partition: u32,
    },
}

impl SendError {
    /// Whether waiting and retrying can succeed (the two kinds of backpressure).
    pub fn is_backpressure(&self) -> bool {
        matches!(self, SendError::QueueFull(_) | SendError::InFlight(_))
    }
}

/// A committed event, returned to the source that sent it with an ack token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The source's token.
    pub token: u64,
    /// Topic index.
    pub topic: u32,
    /// Partition.
    pub partition: u32,
    /// Writer epoch of the partition.
    pub epoch: u64,
    /// Sequence the event got.
    pub seq: u64,
    /// Readers registered on the partition's ring (as of the last
    /// housekeeping): the subscribers this event was made available to.
    pub readers: u32,
}

/// The sequence of a completion that releases an in-flight slot without a
/// commit (the event's partition was deleted first); never handed to a
/// source. A real sequence never gets near it.
const ORPHANED: u64 = u64::MAX;

/// Bytes one queued event takes in a shard's ingest queue.
pub const JOB_BYTES: usize = std::mem::size_of::<Job>();

struct Job {
    ring: u32,
    body: [u64; BODY_WORDS],
    /// The frame's ingest time (CLOCK_REALTIME, ns): the one clock read
    /// per event, also the start of the shard's ingest -> commit latency.
    ingest_ns: u64,
    ack: Option<(u32, u64)>,
}

/// What a shard shares with producers and with stats readers. Fields that
/// different threads write sit on their own cache lines: `parked` (the
/// shard writes it, every producer reads it), the per-batch counters (the
/// shard writes them, stats read them), and the queue (its own head and
/// tail are padded inside `ArrayQueue`).
pub(crate) struct ShardShared {
    queue: ArrayQueue<Job>,
    parked: CachePadded<AtomicBool>,
    counters: CachePadded<ShardCounters>,
    thread: OnceLock<std::thread::Thread>,
    latency: Mutex<Histogram<u64>>,
    /// Ring changes (topic created, grown, deleted); `has_commands` is
    /// looked at once per loop.
    commands: Mutex<Vec<ShardCommand>>,
    has_commands: AtomicBool,
}

/// Written by the shard thread only (Relaxed), read by [`Broker::stats`].
#[derive(Default)]
struct ShardCounters {
    events: AtomicU64,
    batches: AtomicU64,
    gate_waits: AtomicU64,
    untethered: AtomicU64,
    reclaimed: AtomicU64,
    /// Completions that could not be handed back: a bug if ever non-zero
    /// (a source's queue holds as many as it may have in flight).
    lost_completions: AtomicU64,
    /// Events for a partition deleted before they reached it: not written.
    orphaned: AtomicU64,
}

/// Where a topic partition lives: its shard, and its ring's index there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) shard: u32,
    pub(crate) ring: u32,
}

/// Where a topic came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicOrigin {
    /// The configuration file.
    Config,
    /// Created at run time (the edge's admin API).
    Runtime,
}

/// One topic as the engine holds it now.
#[derive(Debug, Clone)]
pub struct TopicState {
    /// Name.
    pub name: String,
    /// Partitions now (they can grow, never shrink).
    pub partitions: u32,
    /// Slots per partition ring.
    pub capacity: u64,
    /// Its routing-key template.
    pub template: RoutingTemplate,
    /// Where it came from.
    pub origin: TopicOrigin,
    /// Deleted at run time: the index stays taken, never reused, so a route
    /// to it is refused rather than landing in another topic.
    pub deleted: bool,
    pub(crate) placements: Vec<Placement>,
    /// Reader slots in use per partition, counted at housekeeping.
    pub(crate) readers: Vec<Arc<AtomicU32>>,
    /// Its journal's retention (`None`: the journal's default).
    pub retention: Option<Duration>,
}

/// The node's topics, by topic index. Replaced as a whole when a topic is
/// created, grown or deleted ([`crate::topics::TopicControl`]); every
/// sender sees the change at its next event (one atomic load).
#[derive(Debug, Default)]
pub struct Layout {
    /// Every topic the node has had since start, by index.
    pub topics: Vec<TopicState>,
}

impl Layout {
    /// The index of a live topic by name.
    pub fn index(&self, name: &str) -> Option<u32> {
        self.topics
            .iter()
            .position(|t| !t.deleted && t.name == name)
            .map(|i| i as u32)
    }

    /// A live topic by index.
    pub fn topic(&self, index: u32) -> Option<&TopicState> {
        self.topics.get(index as usize).filter(|t| !t.deleted)
    }

    /// Live topics with their indexes.
    pub fn live(&self) -> impl Iterator<Item = (u32, &TopicState)> {
        self.topics
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.deleted)
            .map(|(i, t)| (i as u32, t))
    }

    #[inline]
    pub(crate) fn placement(&self, topic: u32, partition: u32) -> Option<Placement> {
        self.topic(topic)?
            .placements
            .get(partition as usize)
            .copied()
    }
}

/// A change to a shard's rings, applied between batches.
pub(crate) enum ShardCommand {
    /// Start writing a ring at index `ring`.
    Add {
        ring: u32,
        slot: Box<RingSlot>,
        done: std::sync::mpsc::Sender<()>,
    },
    /// Commit what is queued for ring `ring`, then close it (readers see
    /// the end of the stream) and forget it.
    Remove {
        ring: u32,
        done: std::sync::mpsc::Sender<()>,
    },
}

/// A ring a shard writes.
pub(crate) struct RingSlot {
    pub(crate) topic: u32,
    pub(crate) partition: u32,
    pub(crate) writer: PartitionWriter,
    pub(crate) readers: Arc<AtomicU32>,
}

pub(crate) struct Shared {
    pub(crate) shards: Vec<CachePadded<ShardShared>>,
    /// Topics and where their partitions live.
    pub(crate) layout: Arc<Versioned<Layout>>,
    completions: Mutex<Vec<Arc<ArrayQueue<Completion>>>>,
    sinks: OnceLock<Vec<Arc<ArrayQueue<Completion>>>>,
}

impl Shared {
    /// Hands `cmd` to shard `shard` and wakes it.
    pub(crate) fn command(&self, shard: u32, cmd: ShardCommand) {
        let sh = &self.shards[shard as usize];
        sh.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(cmd);
        sh.has_commands.store(true, Ordering::Release);
        if let Some(t) = sh.thread.get() {
            t.unpark();
        }
    }
}

/// Counters of the whole broker.
#[derive(Debug, Clone, Default)]
pub struct BrokerStats {
    /// Events committed to rings.
    pub events: u64,
    /// Batches flushed.
    pub batches: u64,
    /// Ingest -> commit latency, ns (HDR).
    pub ingest_to_commit: Option<Histogram<u64>>,
    /// Times a shard waited for a tethered reader.
    pub gate_waits: u64,
    /// Tethered readers untethered for exceeding their budget.
    pub untethered: u64,
    /// Dead readers' slots reclaimed.
    pub reclaimed: u64,
    /// Events waiting in shard queues.
    pub queued: usize,
    /// Per live topic: its name and the most reader slots in use on any of
    /// its partitions, as of the last housekeeping (a subscriber takes one
    /// on each partition it reads).
    pub readers: Vec<(String, u32)>,
    /// Completions a shard could not hand back to its source. Always 0
    /// unless there is a bug; logged as an error when it happens.
    pub lost_completions: u64,
    /// Events sent along a route whose partition was deleted before they
    /// reached it (the sender had not yet seen the deletion): not written,
    /// logged, and for a source that acknowledges, never acknowledged (so
    /// its upstream redelivers them).
    pub orphaned: u64,
}

/// A running broker.
pub struct Broker {
    shared: Arc<Shared>,
    resolver: Resolver,
    control: Arc<crate::topics::TopicControl>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    node_dir: std::path::PathBuf,
    config: Config,
    rules: Arc<crate::rules::RuleTable>,
    journal: Option<Arc<crate::journal::Journal>>,
    bars: Option<Arc<crate::bars::Bars>>,
}

impl Broker {
    /// Opens every ring and the symbology file, then starts the shards.
    ///
    /// # Errors
    /// Invalid configuration; a ring held by another writer or created with
    /// other parameters; I/O errors.
    pub fn start(config: &Config) -> Result<Broker, BrokerError> {
        config.validate()?;
        let modes = config.file_modes()?;
        let dir = config.node_dir();
        check_space(config, &dir)?;
        // The journal and bars on disk name instruments by id: a copy of
        // the table beside them keeps the ids through a reboot that empties
        // a tmpfs node directory.
        let keep = config.journal.enabled.then(|| config.journal_dir());
        let symbology = SymbologyWriter::open_kept(
            &dir,
            config.node.symbology_capacity,
            modes,
            keep.as_deref(),
        )?;
        let n_shards = config.shards.count;
        let mut rings: Vec<Vec<Option<RingSlot>>> = (0..n_shards).map(|_| Vec::new()).collect();
        let mut topics = Vec::new();
        let mut next_shard = 0usize;
        for (ti, t) in config.topics.iter().enumerate() {
            // Readers count the partitions on disk: the configuration may
            // grow them, never leave some without a writer.
            if let Some(on_disk) = tickwire_proto::file::topic_partitions(&dir, &t.name)?
                && on_disk > t.partitions
            {
                return Err(BrokerError::Shm(tickwire_proto::Error::Mismatch {
                    path: dir.join(tickwire_proto::file::ring_file_name(&t.name, 0)),
                    what: "partition count",
                    on_disk: on_disk.into(),
                    requested: t.partitions.into(),
                }));
            }
            let mut placements = Vec::new();
            let mut readers = Vec::new();
            for p in 0..t.partitions {
                let w = open_ring(
                    &dir,
                    &RingParams {
                        topic: t.name.clone(),
                        partition: p,
                        partitions: t.partitions,
                        capacity: t.capacity,
                        slot_size: SLOT_SIZE as u32,
                        modes,
                    },
                    keep.as_deref(),
                )?;
                log_ring_open(&t.name, p, &w, t.capacity);
                let shard = next_shard % n_shards;
                next_shard += 1;
                placements.push(Placement {
                    shard: shard as u32,
                    ring: rings[shard].len() as u32,
                });
                let count = Arc::new(AtomicU32::new(0));
                readers.push(count.clone());
                rings[shard].push(Some(RingSlot {
                    topic: ti as u32,
                    partition: p,
                    writer: w,
                    readers: count,
                }));
            }
            topics.push(TopicState {
                name: t.name.clone(),
                partitions: t.partitions,
                capacity: t.capacity,
                template: t.routing_key.clone(),
                origin: TopicOrigin::Config,
                deleted: false,
                placements,
                readers,
                retention: t
                    .retention
                    .as_deref()
                    .and_then(|r| humantime::parse_duration(r).ok()),
            });
        }
        // The journal takes its reader slot on every ring before any shard
        // writes one.
        let journal = if config.journal.enabled {
            let settings = config.journal_settings();
            let j = crate::journal::Journal::new(settings, config.journal.io)?;
            crate::journal::link_from_node_dir(&dir, j.root())?;
            j.start_thread(config.journal.core)?;
            for t in &config.topics {
                let retention = t
                    .retention
                    .as_deref()
                    .and_then(|r| humantime::parse_duration(r).ok());
                for p in 0..t.partitions {
                    let path = dir.join(tickwire_proto::file::ring_file_name(&t.name, p));
                    j.add(j.open_partition(&t.name, p, &path, retention)?);
                }
            }
            Some(Arc::new(j))
        } else {
            None
        };
        let layout = Arc::new(Versioned::new(Layout { topics }));
        let shared = Arc::new(Shared {
            shards: (0..n_shards)
                .map(|_| {
                    CachePadded::new(ShardShared {
                        queue: ArrayQueue::new(config.shards.queue_capacity),
                        parked: CachePadded::new(AtomicBool::new(false)),
                        counters: CachePadded::new(ShardCounters::default()),
                        thread: OnceLock::new(),
                        latency: Mutex::new(new_histogram()),
                        commands: Mutex::new(Vec::new()),
                        has_commands: AtomicBool::new(false),
                    })
                })
                .collect(),
            layout: layout.clone(),
            completions: Mutex::new(Vec::new()),
            sinks: OnceLock::new(),
        });
        let ring_counts: Vec<u32> = rings.iter().map(|r| r.len() as u32).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (i, shard_rings) in rings.into_iter().enumerate() {
            // By id: `get_core_ids` lists only the current mask's cores.
            let core = config.shards.pin.then(|| core_affinity::CoreId {
                id: config.shards.cores.get(i).copied().unwrap_or(i),
            });
            let shard = Shard::new(i, shared.clone(), shard_rings, config, stop.clone());
            let handle = std::thread::Builder::new()
                .name(format!("tickwire-shard-{i}"))
                .spawn(move || {
                    if let Some(c) = core
                        && let Err(why) = pin_to(c.id)
                    {
                        tracing::warn!(shard = i, core = c.id, reason = %why, "could not pin shard; it runs unpinned");
                    }
                    shard.run();
                })
                .map_err(|source| BrokerError::Thread { shard: i, source })?;
            let _ = shared.shards[i].thread.set(handle.thread().clone());
            threads.push(handle);
        }
        tracing::info!(
            node_dir = %dir.display(),
            shards = n_shards,
            topics = config.topics.len(),
            shared_memory_bytes = config.file_bytes(),
            ingest_queue_bytes = config.queue_bytes(),
            "rings open"
        );
        // Bars are built from the journal's files: no ring slot, started last.
        let bars = match &journal {
            Some(_) if config.history.enabled => {
                Some(Arc::new(crate::bars::Bars::start(config.bar_settings())?))
            }
            _ => None,
        };
        let control = Arc::new(crate::topics::TopicControl::new(
            shared.clone(),
            config,
            modes,
            ring_counts,
            next_shard,
            journal.clone(),
        ));
        Ok(Broker {
            resolver: Resolver::new(layout.view(), Arc::new(Mutex::new(symbology))),
            control,
            shared,
            stop,
            threads,
            node_dir: dir,
            config: config.clone(),
            rules: Arc::default(),
            bars,
            journal,
        })
    }

    /// The node's routing rules (empty until the edge sets them): what
    /// every source's sender consults per event.
    pub fn rules(&self) -> Arc<crate::rules::RuleTable> {
        self.rules.clone()
    }

    /// Creates, grows and deletes topics while the broker runs.
    pub fn topics(&self) -> Arc<crate::topics::TopicControl> {
        self.control.clone()
    }

    /// The node directory holding the rings.
    pub fn node_dir(&self) -> &std::path::Path {
        &self.node_dir
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A new ingest handle for one source. `max_in_flight` bounds the events
    /// sent with an ack token and not yet drained as completions: the
    /// source's completion queue holds exactly that many, so a shard can
    /// always hand a completion back. The handle is owned by one source
    /// (sending and draining take `&mut self`); a second source asks for its
    /// own handle.
    pub fn ingest(&self, max_in_flight: usize) -> Ingest {
        let completions = Arc::new(ArrayQueue::new(max_in_flight.max(1)));
        let mut all = self
            .shared
            .completions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let source = all.len() as u32;
        all.push(completions.clone());
        Ingest {
            shared: self.shared.clone(),
            resolver: self.resolver.clone(),
            completions,
            source,
            in_flight: 0,
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// The journal (`None` when it is off).
    pub fn journal(&self) -> Option<Arc<crate::journal::Journal>> {
        self.journal.clone()
    }

    /// The bar builder (`None` when the journal or history is off).
    pub fn bars(&self) -> Option<Arc<crate::bars::Bars>> {
        self.bars.clone()
    }

    /// The journal's counters (`None` when it is off).
    pub fn journal_stats(&self) -> Option<crate::journal::JournalStats> {
        self.journal.as_ref().map(|j| j.stats())
    }

    /// Counters and the merged ingest -> commit histogram.
    pub fn stats(&self) -> BrokerStats {
        let mut s = BrokerStats::default();
        let mut h = new_histogram();
        for sh in &self.shared.shards {
            let c = &sh.counters;
            s.events += c.events.load(Ordering::Relaxed);
            s.batches += c.batches.load(Ordering::Relaxed);
            s.gate_waits += c.gate_waits.load(Ordering::Relaxed);
            s.untethered += c.untethered.load(Ordering::Relaxed);
            s.reclaimed += c.reclaimed.load(Ordering::Relaxed);
            s.lost_completions += c.lost_completions.load(Ordering::Relaxed);
            s.orphaned += c.orphaned.load(Ordering::Relaxed);
            s.queued += sh.queue.len();
            if let Ok(l) = sh.latency.lock() {
                let _ = h.add(&*l);
            }
        }
        s.ingest_to_commit = Some(h);
        s.readers = self
            .shared
            .layout
            .load()
            .live()
            .map(|(_, t)| {
                let most = t
                    .readers
                    .iter()
                    .map(|r| r.load(Ordering::Relaxed))
                    .max()
                    .unwrap_or(0);
                (t.name.clone(), most)
            })
            .collect();
        s
    }

    /// Stops the shards after they drain their queues, and waits for them.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(b) = &self.bars {
            b.shutdown();
        }
        if let Some(j) = &self.journal {
            j.request_stop();
        }
        self.stop.store(true, Ordering::Release);
        for s in &self.shared.shards {
            if let Some(t) = s.thread.get() {
                t.unpark();
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // After the shards: it writes what they committed last.
        if let Some(j) = &self.journal {
            j.shutdown();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Pins the calling thread to one core, saying why not when it cannot.
fn pin_to(core: usize) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain bits; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity(0) fills our set for this thread.
    let have =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) }
            == 0;
    if core >= libc::CPU_SETSIZE as usize {
        return Err(format!("core {core} is beyond CPU_SETSIZE"));
    }
    // SAFETY: core < CPU_SETSIZE (checked).
    if have && !unsafe { libc::CPU_ISSET(core, &allowed) } {
        let list: Vec<String> = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: i < CPU_SETSIZE.
            .filter(|&i| unsafe { libc::CPU_ISSET(i, &allowed) })
            .map(|i| i.to_string())
            .collect();
        return Err(format!(
            "core {core} is not among the cores this process may run on ({})",
            list.join(",")
        ));
    }
    // SAFETY: core < CPU_SETSIZE.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: sched_setaffinity(0) on this thread with a valid set.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// Refuses to start when the node directory's file system cannot hold the
/// rings and symbology that do not exist yet.
fn check_space(config: &Config, dir: &std::path::Path) -> Result<(), BrokerError> {
    let mut need = 0u64;
    for t in &config.topics {
        need += ring_bytes_missing(dir, &t.name, 0..t.partitions, t.capacity);
    }
    if !dir.join(tickwire_proto::symbology::SYMBOLOGY_FILE).exists() {
        need += tickwire_proto::symbology::SYMBOLOGY_HEADER as u64
            + config.node.symbology_capacity as u64 * tickwire_proto::symbology::ENTRY_SIZE as u64;
    }
    check_free(dir, need)
}

/// Bytes the ring and reader files of `partitions` still need on disk.
pub(crate) fn ring_bytes_missing(
    dir: &std::path::Path,
    topic: &str,
    partitions: std::ops::Range<u32>,
    capacity: u64,
) -> u64 {
    use tickwire_proto::file::{readers_path, ring_file_name};
    let ring = tickwire_proto::layout::HEADER_SIZE as u64 + capacity * SLOT_SIZE as u64;
    let mut need = 0;
    for p in partitions {
        let path = dir.join(ring_file_name(topic, p));
        if !path.exists() {
            need += ring;
        }
        if !readers_path(&path).exists() {
            need += tickwire_proto::layout::READERS_FILE_SIZE as u64;
        }
    }
    need
}

/// [`BrokerError::NoSpace`] when the file system of `dir` has less than
/// `need` bytes free.
pub(crate) fn check_free(dir: &std::path::Path, need: u64) -> Result<(), BrokerError> {
    if need == 0 {
        return Ok(());
    }
    // The nearest existing ancestor tells the file system it will be on.
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => return Ok(()),
        }
    }
    let Ok(c) = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()) else {
        return Ok(());
    };
    // SAFETY: statvfs is plain integers; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs with a NUL-terminated path and a struct to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Ok(());
    }
    let available = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    if need > available {
        return Err(BrokerError::NoSpace {
            dir: dir.to_path_buf(),
            need,
            available,
        });
    }
    Ok(())
}

/// A completion that cannot be handed back: a bug. Its message would never
/// be acknowledged upstream, so it is counted and logged loudly.
#[cold]
fn lost_completion(shared: &Shared, shard: usize, source: u32, c: &Completion, why: &'static str) {
    shared.shards[shard]
        .counters
        .lost_completions
        .fetch_add(1, Ordering::Relaxed);
    tracing::error!(
        shard,
        source,
        token = c.token,
        topic = c.topic,
        partition = c.partition,
        seq = c.seq,
        why,
        "BUG: a commit completion could not be handed back; its message will not be acknowledged upstream"
    );
}

/// Opens a partition's ring for writing; one created now beside a journal
/// under `journal_root` continues the journal's sequences
/// ([`crate::journal::continues`]).
pub(crate) fn open_ring(
    dir: &std::path::Path,
    params: &RingParams,
    journal_root: Option<&std::path::Path>,
) -> Result<PartitionWriter, BrokerError> {
    let after = match journal_root {
        Some(root) => crate::journal::continues(
            root,
            &dir.join(tickwire_proto::file::ring_file_name(
                &params.topic,
                params.partition,
            )),
            &params.topic,
            params.partition,
        )?,
        None => None,
    };
    Ok(PartitionWriter::open_after(dir, params, after)?)
}

/// Logs a ring opened for writing.
pub(crate) fn log_ring_open(topic: &str, partition: u32, w: &PartitionWriter, capacity: u64) {
    tracing::info!(
        topic,
        partition,
        ring = if w.created() { "created" } else { "resumed" },
        epoch = w.epoch(),
        next_seq = w.next_seq(),
        capacity,
        "ring open"
    );
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 60 s at 3 significant digits; these bounds are valid.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap_or_else(|_| unreachable!())
}

/// One source's way into the broker: resolve, route and send events, and
/// collect commit completions for the ones sent with an ack token.
///
/// Owned by one source: [`try_send`](Self::try_send) and
/// [`drain_completions`](Self::drain_completions) take `&mut self`, so the
/// in-flight count is checked and raised in one step by one owner and can
/// never exceed the completion queue (two threads sharing a handle cannot
/// both pass the check).
pub struct Ingest {
    shared: Arc<Shared>,
    resolver: Resolver,
    completions: Arc<ArrayQueue<Completion>>,
    source: u32,
    in_flight: usize,
    max_in_flight: usize,
}

impl Ingest {
    /// The resolver (instrument ids, routes, topic indexes).
    pub fn resolver(&mut self) -> &mut Resolver {
        &mut self.resolver
    }

    /// Sends one event along `route`. With `ack`, a [`Completion`] carrying
    /// the token comes back through [`drain_completions`](Self::drain_completions)
    /// once the event is committed to its ring.
    ///
    /// # Errors
    /// [`SendError::QueueFull`] or [`SendError::InFlight`] (backpressure:
    /// nothing was sent; slow down and retry); [`SendError::UnknownRoute`].
    #[inline]
    pub fn try_send(
        &mut self,
        route: &Route,
        body: &FrameBody,
        ack: Option<u64>,
    ) -> Result<(), SendError> {
        self.try_send_at(route, body, ack, realtime_ns())
    }

    /// [`try_send`](Self::try_send) with the ingest time given
    /// (CLOCK_REALTIME ns): a source that takes events in bursts reads the
    /// clock once per burst rather than once per event (a clock read was
    /// ~26 ns of each send in the edge bench's publisher at 3M/s).
    ///
    /// # Errors
    /// As [`try_send`](Self::try_send).
    #[inline]
    pub fn try_send_at(
        &mut self,
        route: &Route,
        body: &FrameBody,
        ack: Option<u64>,
        now: u64,
    ) -> Result<(), SendError> {
        let kind =
            tickwire_proto::Kind::from_code(body.kind).unwrap_or(tickwire_proto::Kind::Trade);
        let partition = route.partition(kind);
        let Some(place) = self.resolver.placement(route.topic, partition) else {
            return Err(SendError::UnknownRoute {
                topic: route.topic,
                partition,
            });
        };
        if ack.is_some() && self.in_flight >= self.max_in_flight {
            return Err(SendError::InFlight(self.max_in_flight));
        }
        let mut body = *body;
        body.instrument_id = route.instrument_id;
        body.ts_ingest_delta = ingest_delta(body.ts_event, now);
        let shard = &self.shared.shards[place.shard as usize];
        let job = Job {
            ring: place.ring,
            body: body.to_words(),
            ingest_ns: now,
            ack: ack.map(|t| (self.source, t)),
        };
        if shard.queue.push(job).is_err() {
            return Err(SendError::QueueFull(place.shard as usize));
        }
        if ack.is_some() {
            self.in_flight += 1;
        }
        // SeqCst: pairs with the shard's SeqCst store of `parked` before its
        // last look at the queue: either it sees our job or we see it parked.
        if shard.parked.load(Ordering::SeqCst)
            && let Some(t) = shard.thread.get()
        {
            t.unpark();
        }
        Ok(())
    }

    /// Calls `f` for each committed event sent with an ack token; returns
    /// how many.
    pub fn drain_completions(&mut self, mut f: impl FnMut(Completion)) -> usize {
        let (mut n, mut released) = (0, 0);
        while let Some(c) = self.completions.pop() {
            if c.seq == ORPHANED {
                // Not committed (its partition was deleted): the slot is
                // free again, and the source is told nothing.
                released += 1;
                continue;
            }
            n += 1;
            f(c);
        }
        self.in_flight = self.in_flight.saturating_sub(n + released);
        n
    }

    /// Events sent with an ack token and not yet drained.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

struct Shard {
    index: usize,
    shared: Arc<Shared>,
    /// By ring index; `None` for a ring removed (its topic deleted).
    rings: Vec<Option<RingSlot>>,
    dirty: Vec<bool>,
    stop: Arc<AtomicBool>,
    idle: IdleStrategy,
    spin_iterations: u32,
    yield_iterations: u32,
    park_timeout: Duration,
    batch_max: usize,
    reclaim_interval: Duration,
    batch_ingest: Vec<u64>,
    batch_acks: Vec<(u32, u32, Completion)>,
    /// Live readers per ring, counted at housekeeping.
    readers: Vec<u32>,
    /// Reader slots the journal holds on each ring (1 when it is on): not
    /// subscribers, so not counted as readers.
    journal_slots: u32,
}

impl Shard {
    fn new(
        index: usize,
        shared: Arc<Shared>,
        rings: Vec<Option<RingSlot>>,
        c: &Config,
        stop: Arc<AtomicBool>,
    ) -> Shard {
        let n = rings.len();
        Shard {
            index,
            shared,
            rings,
            dirty: vec![false; n],
            stop,
            idle: c.shards.idle,
            spin_iterations: c.shards.spin_iterations,
            yield_iterations: c.shards.yield_iterations,
            park_timeout: Duration::from_micros(c.shards.park_timeout_us),
            batch_max: c.shards.batch_max,
            reclaim_interval: Duration::from_millis(c.shards.reclaim_interval_ms.max(1)),
            batch_ingest: Vec::with_capacity(c.shards.batch_max),
            batch_acks: Vec::with_capacity(c.shards.batch_max),
            readers: vec![0; n],
            journal_slots: u32::from(c.journal.enabled),
        }
    }

    fn run(mut self) {
        let shared = self.shared.clone();
        let me = &shared.shards[self.index];
        let mut hist = new_histogram();
        let mut idle = 0u32;
        let mut last_housekeeping = Instant::now();
        loop {
            let n = self.batch();
            if n > 0 {
                idle = 0;
                let now = realtime_ns();
                for &t in &self.batch_ingest {
                    let _ = hist.record(now.saturating_sub(t).max(1));
                }
            } else {
                if self.stop.load(Ordering::Acquire) && me.queue.is_empty() {
                    break;
                }
                idle = idle.saturating_add(1);
                self.idle_wait(idle);
            }
            if me.has_commands.load(Ordering::Acquire) {
                self.apply_commands();
            }
            // The clock is read after a batch, every 64th empty poll while
            // spinning or yielding, and after every park.
            let parking = idle >= self.spin_iterations + self.yield_iterations;
            if (n > 0 || parking || idle.is_multiple_of(64))
                && last_housekeeping.elapsed() >= self.reclaim_interval
            {
                last_housekeeping = Instant::now();
                self.housekeeping(&mut hist);
            }
        }
        self.apply_commands();
        self.housekeeping(&mut hist);
    }

    /// Applies queued ring changes. Before a ring is removed, every job
    /// queued so far is committed: senders stopped routing to it before the
    /// removal was sent, so nothing meant for it comes after.
    fn apply_commands(&mut self) {
        let shared = self.shared.clone();
        let me = &shared.shards[self.index];
        me.has_commands.store(false, Ordering::Release);
        let cmds = std::mem::take(&mut *me.commands.lock().unwrap_or_else(|p| p.into_inner()));
        for cmd in cmds {
            match cmd {
                ShardCommand::Add { ring, slot, done } => {
                    let i = ring as usize;
                    if self.rings.len() <= i {
                        self.rings.resize_with(i + 1, || None);
                        self.dirty.resize(i + 1, false);
                        self.readers.resize(i + 1, 0);
                    }
                    self.rings[i] = Some(*slot);
                    let _ = done.send(());
                }
                ShardCommand::Remove { ring, done } => {
                    let mut left = me.queue.len();
                    while left > 0 {
                        let n = self.batch();
                        if n == 0 {
                            break;
                        }
                        left = left.saturating_sub(n);
                    }
                    // Dropping the writer marks the end of the stream.
                    if let Some(slot) = self.rings.get_mut(ring as usize).and_then(Option::take) {
                        slot.readers.store(0, Ordering::Relaxed);
                    }
                    let _ = done.send(());
                }
            }
        }
    }

    /// Drains up to `batch_max` jobs, commits them, flushes the rings they
    /// touched, and hands back completions. Returns the count.
    fn batch(&mut self) -> usize {
        self.batch_ingest.clear();
        self.batch_acks.clear();
        let mut n = 0;
        while n < self.batch_max {
            let Some(job) = self.shared.shards[self.index].queue.pop() else {
                break;
            };
            if n > 0
                && self
                    .rings
                    .get(job.ring as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|r| r.writer.at_gate())
            {
                // The writer may wait for a tethered reader: what is
                // committed so far is acknowledged first, not held.
                self.finish_batch();
            }
            let Some(Some(slot)) = self.rings.get_mut(job.ring as usize) else {
                self.orphan(&job);
                continue;
            };
            let seq = slot.writer.publish(&job.body);
            self.dirty[job.ring as usize] = true;
            self.batch_ingest.push(job.ingest_ns);
            let (topic, partition) = (slot.topic, slot.partition);
            self.push_ack(&job, topic, partition, seq);
            n += 1;
        }
        if n == 0 {
            if !self.batch_acks.is_empty() {
                // Only orphans: their releases still go back.
                self.finish_batch();
            }
            return 0;
        }
        self.finish_batch();
        let me = &self.shared.shards[self.index].counters;
        me.events.fetch_add(n as u64, Ordering::Relaxed);
        me.batches.fetch_add(1, Ordering::Relaxed);
        n
    }

    /// A job for a ring removed before it got there: its sender routed it
    /// before it saw the topic's deletion. Not written; not acknowledged.
    /// A source that acknowledges is handed back an [`ORPHANED`] release,
    /// which frees its in-flight slot and never reaches its callback.
    #[cold]
    fn orphan(&mut self, job: &Job) {
        let c = &self.shared.shards[self.index].counters;
        if c.orphaned.fetch_add(1, Ordering::Relaxed) == 0 || job.ack.is_some() {
            tracing::warn!(
                shard = self.index,
                ring = job.ring,
                acknowledged_by_source = job.ack.is_some(),
                "an event reached a partition deleted after it was routed: not written (a source that acknowledges is not told it committed, so its upstream redelivers it)"
            );
        }
        self.push_ack(job, u32::MAX, u32::MAX, ORPHANED);
    }

    /// Queues the completion of `job` (if its source wants one) for the end
    /// of the batch, which fills in the epoch and readers.
    #[inline]
    fn push_ack(&mut self, job: &Job, topic: u32, partition: u32, seq: u64) {
        if let Some((source, token)) = job.ack {
            self.batch_acks.push((
                source,
                job.ring,
                Completion {
                    token,
                    topic,
                    partition,
                    epoch: 0,
                    seq,
                    readers: 0,
                },
            ));
        }
    }

    /// Flushes the rings this batch touched and hands back the completions
    /// of what it committed.
    fn finish_batch(&mut self) {
        for (i, d) in self.dirty.iter_mut().enumerate() {
            if std::mem::take(d)
                && let Some(Some(slot)) = self.rings.get_mut(i)
            {
                slot.writer.flush();
            }
        }
        if !self.batch_acks.is_empty() {
            let sinks = self.shared.sinks.get_or_init(|| {
                self.shared
                    .completions
                    .lock()
                    .map(|v| v.clone())
                    .unwrap_or_default()
            });
            let mut late: Option<(u32, Arc<ArrayQueue<Completion>>)> = None;
            for (source, ring, mut c) in self.batch_acks.drain(..) {
                let sink = match sinks.get(source as usize) {
                    Some(s) => s,
                    // A source registered after the first completion: look it up once.
                    None => {
                        if late.as_ref().is_none_or(|(s, _)| *s != source) {
                            late = self
                                .shared
                                .completions
                                .lock()
                                .ok()
                                .and_then(|v| v.get(source as usize).cloned())
                                .map(|q| (source, q));
                        }
                        match &late {
                            Some((_, q)) => q,
                            None => {
                                lost_completion(
                                    &self.shared,
                                    self.index,
                                    source,
                                    &c,
                                    "unknown source",
                                );
                                continue;
                            }
                        }
                    }
                };
                if let Some(Some(slot)) = self.rings.get(ring as usize) {
                    c.epoch = slot.writer.epoch();
                    c.readers = self.readers.get(ring as usize).copied().unwrap_or(0);
                }
                // Cannot be full: a source has at most `capacity` acks in
                // flight (`Ingest` checks and counts them with `&mut self`).
                if let Err(c) = sink.push(c) {
                    lost_completion(
                        &self.shared,
                        self.index,
                        source,
                        &c,
                        "completion queue full",
                    );
                }
            }
        }
    }

    fn idle_wait(&self, idle: u32) {
        let me = &self.shared.shards[self.index];
        match self.idle {
            IdleStrategy::BusySpin => std::hint::spin_loop(),
            IdleStrategy::Adaptive => {
                if idle < self.spin_iterations {
                    std::hint::spin_loop();
                } else if idle < self.spin_iterations + self.yield_iterations {
                    std::thread::yield_now();
                } else {
                    // SeqCst: pairs with the producer's SeqCst load in `try_send`.
                    me.parked.store(true, Ordering::SeqCst);
                    if me.queue.is_empty()
                        && !self.stop.load(Ordering::Acquire)
                        && !me.has_commands.load(Ordering::Acquire)
                    {
                        std::thread::park_timeout(self.park_timeout);
                    }
                    me.parked.store(false, Ordering::Relaxed);
                }
            }
        }
    }

    fn housekeeping(&mut self, hist: &mut Histogram<u64>) {
        let me = &self.shared.shards[self.index];
        let (mut gate_waits, mut untethered, mut reclaimed) = (0, 0, 0);
        for (i, slot) in self.rings.iter_mut().enumerate() {
            let Some(slot) = slot else { continue };
            let w = &mut slot.writer;
            w.reclaim_dead();
            self.readers[i] = w.live_readers().saturating_sub(self.journal_slots);
            slot.readers.store(self.readers[i], Ordering::Relaxed);
            let s = w.core().stats();
            gate_waits += s.gate_waits;
            untethered += s.untethered;
            reclaimed += s.reclaimed;
        }
        me.counters.gate_waits.store(gate_waits, Ordering::Relaxed);
        me.counters.untethered.store(untethered, Ordering::Relaxed);
        me.counters.reclaimed.store(reclaimed, Ordering::Relaxed);
        if let Ok(mut l) = me.latency.try_lock() {
            let _ = l.add(&*hist);
            hist.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job that reaches a ring removed after it was routed (a sender that
    /// loaded the layout before a deletion and pushed after the rings
    /// closed) is not written, is counted, and frees its sender's in-flight
    /// slot without ever reaching the sender's callback.
    #[test]
    fn an_orphaned_event_is_counted_and_releases_its_slot_unseen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Config::default();
        c.node.dir = Some(dir.path().to_path_buf());
        c.synthetic.enabled = false;
        c.topics[0].capacity = 1 << 10;
        let broker = Broker::start(&c).expect("broker");
        let mut ingest = broker.ingest(4);
        let job = Job {
            ring: 999,
            body: FrameBody::default().to_words(),
            ingest_ns: realtime_ns(),
            ack: Some((ingest.source, 7)),
        };
        assert!(broker.shared.shards[0].queue.push(job).is_ok());
        ingest.in_flight = 1;
        if let Some(t) = broker.shared.shards[0].thread.get() {
            t.unpark();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while ingest.in_flight() > 0 && Instant::now() < deadline {
            ingest.drain_completions(|c| seen.push(c));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(ingest.in_flight(), 0, "the slot is free again");
        assert!(
            seen.is_empty(),
            "the source is never told it committed: {seen:?}"
        );
        let stats = broker.stats();
        assert_eq!(
            (stats.orphaned, stats.events, stats.lost_completions),
            (1, 0, 0)
        );
        broker.shutdown();
    }
}

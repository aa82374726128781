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
use tickwire_proto::futex::{monotonic_ns, realtime_ns};
use tickwire_proto::symbology::SymbologyWriter;

use crate::config::{Config, IdleStrategy};
use crate::router::{Resolver, Route, TopicRoute};

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

/// Bytes one queued event takes in a shard's ingest queue.
pub const JOB_BYTES: usize = std::mem::size_of::<Job>();

struct Job {
    ring: u32,
    body: [u64; BODY_WORDS],
    ingest_ns: u64,
    ack: Option<(u32, u64)>,
}

/// What a shard shares with producers and with stats readers. Fields that
/// different threads write sit on their own cache lines: `parked` (the
/// shard writes it, every producer reads it), the per-batch counters (the
/// shard writes them, stats read them), and the queue (its own head and
/// tail are padded inside `ArrayQueue`).
struct ShardShared {
    queue: ArrayQueue<Job>,
    parked: CachePadded<AtomicBool>,
    counters: CachePadded<ShardCounters>,
    thread: OnceLock<std::thread::Thread>,
    latency: Mutex<Histogram<u64>>,
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
}

/// Where a topic partition lives.
#[derive(Debug, Clone, Copy)]
struct Placement {
    shard: u32,
    ring: u32,
}

struct Shared {
    shards: Vec<CachePadded<ShardShared>>,
    /// placements[topic][partition]
    placements: Vec<Vec<Placement>>,
    /// readers[topic][partition]: reader slots in use, counted at housekeeping.
    readers: Vec<Vec<AtomicU32>>,
    completions: Mutex<Vec<Arc<ArrayQueue<Completion>>>>,
    sinks: OnceLock<Vec<Arc<ArrayQueue<Completion>>>>,
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
    /// Per topic (configuration order): the most reader slots in use on any
    /// of its partitions, as of the last housekeeping (a subscriber takes
    /// one on each partition it reads).
    pub readers: Vec<u32>,
    /// Completions a shard could not hand back to its source. Always 0
    /// unless there is a bug; logged as an error when it happens.
    pub lost_completions: u64,
}

/// A running broker.
pub struct Broker {
    shared: Arc<Shared>,
    resolver: Resolver,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    node_dir: std::path::PathBuf,
    config: Config,
    rules: Arc<crate::rules::RuleTable>,
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
        let symbology = SymbologyWriter::open_with(&dir, config.node.symbology_capacity, modes)?;
        let n_shards = config.shards.count;
        let mut rings: Vec<Vec<(u32, u32, PartitionWriter)>> =
            (0..n_shards).map(|_| Vec::new()).collect();
        let mut placements = Vec::new();
        let mut next_shard = 0usize;
        for (ti, t) in config.topics.iter().enumerate() {
            let mut ps = Vec::new();
            for p in 0..t.partitions {
                let w = PartitionWriter::open(
                    &dir,
                    &RingParams {
                        topic: t.name.clone(),
                        partition: p,
                        partitions: t.partitions,
                        capacity: t.capacity,
                        slot_size: SLOT_SIZE as u32,
                        modes,
                    },
                )?;
                tracing::info!(
                    topic = %t.name,
                    partition = p,
                    ring = if w.created() { "created" } else { "resumed" },
                    epoch = w.epoch(),
                    next_seq = w.next_seq(),
                    capacity = t.capacity,
                    "ring open"
                );
                let shard = next_shard % n_shards;
                next_shard += 1;
                ps.push(Placement {
                    shard: shard as u32,
                    ring: rings[shard].len() as u32,
                });
                rings[shard].push((ti as u32, p, w));
            }
            placements.push(ps);
        }
        let topics: Vec<TopicRoute> = config
            .topics
            .iter()
            .map(|t| TopicRoute {
                name: t.name.clone(),
                partitions: t.partitions,
                template: t.routing_key.clone(),
            })
            .collect();
        let readers = config
            .topics
            .iter()
            .map(|t| (0..t.partitions).map(|_| AtomicU32::new(0)).collect())
            .collect();
        let shared = Arc::new(Shared {
            shards: (0..n_shards)
                .map(|_| {
                    CachePadded::new(ShardShared {
                        queue: ArrayQueue::new(config.shards.queue_capacity),
                        parked: CachePadded::new(AtomicBool::new(false)),
                        counters: CachePadded::new(ShardCounters::default()),
                        thread: OnceLock::new(),
                        latency: Mutex::new(new_histogram()),
                    })
                })
                .collect(),
            placements,
            readers,
            completions: Mutex::new(Vec::new()),
            sinks: OnceLock::new(),
        });
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
        Ok(Broker {
            resolver: Resolver::new(Arc::new(topics), Arc::new(Mutex::new(symbology))),
            shared,
            stop,
            threads,
            node_dir: dir,
            config: config.clone(),
            rules: Arc::default(),
        })
    }

    /// The node's routing rules (empty until the edge sets them): what
    /// every source's sender consults per event.
    pub fn rules(&self) -> Arc<crate::rules::RuleTable> {
        self.rules.clone()
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
            s.queued += sh.queue.len();
            if let Ok(l) = sh.latency.lock() {
                let _ = h.add(&*l);
            }
        }
        s.ingest_to_commit = Some(h);
        s.readers = self
            .shared
            .readers
            .iter()
            .map(|ps| {
                ps.iter()
                    .map(|r| r.load(Ordering::Relaxed))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        s
    }

    /// Stops the shards after they drain their queues, and waits for them.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        for s in &self.shared.shards {
            if let Some(t) = s.thread.get() {
                t.unpark();
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
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
    use tickwire_proto::file::{partition_paths, readers_path};
    let mut need = 0u64;
    for t in &config.topics {
        let ring = tickwire_proto::layout::HEADER_SIZE as u64 + t.capacity * SLOT_SIZE as u64;
        for p in partition_paths(dir, &t.name, t.partitions) {
            if !p.exists() {
                need += ring;
            }
            if !readers_path(&p).exists() {
                need += tickwire_proto::layout::READERS_FILE_SIZE as u64;
            }
        }
    }
    if !dir.join(tickwire_proto::symbology::SYMBOLOGY_FILE).exists() {
        need += tickwire_proto::symbology::SYMBOLOGY_HEADER as u64
            + config.node.symbology_capacity as u64 * tickwire_proto::symbology::ENTRY_SIZE as u64;
    }
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
        let kind =
            tickwire_proto::Kind::from_code(body.kind).unwrap_or(tickwire_proto::Kind::Trade);
        let partition = route.partition(kind);
        let Some(place) = self
            .shared
            .placements
            .get(route.topic as usize)
            .and_then(|p| p.get(partition as usize))
        else {
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
        body.ts_ingest_delta = ingest_delta(body.ts_event, realtime_ns());
        let shard = &self.shared.shards[place.shard as usize];
        let job = Job {
            ring: place.ring,
            body: body.to_words(),
            ingest_ns: monotonic_ns(),
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
        let mut n = 0;
        while let Some(c) = self.completions.pop() {
            n += 1;
            f(c);
        }
        self.in_flight = self.in_flight.saturating_sub(n);
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
    rings: Vec<(u32, u32, PartitionWriter)>,
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
}

impl Shard {
    fn new(
        index: usize,
        shared: Arc<Shared>,
        rings: Vec<(u32, u32, PartitionWriter)>,
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
                let now = monotonic_ns();
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
        self.housekeeping(&mut hist);
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
                    .is_some_and(|(_, _, r)| r.at_gate())
            {
                // The writer may wait for a tethered reader: what is
                // committed so far is acknowledged first, not held.
                self.finish_batch();
            }
            let Some((topic, partition, ring)) = self.rings.get_mut(job.ring as usize) else {
                continue;
            };
            let seq = ring.publish(&job.body);
            self.dirty[job.ring as usize] = true;
            self.batch_ingest.push(job.ingest_ns);
            if let Some((source, token)) = job.ack {
                self.batch_acks.push((
                    source,
                    job.ring,
                    Completion {
                        token,
                        topic: *topic,
                        partition: *partition,
                        epoch: 0,
                        seq,
                        readers: 0,
                    },
                ));
            }
            n += 1;
        }
        if n == 0 {
            return 0;
        }
        self.finish_batch();
        let me = &self.shared.shards[self.index].counters;
        me.events.fetch_add(n as u64, Ordering::Relaxed);
        me.batches.fetch_add(1, Ordering::Relaxed);
        n
    }

    /// Flushes the rings this batch touched and hands back the completions
    /// of what it committed.
    fn finish_batch(&mut self) {
        for (i, d) in self.dirty.iter_mut().enumerate() {
            if std::mem::take(d) {
                self.rings[i].2.flush();
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
                if let Some((_, _, w)) = self.rings.get(ring as usize) {
                    c.epoch = w.epoch();
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
                    if me.queue.is_empty() && !self.stop.load(Ordering::Acquire) {
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
        for (i, (topic, partition, w)) in self.rings.iter_mut().enumerate() {
            w.reclaim_dead();
            self.readers[i] = w.live_readers();
            if let Some(r) = self
                .shared
                .readers
                .get(*topic as usize)
                .and_then(|t| t.get(*partition as usize))
            {
                r.store(self.readers[i], Ordering::Relaxed);
            }
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

//! The fan-out dispatcher: one thread per topic reads each partition once
//! and feeds every remote subscriber's bounded queue.
//!
//! ```text
//!  ring partitions ─> dispatcher thread ─> Outbox per subscriber ─> gRPC / WS writer task
//!                      │ instrument id -> subscriptions that want it (built on subscribe, grown with symbology)
//!                      │ kind, price and volume checked only for those
//!                      │ encoded once per wire format, only if someone wants it
//!                      └ elements appended to each receiver's batch; batches sealed when the
//!                        ready events are drained (no timer), or at `max_batch` events
//! ```
//!
//! A subscriber whose queue is full is handled by its policy (drop with an
//! exact gap notice, conflate to the latest per instrument, disconnect);
//! the dispatcher never waits for a client. Control messages (subscribe,
//! unsubscribe, pause) arrive on a channel and are handled between polls,
//! so a new subscription's initial image and its first live event have no
//! gap between them. A subscription that starts in the past (Earliest, a
//! message id) replays with its own per-partition readers up to the
//! dispatcher's position, then joins the live index (replay-merge by
//! sequence: no gap, no duplicate).

pub mod json;
pub mod outbox;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use shm_client::{Event, Start, Subscriber, Tick, WaitStrategy};
use tickwire_proto::frame::{ArchivedFrameBody, BODY_WORDS};
use tickwire_proto::futex::realtime_ns;
use tickwire_proto::grpc::{BatchBuf, InstrumentFields, TickEncoder, TickMeta, notice};
use tickwire_proto::pb;
use tickwire_proto::symbology::{Entry, Symbology};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::spec::{Policy, StartSpec, SubscriptionSpec};
pub use outbox::QueueBudget;
use outbox::{Closed, Frame, Outbox, Payload};

/// Queue and batch limits for every subscriber.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Events queued per subscriber.
    pub max_events: usize,
    /// Bytes queued per subscriber.
    pub max_bytes: usize,
    /// Bytes queued for all subscribers together.
    pub max_bytes_total: usize,
    /// Events per batch message.
    pub max_batch: u32,
    /// `message_delivery_log`: one delivered frame in this many is logged
    /// (0: none; every failed delivery is logged regardless).
    pub delivery_sample: u64,
}

/// One `message_delivery_log` record: a range of a partition a subscriber
/// was not sent (a gap notice), or a sampled delivered frame.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    /// When, UTC ns.
    pub ts_ns: u64,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// First sequence.
    pub from: u64,
    /// Last sequence.
    pub to: u64,
    /// The subscription (its name, or `#<id>` for an unnamed one).
    pub subscription: String,
    /// `delivered` or `failed`.
    pub status: &'static str,
    /// Why it failed (`slow_consumer`, `not_journaled`, ...); empty when delivered.
    pub reason: String,
    /// Delivered: ingest to handed to the socket, ms.
    pub latency_ms: Option<f64>,
}

/// Delivery records on their way to the store: bounded, never blocking
/// the dispatcher (a record that finds it full is counted, not kept).
#[derive(Debug, Default)]
pub struct DeliveryLog {
    q: Mutex<std::collections::VecDeque<DeliveryRecord>>,
    /// Records dropped because the log was full (the store is behind).
    pub lost: AtomicU64,
    sample_every: u64,
}

/// Records kept at most between two writes of the log.
const DELIVERY_LOG_CAP: usize = 65_536;

impl DeliveryLog {
    fn push(&self, r: DeliveryRecord) {
        let mut q = self.q.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= DELIVERY_LOG_CAP {
            self.lost.fetch_add(1, Ordering::Relaxed);
        } else {
            q.push_back(r);
        }
    }

    /// Takes every record waiting.
    pub fn drain(&self) -> Vec<DeliveryRecord> {
        self.q
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect()
    }
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            max_events: 65_536,
            max_bytes: 16 << 20,
            max_bytes_total: 1 << 30,
            max_batch: 256,
            delivery_sample: 10_000,
        }
    }
}

/// How a subscriber's frames are encoded.
#[derive(Debug, Clone)]
pub enum Wire {
    /// Protobuf `StreamResponse`.
    Grpc,
    /// WebSocket JSON `WebSocketMessage`s naming the subscription.
    Json {
        /// The id the client knows the subscription by.
        subscription_id: Arc<str>,
    },
}

/// The latest event of one instrument.
#[derive(Debug, Clone, Copy)]
pub struct Latest {
    /// Partition.
    pub partition: u32,
    /// Writer epoch.
    pub epoch: u64,
    /// Sequence.
    pub seq: u64,
    /// Frame body words.
    pub words: [u64; BODY_WORDS],
}

impl Latest {
    /// The body.
    pub fn body(&self) -> &ArchivedFrameBody {
        ArchivedFrameBody::from_words(&self.words)
    }
}

/// What a topic's dispatcher shares with the API.
#[derive(Debug)]
pub struct TopicShared {
    /// Topic name.
    pub topic: String,
    /// Latest event per instrument id (published once per dispatcher cycle).
    pub latest: Mutex<HashMap<u32, Latest>>,
    /// Events read from the rings.
    pub events: AtomicU64,
    /// Events handed to subscriber queues.
    pub delivered: AtomicU64,
    /// Events a subscriber did not get (full queue, paused, overrun).
    pub dropped: AtomicU64,
    /// Subscriptions (live or catching up).
    pub subscribers: AtomicU64,
    /// Bytes of the frames handed to sockets (protobuf or JSON, as sent).
    pub wire_bytes: AtomicU64,
    /// Ingest -> dispatch latency, ns.
    pub dispatch_latency: Mutex<Histogram<u64>>,
    /// Ingest -> handed to the socket (oldest event of each frame), ns.
    pub send_latency: Mutex<Histogram<u64>>,
    /// Set when the dispatcher has stopped (topic deleted, shutdown).
    pub stopped: std::sync::atomic::AtomicBool,
    /// Per partition: (partition, last published sequence, next sequence
    /// the dispatcher reads), every 100 ms.
    pub backlog: Mutex<Vec<(u32, u64, u64)>>,
    /// The hub's delivery log.
    pub delivery_log: Arc<DeliveryLog>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).unwrap_or_else(|_| unreachable!())
}

impl TopicShared {
    fn new(topic: &str, delivery_log: Arc<DeliveryLog>) -> TopicShared {
        TopicShared {
            delivery_log,
            topic: topic.into(),
            latest: Mutex::new(HashMap::new()),
            backlog: Mutex::new(Vec::new()),
            events: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            subscribers: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            dispatch_latency: Mutex::new(histogram()),
            send_latency: Mutex::new(histogram()),
            stopped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Records the send of a frame of `bytes` whose oldest event was
    /// ingested at `oldest_ingest_ns` (0: a notice, no latency).
    pub fn record_send(&self, oldest_ingest_ns: u64, bytes: usize) {
        self.wire_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if oldest_ingest_ns == 0 {
            return;
        }
        let d = realtime_ns().saturating_sub(oldest_ingest_ns).max(1);
        if let Ok(mut h) = self.send_latency.lock() {
            let _ = h.record(d);
        }
    }
}

enum Control {
    Add {
        sub: Box<NewSub>,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    Remove(u64),
    Pause(u64, bool),
}

struct NewSub {
    id: u64,
    spec: SubscriptionSpec,
    wire: Wire,
    outbox: Arc<Outbox>,
}

struct TopicHandle {
    tx: Sender<Control>,
    shared: Arc<TopicShared>,
}

/// Every topic's dispatcher, started on first use.
pub struct Hub {
    node_dir: PathBuf,
    limits: QueueLimits,
    budget: Arc<QueueBudget>,
    topics: Mutex<HashMap<String, TopicHandle>>,
    cancel: CancellationToken,
    next_id: AtomicU64,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    symbology: Mutex<Option<Arc<Symbology>>>,
    /// Failed and sampled deliveries, for `message_delivery_log`.
    pub delivery_log: Arc<DeliveryLog>,
}

/// A live subscription: its queue and its way back to the dispatcher.
/// Dropping it unsubscribes.
pub struct SubscriptionHandle {
    /// Numeric id.
    pub id: u64,
    /// Topic.
    pub topic: String,
    /// Its queue.
    pub outbox: Arc<Outbox>,
    /// The topic's shared state.
    pub shared: Arc<TopicShared>,
    /// Heartbeat interval asked for.
    pub heartbeat: Duration,
    tx: Sender<Control>,
}

impl SubscriptionHandle {
    /// A handle to pause and resume it from elsewhere.
    pub fn control(&self) -> SubControl {
        SubControl {
            id: self.id,
            tx: self.tx.clone(),
            outbox: Arc::downgrade(&self.outbox),
        }
    }
}

/// Pauses, resumes or ends one subscription from outside its connection.
#[derive(Clone)]
pub struct SubControl {
    id: u64,
    tx: Sender<Control>,
    /// Its queue, while the connection lives.
    pub outbox: std::sync::Weak<Outbox>,
}

impl SubControl {
    /// Pauses or resumes delivery (what is skipped meanwhile is reported
    /// as a gap with reason `paused`).
    pub fn set_paused(&self, paused: bool) {
        let _ = self.tx.send(Control::Pause(self.id, paused));
    }

    /// Whether its connection is still open.
    pub fn alive(&self) -> bool {
        self.outbox.upgrade().is_some_and(|o| !o.is_closed())
    }
}

impl Drop for SubscriptionHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Control::Remove(self.id));
    }
}

impl Hub {
    /// A hub over a node directory.
    pub fn new(node_dir: PathBuf, limits: QueueLimits, cancel: CancellationToken) -> Hub {
        Hub {
            delivery_log: Arc::new(DeliveryLog {
                sample_every: limits.delivery_sample,
                ..DeliveryLog::default()
            }),
            node_dir,
            budget: QueueBudget::new(limits.max_bytes_total),
            limits,
            topics: Mutex::new(HashMap::new()),
            cancel,
            next_id: AtomicU64::new(1),
            threads: Mutex::new(Vec::new()),
            symbology: Mutex::new(None),
        }
    }

    /// The bytes every subscriber's queue holds together, bounded.
    pub fn budget(&self) -> &Arc<QueueBudget> {
        &self.budget
    }

    /// The node directory.
    pub fn node_dir(&self) -> &std::path::Path {
        &self.node_dir
    }

    /// The node's symbology table.
    ///
    /// # Errors
    /// [`ApiError::Unavailable`] when it cannot be opened.
    pub fn symbology(&self) -> Result<Arc<Symbology>, ApiError> {
        let mut s = self.symbology.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = s.as_ref() {
            return Ok(s.clone());
        }
        let opened = Arc::new(Symbology::open(&self.node_dir).map_err(|e| {
            tracing::warn!(error = %e, "symbology table cannot be opened");
            ApiError::Unavailable("the node's symbology table is not readable".into())
        })?);
        *s = Some(opened.clone());
        Ok(opened)
    }

    /// The topic's dispatcher, started if it is not running.
    ///
    /// # Errors
    /// [`ApiError::NotFound`] when the topic has no rings.
    pub fn topic(&self, topic: &str) -> Result<Arc<TopicShared>, ApiError> {
        self.handle(topic).map(|(_, s)| s)
    }

    /// Forgets a topic's dispatcher (its topic was deleted): the next
    /// request for the name opens its rings anew. The old dispatcher ends
    /// its streams when it sees the rings removed.
    pub fn forget(&self, topic: &str) {
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(topic);
    }

    /// Dispatchers running now.
    pub fn running(&self) -> Vec<Arc<TopicShared>> {
        let t = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        t.values()
            .filter(|h| !h.shared.stopped.load(Ordering::Acquire))
            .map(|h| h.shared.clone())
            .collect()
    }

    fn handle(&self, topic: &str) -> Result<(Sender<Control>, Arc<TopicShared>), ApiError> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = topics.get(topic)
            && !h.shared.stopped.load(Ordering::Acquire)
        {
            return Ok((h.tx.clone(), h.shared.clone()));
        }
        let reader = Subscriber::builder(topic)
            .node_dir(&self.node_dir)
            // From the oldest event the rings hold: the latest-value table
            // starts full. A dispatcher the ring laps (a burst longer than
            // the ring while it was busy) reads what it missed from the
            // journal: remote subscribers lose nothing the node journaled.
            .start(Start::RingEarliest)
            .journal_fill(true)
            .wait(WaitStrategy::Futex { spins: 200 })
            .open()
            .map_err(|e| open_error(topic, "the dispatcher", e))?;
        let shared = Arc::new(TopicShared::new(topic, self.delivery_log.clone()));
        let (tx, rx) = std::sync::mpsc::channel();
        let d = Dispatcher::new(
            reader,
            rx,
            shared.clone(),
            self.limits,
            self.node_dir.clone(),
        );
        let cancel = self.cancel.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tickwire-dispatch-{}", topics.len()))
            .spawn(move || d.run(cancel))
            .map_err(ApiError::internal)?;
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(thread);
        tracing::info!(topic, "dispatcher started");
        topics.insert(
            topic.into(),
            TopicHandle {
                tx: tx.clone(),
                shared: shared.clone(),
            },
        );
        Ok((tx, shared))
    }

    /// Subscribes; frames arrive in the returned handle's outbox, and
    /// `notify` is woken when there is something to send.
    ///
    /// # Errors
    /// [`ApiError::NotFound`] for a topic without rings;
    /// [`ApiError::Invalid`] for a start position the topic cannot serve;
    /// [`ApiError::Unavailable`] when shutting down.
    pub async fn subscribe(
        &self,
        spec: SubscriptionSpec,
        wire: Wire,
        notify: Arc<Notify>,
    ) -> Result<SubscriptionHandle, ApiError> {
        let (tx, shared) = self.handle(&spec.topic)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::new(
            self.limits.max_events,
            self.limits.max_bytes,
            self.budget.clone(),
            notify,
        ));
        let topic = spec.topic.clone();
        let heartbeat = spec.heartbeat;
        let (reply, answer) = oneshot::channel();
        tx.send(Control::Add {
            sub: Box::new(NewSub {
                id,
                spec,
                wire,
                outbox: outbox.clone(),
            }),
            reply,
        })
        .map_err(|_| ApiError::Unavailable("the topic's dispatcher has stopped".into()))?;
        answer
            .await
            .map_err(|_| ApiError::Unavailable("the topic's dispatcher has stopped".into()))??;
        Ok(SubscriptionHandle {
            id,
            topic,
            outbox,
            shared,
            heartbeat,
            tx,
        })
    }

    /// Waits for every dispatcher thread (after the cancel token fired).
    pub fn join(&self) {
        join_all(&self.threads);
    }
}

/// A reader of `topic` that cannot be opened, as the API says it: 404 for
/// a topic without rings, 503 (logged with the cause) otherwise.
pub(crate) fn open_error(topic: &str, reader: &str, e: shm_client::Error) -> ApiError {
    match e {
        shm_client::Error::NoSuchTopic { .. } => ApiError::NotFound {
            what: "topic",
            name: topic.into(),
        },
        other => {
            tracing::error!(topic, reader, error = %other, "cannot open a reader of the topic");
            ApiError::Unavailable(format!("topic {topic} cannot be read now"))
        }
    }
}

/// Waits for the threads in `threads` (taking them out).
pub(crate) fn join_all(threads: &Mutex<Vec<std::thread::JoinHandle<()>>>) {
    let threads: Vec<_> = threads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// One event kept for conflation.
#[derive(Clone, Copy)]
struct Item {
    partition: u32,
    epoch: u64,
    seq: u64,
    words: [u64; BODY_WORDS],
}

struct LiveSub {
    id: u64,
    spec: SubscriptionSpec,
    wire: Wire,
    outbox: Arc<Outbox>,
    /// Instrument ids it wants (for the index and snapshots).
    matches: Vec<u32>,
    pb: BatchBuf,
    json: json::JsonBatch,
    events: u32,
    oldest_ingest_ns: u64,
    /// (partition, first seq, last seq) of the batch being built.
    ranges: Vec<(u32, u64, u64)>,
    /// The batch's events, kept for CONFLATE only.
    items: Vec<Item>,
    /// Skipped and not yet reported: (partition, from, to, reason).
    skipped: Vec<(u32, u64, u64, &'static str)>,
    slow_noticed: bool,
    conflating: bool,
    conflated: HashMap<u32, Item>,
    paused: bool,
    /// Catching up from the past: per-partition readers; not yet live.
    catch_up: Option<Vec<(u32, Subscriber)>>,
    closed: bool,
    /// Where failed and sampled deliveries go.
    log: Arc<DeliveryLog>,
    /// Frames queued, for the delivery log's sample.
    frames: u64,
}

impl LiveSub {
    /// Its name in the delivery log.
    fn log_name(&self) -> String {
        if self.spec.name.is_empty() {
            format!("#{}", self.id)
        } else {
            self.spec.name.clone()
        }
    }
}

impl LiveSub {
    #[inline]
    fn passes(&self, b: &ArchivedFrameBody) -> bool {
        self.spec.passes(b)
    }

    fn note(&mut self, partition: u32, seq: u64, ingest: u64) {
        if self.events == 0 || ingest < self.oldest_ingest_ns {
            self.oldest_ingest_ns = ingest;
        }
        self.events += 1;
        match self.ranges.iter_mut().find(|r| r.0 == partition) {
            Some(r) => r.2 = seq,
            None => self.ranges.push((partition, seq, seq)),
        }
    }

    fn skip(&mut self, partition: u32, from: u64, to: u64, reason: &'static str) {
        match self
            .skipped
            .iter_mut()
            .find(|r| r.0 == partition && r.3 == reason)
        {
            Some(r) => r.2 = r.2.max(to),
            None => self.skipped.push((partition, from, to, reason)),
        }
    }

    fn notice(
        &self,
        grpc: tickwire_proto::grpc::Encoded,
        json: impl FnOnce() -> serde_json::Value,
        now: u64,
    ) {
        let bytes = match &self.wire {
            Wire::Grpc => Payload::Binary(grpc.0),
            Wire::Json { subscription_id } => {
                let mut payload = json();
                payload["subscription_id"] = subscription_id.to_string().into();
                let kind = payload
                    .get("notice")
                    .and_then(|v| v.as_str())
                    .unwrap_or("notice")
                    .to_string();
                Payload::Text(json::message(&kind, payload, now))
            }
        };
        self.outbox.push_notice(Frame {
            bytes,
            events: 0,
            oldest_ingest_ns: 0,
        });
    }
}

/// How often a dispatcher merges its latency histogram into the shared one.
const HIST_EVERY: Duration = Duration::from_millis(10);

struct Dispatcher {
    reader: Subscriber,
    rx: Receiver<Control>,
    st: State,
    /// The ring file went away (removed: true) or was replaced.
    gone: Option<bool>,
}

struct State {
    topic: String,
    node_dir: PathBuf,
    shared: Arc<TopicShared>,
    limits: QueueLimits,
    subs: Vec<Option<LiveSub>>,
    free: Vec<usize>,
    ids: HashMap<u64, usize>,
    index: Vec<Vec<u32>>,
    indexed: u32,
    /// The node's symbology, for growing the index mid-poll: an event of an
    /// instrument newer than the index must still reach its subscribers.
    sym: Option<Arc<Symbology>>,
    /// Writer epoch per partition (index), read per event.
    epochs: Vec<u64>,
    latest: Vec<Option<Latest>>,
    dirty: Vec<u32>,
    dirty_mark: Vec<bool>,
    touched: Vec<u32>,
    /// Each instrument's strings, encoded once per wire format.
    wires: Vec<Option<Box<Wires>>>,
    pb: TickEncoder,
    json: String,
    now_ns: u64,
    hist: Histogram<u64>,
    /// When `hist` was last merged into the shared one: merging scans and
    /// clears every bucket (tens of microseconds), so it is done at most
    /// every [`HIST_EVERY`], not per wake.
    hist_merged: Instant,
    events: u64,
    delivered: u64,
    dropped: u64,
}

impl Dispatcher {
    fn new(
        reader: Subscriber,
        rx: Receiver<Control>,
        shared: Arc<TopicShared>,
        limits: QueueLimits,
        node_dir: PathBuf,
    ) -> Dispatcher {
        let mut epochs = Vec::new();
        for p in reader.partitions() {
            set_epoch(&mut epochs, p, reader.epoch(p).unwrap_or(0));
        }
        let sym = Symbology::open(&node_dir).ok().map(Arc::new);
        Dispatcher {
            st: State {
                topic: shared.topic.clone(),
                node_dir,
                shared,
                limits,
                subs: Vec::new(),
                free: Vec::new(),
                ids: HashMap::new(),
                index: Vec::new(),
                indexed: 0,
                sym,
                epochs,
                latest: Vec::new(),
                dirty: Vec::new(),
                dirty_mark: Vec::new(),
                touched: Vec::new(),
                wires: Vec::new(),
                pb: TickEncoder::new(),
                json: String::with_capacity(1024),
                now_ns: realtime_ns(),
                hist: histogram(),
                hist_merged: Instant::now(),
                events: 0,
                delivered: 0,
                dropped: 0,
            },
            reader,
            rx,
            gone: None,
        }
    }

    fn run(mut self, cancel: CancellationToken) {
        let mut last_publish = Instant::now();
        let mut last_check = Instant::now();
        let mut last_backlog = Instant::now();
        loop {
            if cancel.is_cancelled() {
                self.st.close_all(Closed::Shutdown);
                break;
            }
            if !self.controls() {
                break;
            }
            let n = self.pump();
            if let Some(removed) = self.gone {
                let why = if removed {
                    format!("topic {} was deleted", self.st.topic)
                } else {
                    format!("topic {} was recreated; subscribe again", self.st.topic)
                };
                tracing::info!(topic = %self.st.topic, reason = %why, "dispatcher stopping");
                self.st.close_all(Closed::TopicGone(why));
                break;
            }
            if last_publish.elapsed() >= Duration::from_millis(10) || n == 0 {
                self.st.publish();
                last_publish = Instant::now();
            }
            if last_backlog.elapsed() >= Duration::from_millis(100) {
                let positions: HashMap<u32, u64> = self.reader.positions().into_iter().collect();
                let b: Vec<(u32, u64, u64)> = self
                    .reader
                    .published()
                    .into_iter()
                    .map(|(p, s)| (p, s, positions.get(&p).copied().unwrap_or(0)))
                    .collect();
                if let Ok(mut l) = self.st.shared.backlog.lock() {
                    *l = b;
                }
                last_backlog = Instant::now();
            }
            if n == 0 && !self.st.catching_up() {
                // Looks at the writers and for new partitions every 100 ms.
                self.reader.wait_for_data(Duration::from_millis(1));
            } else if last_check.elapsed() >= Duration::from_millis(100) {
                // Busy: the same look, or a deleted or grown topic would go
                // unnoticed while events flow.
                self.reader.check_writers();
                last_check = Instant::now();
            }
        }
        self.st.hist_merged = Instant::now() - HIST_EVERY;
        self.st.publish();
        self.st.shared.stopped.store(true, Ordering::Release);
    }

    /// Reads what the rings have (up to 4096 events) into the
    /// subscriptions and the latest-value table, and sends what is due.
    fn pump(&mut self) -> usize {
        self.st.grow_index();
        self.st.now_ns = realtime_ns();
        let mut gone = None;
        let st = &mut self.st;
        let n = self.reader.poll(4096, |ev| match ev {
            Event::Tick(t) => st.on_tick(&t),
            Event::Gap {
                partition,
                from,
                to,
            } => st.on_gap(partition, from, to),
            Event::Reopened { partition, epoch } | Event::PartitionAdded { partition, epoch } => {
                set_epoch(&mut st.epochs, partition, epoch);
            }
            Event::Replaced { removed, .. } => gone = Some(removed),
            _ => {}
        });
        self.st.catch_up(&self.reader);
        self.st.flush(self.reader.symbology());
        if gone.is_some() {
            self.gone = gone;
        }
        n
    }

    /// Handles queued control messages; false when the hub is gone.
    fn controls(&mut self) -> bool {
        // Whether this call has caught up for a new subscription yet.
        let mut caught_up = false;
        loop {
            match self.rx.try_recv() {
                Ok(Control::Add { sub, reply }) => {
                    // What was published before the request is in the
                    // latest-value table first (a snapshot is that fresh)
                    // and not sent to a subscription starting at Latest.
                    // Bounded, and once for all the requests queued now:
                    // under a flood, subscriptions arriving together must
                    // not each wait for 16 full reads of the rings.
                    if !caught_up {
                        caught_up = true;
                        for _ in 0..16 {
                            if self.gone.is_some() || self.pump() == 0 {
                                break;
                            }
                        }
                    }
                    let r = self.st.add(*sub, &self.reader);
                    let _ = reply.send(r);
                }
                Ok(Control::Remove(id)) => self.st.remove(id),
                Ok(Control::Pause(id, paused)) => {
                    if let Some(s) = self.st.ids.get(&id).and_then(|&i| self.st.subs[i].as_mut()) {
                        s.paused = paused;
                    }
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => {
                    return !self.st.subs.iter().all(Option::is_none);
                }
            }
        }
    }
}

fn set_epoch(epochs: &mut Vec<u64>, partition: u32, epoch: u64) {
    let p = partition as usize;
    if epochs.len() <= p {
        epochs.resize(p + 1, 0);
    }
    epochs[p] = epoch;
}

impl State {
    fn epoch(&self, partition: u32) -> u64 {
        self.epochs.get(partition as usize).copied().unwrap_or(0)
    }

    fn catching_up(&self) -> bool {
        self.subs.iter().flatten().any(|s| s.catch_up.is_some())
    }

    /// Extends the index to instruments added to symbology since.
    fn grow_index(&mut self) {
        let count = self.sym.as_ref().map_or(0, |s| s.count());
        if count <= self.indexed {
            return;
        }
        let Some(sym) = self.sym.clone() else { return };
        if self.index.len() <= count as usize {
            self.index.resize(count as usize + 1, Vec::new());
        }
        for id in self.indexed + 1..=count {
            let Some(e) = sym.get(id) else { continue };
            for (slot, s) in self.subs.iter_mut().enumerate() {
                let Some(s) = s else { continue };
                if s.spec
                    .wants_instrument(e.symbol(), e.exchange(), e.currency())
                {
                    s.matches.push(id);
                    if s.catch_up.is_none() {
                        self.index[id as usize].push(slot as u32);
                    }
                }
            }
        }
        self.indexed = count;
    }

    #[inline]
    fn on_tick(&mut self, t: &Tick<'_>) {
        let b = t.body;
        let id = b.instrument_id();
        self.events += 1;
        let ingest = b.ts_ingest();
        let _ = self.hist.record(self.now_ns.saturating_sub(ingest).max(1));
        let epoch = self.epoch(t.partition);
        // The latest-value table.
        let idx = id as usize;
        if idx < (1 << 24) {
            if self.latest.len() <= idx {
                self.latest.resize(idx + 1, None);
                self.dirty_mark.resize(idx + 1, false);
            }
            if self.latest[idx].is_none_or(|l| l.partition != t.partition || l.seq < t.seq) {
                // Each changed instrument once per publish, not once per event.
                if !std::mem::replace(&mut self.dirty_mark[idx], true) {
                    self.dirty.push(id);
                }
                self.latest[idx] = Some(Latest {
                    partition: t.partition,
                    epoch,
                    seq: t.seq,
                    words: *b.words(),
                });
            }
        }
        if id > self.indexed {
            // Interned after this poll began: the router writes the
            // symbology entry before the event, so it is there now.
            self.grow_index();
        }
        let Some(slots) = self.index.get(idx) else {
            return;
        };
        if slots.is_empty() {
            return;
        }
        let meta = TickMeta {
            topic: &self.topic,
            partition: t.partition,
            epoch,
            seq: t.seq,
            send_time_ns: self.now_ns,
            snapshot: false,
            conflated: false,
            redeliveries: 0,
        };
        let inst = wires_of(&mut self.wires, id, t.instrument());
        let (mut pb_done, mut json_done) = (false, false);
        for &slot in slots {
            let Some(s) = self.subs.get_mut(slot as usize).and_then(Option::as_mut) else {
                continue;
            };
            if s.closed || !s.passes(b) {
                continue;
            }
            if s.paused {
                s.skip(t.partition, t.seq, t.seq, "paused");
                self.dropped += 1;
                s.outbox.counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if s.conflating {
                let item = Item {
                    partition: t.partition,
                    epoch,
                    seq: t.seq,
                    words: *b.words(),
                };
                if s.conflated.insert(id, item).is_some() {
                    s.outbox.counters.conflated.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            match &s.wire {
                Wire::Grpc => {
                    if !pb_done {
                        self.pb.encode(&meta, b, inst.map(|w| &w.pb));
                        pb_done = true;
                    }
                    s.pb.push(self.pb.last());
                }
                Wire::Json { subscription_id } => {
                    if !json_done {
                        self.json.clear();
                        json::encode_tick(&mut self.json, &meta, b, inst.map(|w| &w.json));
                        json_done = true;
                    }
                    s.json.push(subscription_id, &self.json);
                }
            }
            if s.events == 0 {
                self.touched.push(slot);
            }
            s.note(t.partition, t.seq, ingest);
            if s.spec.policy == Policy::Conflate {
                s.items.push(Item {
                    partition: t.partition,
                    epoch,
                    seq: t.seq,
                    words: *b.words(),
                });
            }
            if s.events >= self.limits.max_batch {
                self.delivered += s.events as u64;
                self.dropped += seal(s, self.now_ns, &self.topic);
            }
        }
    }

    fn on_gap(&mut self, partition: u32, from: u64, to: u64) {
        tracing::warn!(topic = %self.topic, partition, from, to, "dispatcher was overrun; subscribers are told the exact range");
        let now = self.now_ns;
        for s in self.subs.iter_mut().flatten() {
            if s.catch_up.is_some() || s.closed {
                continue;
            }
            self.delivered += s.events as u64;
            self.dropped += seal(s, now, &self.topic);
            send_gap(s, &self.topic, partition, from, to, "overrun", now);
        }
    }

    /// Seals every batch built this cycle, and lets conflating
    /// subscribers catch up when their queue has room.
    fn flush(&mut self, sym: Option<&Symbology>) {
        let now = self.now_ns;
        for slot in std::mem::take(&mut self.touched) {
            if let Some(s) = self.subs.get_mut(slot as usize).and_then(Option::as_mut) {
                self.delivered += s.events as u64;
                self.dropped += seal(s, now, &self.topic);
            }
        }
        let mut closed = Vec::new();
        for s in self.subs.iter_mut().flatten() {
            // A feed that went quiet must not hide a gap: report it as soon
            // as the client has caught up, not with the next event.
            if !s.paused {
                report_skipped(s, &self.topic, now);
            }
            if s.conflating && s.outbox.has_room() {
                let mut items: Vec<(u32, Item)> = s.conflated.drain().collect();
                items.sort_by_key(|(_, i)| (i.partition, i.seq));
                s.conflating = false;
                s.slow_noticed = false;
                for (id, i) in items {
                    let b = ArchivedFrameBody::from_words(&i.words);
                    let meta = TickMeta {
                        topic: &self.topic,
                        partition: i.partition,
                        epoch: i.epoch,
                        seq: i.seq,
                        send_time_ns: now,
                        snapshot: false,
                        conflated: true,
                        redeliveries: 0,
                    };
                    push_event(
                        s,
                        &meta,
                        b,
                        wires_of(&mut self.wires, id, sym.and_then(|y| y.get(id))),
                        &mut self.pb,
                        &mut self.json,
                    );
                    if s.events >= self.limits.max_batch {
                        self.delivered += s.events as u64;
                        self.dropped += seal(s, now, &self.topic);
                    }
                }
                self.delivered += s.events as u64;
                self.dropped += seal(s, now, &self.topic);
            }
            if s.closed {
                closed.push(s.id);
            }
        }
        for id in closed {
            self.remove(id);
        }
    }

    /// Publishes the latest-value table and counters for the API.
    fn publish(&mut self) {
        if !self.dirty.is_empty()
            && let Ok(mut l) = self.shared.latest.lock()
        {
            for id in self.dirty.drain(..) {
                if let Some(m) = self.dirty_mark.get_mut(id as usize) {
                    *m = false;
                }
                if let Some(Some(v)) = self.latest.get(id as usize) {
                    l.insert(id, *v);
                }
            }
        }
        self.shared
            .events
            .fetch_add(std::mem::take(&mut self.events), Ordering::Relaxed);
        self.shared
            .delivered
            .fetch_add(std::mem::take(&mut self.delivered), Ordering::Relaxed);
        self.shared
            .dropped
            .fetch_add(std::mem::take(&mut self.dropped), Ordering::Relaxed);
        if self.hist_merged.elapsed() >= HIST_EVERY
            && let Ok(mut h) = self.shared.dispatch_latency.try_lock()
        {
            let _ = h.add(&self.hist);
            self.hist.reset();
            self.hist_merged = Instant::now();
        }
        self.shared
            .subscribers
            .store(self.ids.len() as u64, Ordering::Relaxed);
    }

    fn add(&mut self, n: NewSub, reader: &Subscriber) -> Result<(), ApiError> {
        let sym = reader.symbology();
        let mut matches = Vec::new();
        if let Some(sym) = sym {
            for id in 1..=self.indexed.min(sym.count()) {
                if let Some(e) = sym.get(id)
                    && n.spec
                        .wants_instrument(e.symbol(), e.exchange(), e.currency())
                {
                    matches.push(id);
                }
            }
        }
        let positions: HashMap<u32, u64> = reader.positions().into_iter().collect();
        let catch_up = match &n.spec.start {
            StartSpec::Latest => None,
            StartSpec::Earliest => {
                Some(self.open_catch_up(positions.keys().map(|&p| (p, Start::Earliest)).collect())?)
            }
            &StartSpec::Time(t) => {
                Some(self.open_catch_up(positions.keys().map(|&p| (p, Start::Time(t))).collect())?)
            }
            StartSpec::After(ids) => {
                let mut starts = Vec::new();
                for (i, &(p, epoch, seq)) in ids.iter().enumerate() {
                    if !positions.contains_key(&p) {
                        return Err(ApiError::invalid(
                            format!("start_message_ids[{i}].partition"),
                            format!("topic {} has no partition {p}", self.topic),
                        ));
                    }
                    if epoch > self.epoch(p) {
                        return Err(ApiError::invalid(
                            format!("start_message_ids[{i}].epoch"),
                            format!(
                                "epoch {epoch} is newer than partition {p}'s writer ({})",
                                self.epoch(p)
                            ),
                        ));
                    }
                    if seq >= positions[&p] {
                        // At or beyond live: nothing to replay there.
                        continue;
                    }
                    starts.push((p, Start::Sequence(seq + 1)));
                }
                if starts.is_empty() {
                    None
                } else {
                    Some(self.open_catch_up(starts)?)
                }
            }
        };
        let mut s = LiveSub {
            id: n.id,
            spec: n.spec,
            wire: n.wire,
            outbox: n.outbox,
            matches,
            pb: BatchBuf::new(),
            json: json::JsonBatch::default(),
            events: 0,
            oldest_ingest_ns: 0,
            ranges: Vec::new(),
            items: Vec::new(),
            skipped: Vec::new(),
            slow_noticed: false,
            conflating: false,
            conflated: HashMap::new(),
            paused: false,
            catch_up,
            closed: false,
            log: self.shared.delivery_log.clone(),
            frames: 0,
        };
        let now = realtime_ns();
        if s.spec.snapshot {
            let mut count = 0u64;
            for &id in &s.matches.clone() {
                let Some(Some(l)) = self.latest.get(id as usize).copied() else {
                    continue;
                };
                let b = ArchivedFrameBody::from_words(&l.words);
                if !s.passes(b) {
                    continue;
                }
                let meta = TickMeta {
                    topic: &self.topic,
                    partition: l.partition,
                    epoch: l.epoch,
                    seq: l.seq,
                    send_time_ns: now,
                    snapshot: true,
                    conflated: false,
                    redeliveries: 0,
                };
                push_event(
                    &mut s,
                    &meta,
                    b,
                    wires_of(&mut self.wires, id, sym.and_then(|y| y.get(id))),
                    &mut self.pb,
                    &mut self.json,
                );
                count += 1;
                if s.events >= self.limits.max_batch {
                    self.delivered += s.events as u64;
                    self.dropped += seal(&mut s, now, &self.topic);
                }
            }
            self.delivered += s.events as u64;
            self.dropped += seal(&mut s, now, &self.topic);
            s.notice(
                notice::snapshot_complete(count),
                || serde_json::json!({"notice": "snapshot_complete", "instruments": count}),
                now,
            );
        }
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.subs.push(None);
                self.subs.len() - 1
            }
        };
        if s.catch_up.is_none() {
            for &id in &s.matches {
                if let Some(v) = self.index.get_mut(id as usize) {
                    v.push(slot as u32);
                }
            }
        }
        self.ids.insert(s.id, slot);
        self.subs[slot] = Some(s);
        self.shared
            .subscribers
            .store(self.ids.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn open_catch_up(&self, starts: Vec<(u32, Start)>) -> Result<Vec<(u32, Subscriber)>, ApiError> {
        let mut readers = Vec::new();
        for (p, start) in starts {
            let r = Subscriber::builder(self.topic.clone())
                .node_dir(&self.node_dir)
                .partitions([p])
                .start(start)
                .open()
                .map_err(|e| {
                    tracing::warn!(topic = %self.topic, partition = p, error = %e, "cannot open a replay reader");
                    ApiError::Limit(format!(
                        "cannot replay partition {p} now (reader slots in use); retry or start at LATEST"
                    ))
                })?;
            readers.push((p, r));
        }
        Ok(readers)
    }

    /// Replays catching-up subscriptions up to the dispatcher's position,
    /// then makes them live.
    fn catch_up(&mut self, reader: &Subscriber) {
        if !self.catching_up() {
            return;
        }
        let live: HashMap<u32, u64> = reader.positions().into_iter().collect();
        let now = self.now_ns;
        let topic = self.topic.clone();
        for slot in 0..self.subs.len() {
            let Some(s) = self.subs[slot].as_mut() else {
                continue;
            };
            let Some(mut readers) = s.catch_up.take() else {
                continue;
            };
            let mut done = true;
            let mut budget = 65_536usize;
            for (p, r) in readers.iter_mut() {
                let target = live.get(p).copied().unwrap_or(0);
                // Replayed events carry the epoch that wrote them.
                let epochs = r.epochs(*p);
                loop {
                    let next = r.positions().first().map_or(target, |x| x.1);
                    if next >= target {
                        break;
                    }
                    if budget == 0 || !s.outbox.has_room() {
                        done = false;
                        break;
                    }
                    let want = ((target - next) as usize).min(512).min(budget);
                    let live_epoch = self.epochs.get(*p as usize).copied().unwrap_or(0);
                    let mut gaps = Vec::new();
                    let (pb, js, wires) = (&mut self.pb, &mut self.json, &mut self.wires);
                    let n = r.poll(want, |ev| match ev {
                        Event::Tick(t)
                            if t.seq < target
                                && s.passes(t.body)
                                && s.matches.binary_search(&t.body.instrument_id()).is_ok() =>
                        {
                            let meta = TickMeta {
                                topic: &topic,
                                partition: t.partition,
                                epoch: tickwire_proto::journal::epoch_of(&epochs, t.seq)
                                    .unwrap_or(live_epoch),
                                seq: t.seq,
                                send_time_ns: now,
                                snapshot: false,
                                conflated: false,
                                redeliveries: 0,
                            };
                            let inst = wires_of(wires, t.body.instrument_id(), t.instrument());
                            push_event(s, &meta, t.body, inst, pb, js);
                        }
                        Event::Gap {
                            partition,
                            from,
                            to,
                        } => gaps.push((partition, from, to)),
                        _ => {}
                    });
                    budget = budget.saturating_sub(n.max(1));
                    if !gaps.is_empty() || s.events >= self.limits.max_batch {
                        self.delivered += s.events as u64;
                        self.dropped += seal(s, now, &topic);
                    }
                    for (gp, from, to) in gaps {
                        send_gap(
                            s,
                            &topic,
                            gp,
                            from,
                            to.min(target.saturating_sub(1)),
                            "overrun",
                            now,
                        );
                    }
                    if n == 0 {
                        done = false;
                        break;
                    }
                }
            }
            self.delivered += s.events as u64;
            self.dropped += seal(s, now, &topic);
            if done {
                for &id in &s.matches {
                    if let Some(v) = self.index.get_mut(id as usize) {
                        v.push(slot as u32);
                    }
                }
            } else {
                s.catch_up = Some(readers);
            }
        }
    }

    fn remove(&mut self, id: u64) {
        let Some(slot) = self.ids.remove(&id) else {
            return;
        };
        if let Some(s) = self.subs[slot].take() {
            for &i in &s.matches {
                if let Some(v) = self.index.get_mut(i as usize) {
                    v.retain(|&x| x as usize != slot);
                }
            }
        }
        self.touched.retain(|&x| x as usize != slot);
        self.free.push(slot);
        self.shared
            .subscribers
            .store(self.ids.len() as u64, Ordering::Relaxed);
    }

    fn close_all(&mut self, why: Closed) {
        let now = realtime_ns();
        for s in self.subs.iter_mut().flatten() {
            self.delivered += s.events as u64;
            self.dropped += seal(s, now, &self.topic);
            s.notice(
                notice::end(&why.reason()),
                || serde_json::json!({"notice": "end", "reason": why.reason()}),
                now,
            );
            s.outbox.close(why.clone());
        }
    }
}

/// An instrument's strings in both wire formats.
pub(crate) struct Wires {
    pub(crate) pb: InstrumentFields,
    pub(crate) json: json::JsonInstrument,
}

/// The instrument's wires from the cache, encoded from its symbology entry
/// the first time (entries never change once written).
pub(crate) fn wires_of<'a>(
    cache: &'a mut Vec<Option<Box<Wires>>>,
    id: u32,
    entry: Option<&Entry>,
) -> Option<&'a Wires> {
    let idx = id as usize;
    if cache.get(idx).is_none_or(Option::is_none) {
        let e = entry?;
        if cache.len() <= idx {
            cache.resize_with(idx + 1, || None);
        }
        cache[idx] = Some(Box::new(Wires {
            pb: InstrumentFields::new(e),
            json: json::JsonInstrument::new(e),
        }));
    }
    cache.get(idx)?.as_deref()
}

/// Appends one event to a subscriber's batch in its wire format.
fn push_event(
    s: &mut LiveSub,
    meta: &TickMeta<'_>,
    b: &ArchivedFrameBody,
    inst: Option<&Wires>,
    pb: &mut TickEncoder,
    js: &mut String,
) {
    match &s.wire {
        Wire::Grpc => s.pb.push(pb.encode(meta, b, inst.map(|w| &w.pb))),
        Wire::Json { subscription_id } => {
            js.clear();
            json::encode_tick(js, meta, b, inst.map(|w| &w.json));
            s.json.push(subscription_id, js);
        }
    }
    s.note(meta.partition, meta.seq, b.ts_ingest());
}

fn send_gap(
    s: &mut LiveSub,
    topic: &str,
    partition: u32,
    from: u64,
    to: u64,
    reason: &str,
    now: u64,
) {
    if from > to {
        return;
    }
    s.outbox.counters.gaps.fetch_add(1, Ordering::Relaxed);
    s.log.push(DeliveryRecord {
        ts_ns: now,
        topic: topic.to_string(),
        partition,
        from,
        to,
        subscription: s.log_name(),
        status: "failed",
        reason: reason.to_string(),
        latency_ms: None,
    });
    s.notice(
        notice::gap(topic, partition, from, to, reason),
        || {
            serde_json::json!({"notice": "gap", "topic": topic, "partition": partition,
                "from_sequence": from, "to_sequence": to, "reason": reason})
        },
        now,
    );
}

/// Sends the gap notices of what a subscriber skipped once its queue has
/// room again; false while it has not (nothing may be sent before them).
fn report_skipped(s: &mut LiveSub, topic: &str, now: u64) -> bool {
    if s.skipped.is_empty() {
        return true;
    }
    if !s.outbox.has_room() {
        return false;
    }
    for (p, from, to, reason) in std::mem::take(&mut s.skipped) {
        send_gap(s, topic, p, from, to, reason, now);
    }
    s.slow_noticed = false;
    true
}

/// Seals a subscriber's batch into a frame and offers it to the queue,
/// applying the slow-consumer policy when it is full. Returns the events
/// dropped.
fn seal(s: &mut LiveSub, now: u64, topic: &str) -> u64 {
    if s.events == 0 {
        return 0;
    }
    let events = std::mem::take(&mut s.events);
    let frame = Frame {
        bytes: match &s.wire {
            Wire::Grpc => Payload::Binary(s.pb.take().0),
            Wire::Json { subscription_id } => Payload::Text(s.json.take(subscription_id, now)),
        },
        events,
        oldest_ingest_ns: s.oldest_ingest_ns,
    };
    let ranges = std::mem::take(&mut s.ranges);
    if s.closed {
        return events as u64;
    }
    // What was skipped is reported before anything after it.
    if !report_skipped(s, topic, now) {
        for (p, from, to) in ranges {
            s.skip(p, from, to, "slow_consumer");
        }
        s.items.clear();
        s.outbox
            .counters
            .dropped
            .fetch_add(events as u64, Ordering::Relaxed);
        return events as u64;
    }
    let items = std::mem::take(&mut s.items);
    let oldest = frame.oldest_ingest_ns;
    let Err(_) = s.outbox.try_push(frame) else {
        s.frames += 1;
        let every = s.log.sample_every;
        if every > 0
            && s.frames.is_multiple_of(every)
            && let Some(&(p, from, to)) = ranges.first()
        {
            s.log.push(DeliveryRecord {
                ts_ns: now,
                topic: topic.to_string(),
                partition: p,
                from,
                to,
                subscription: s.log_name(),
                status: "delivered",
                reason: String::new(),
                latency_ms: (oldest > 0).then(|| now.saturating_sub(oldest) as f64 / 1e6),
            });
        }
        return 0;
    };
    let (qe, qb) = s.outbox.depth();
    let full = s.outbox.full();
    let policy = s.spec.policy;
    let slow = |dropped: u64, conflated: u64, detail: String| pb::SlowConsumerNotice {
        policy: policy.name().into(),
        queued_events: qe as u64,
        queued_bytes: qb as u64,
        dropped,
        conflated,
        detail,
    };
    match policy {
        Policy::Drop => {
            for (p, from, to) in ranges {
                s.skip(p, from, to, "slow_consumer");
            }
            let c = &s.outbox.counters;
            let dropped = c.dropped.fetch_add(events as u64, Ordering::Relaxed) + events as u64;
            if !s.slow_noticed {
                s.slow_noticed = true;
                let n = slow(
                    dropped,
                    0,
                    format!(
                        "{full}: skipping to live; a gap notice with the exact range follows when you catch up"
                    ),
                );
                s.notice(notice::slow(n.clone()), || slow_json(&n), now);
            }
            events as u64
        }
        Policy::Conflate => {
            for i in items {
                let id = ArchivedFrameBody::from_words(&i.words).instrument_id();
                if s.conflated.insert(id, i).is_some() {
                    s.outbox.counters.conflated.fetch_add(1, Ordering::Relaxed);
                }
            }
            s.conflating = true;
            if !s.slow_noticed {
                s.slow_noticed = true;
                let n = slow(
                    0,
                    s.outbox.counters.conflated.load(Ordering::Relaxed),
                    format!("{full}: keeping the latest event per instrument until you catch up"),
                );
                s.notice(notice::slow(n.clone()), || slow_json(&n), now);
            }
            0
        }
        Policy::Disconnect => {
            let why = format!("{full} ({qe} events, {qb} bytes queued); policy disconnect");
            s.closed = true;
            s.notice(
                notice::end(&format!("slow consumer: {why}")),
                || serde_json::json!({"notice": "end", "reason": format!("slow consumer: {why}")}),
                now,
            );
            s.outbox.close(Closed::SlowConsumer(why));
            events as u64
        }
    }
}

fn slow_json(n: &pb::SlowConsumerNotice) -> serde_json::Value {
    serde_json::json!({
        "notice": "slow_consumer",
        "policy": n.policy,
        "queued_events": n.queued_events,
        "queued_bytes": n.queued_bytes,
        "dropped": n.dropped,
        "conflated": n.conflated,
        "detail": n.detail,
    })
}

//! Subscription groups for remote consumers: several gRPC streams or
//! WebSocket subscriptions with the same subscription name share one
//! group of type Exclusive, Failover, Shared or Key_Shared, at most once
//! (done when sent) or at least once (done when acknowledged; redelivered
//! when a member dies, leaves or does not acknowledge in time; dead-lettered
//! after the most redeliveries allowed).
//!
//! ```text
//!  ring partitions ──(journal when behind)──> group thread ── Core: who gets what, acks, drain
//!                                                │                    │
//!                                                │ encoded batches    └ cursors -> store (every 200 ms)
//!                                                └──────────────> member outboxes -> gRPC / WS writers
//! ```
//!
//! Each group has its own thread and its own reader of every partition,
//! starting at the group's acknowledged cursors (from the command-side
//! store, so an at-least-once group survives a broker restart) or at the
//! request's start position for a new group. The reader is never
//! tethered: when the group falls behind the ring, it reads what the ring
//! overwrote from the journal, so a slow group loses nothing the journal
//! keeps and never slows ingest or the other readers. A member's credit
//! window (`receiver_queue_size`) bounds what it holds unacknowledged.
//!
//! Cursors are written every [`SAVE_EVERY`] when they moved, and when the
//! group stops: a hard crash of the broker redelivers at most what was
//! acknowledged in the last [`SAVE_EVERY`], plus events acknowledged out of
//! order above a cursor (only the cursor is stored, as a position).

pub mod core;
mod seqmap;
pub mod shm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shm_client::{Event, Start, Subscriber, WaitStrategy};
use tickwire_proto::frame::{ArchivedFrameBody, BODY_WORDS};
use tickwire_proto::futex::realtime_ns;
use tickwire_proto::grpc::{BatchBuf, TickEncoder, TickMeta, notice};
use tickwire_proto::pb;
use tickwire_proto::symbology::Symbology;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use self::core::{Core, DeadLetter, Delivery};
pub use self::core::{Counters, GroupType, MemberStats};
use crate::EdgeState;
use crate::dispatch::outbox::{Closed, Frame, Outbox, Payload};
use crate::dispatch::{Wire, Wires, json, wires_of};
use crate::error::ApiError;
use crate::spec::{GroupOpts, StartSpec, SubscriptionSpec};
use crate::store::{DeadLetterRow, Store};

/// How often moved cursors are written to the store.
pub const SAVE_EVERY: Duration = Duration::from_millis(200);

/// Events read ahead of what members can take, per group.
const READ_AHEAD: usize = 16_384;

/// A group with no members stops after this long (its cursors saved).
const LINGER: Duration = Duration::from_secs(5);

/// A group's figures, published every 100 ms.
#[derive(Debug, Clone, Default)]
pub struct GroupSnapshot {
    /// Members.
    pub members: Vec<MemberStats>,
    /// Counters.
    pub counters: Counters,
    /// Read, not yet sent.
    pub ready: usize,
    /// Sent, not yet acknowledged.
    pub unacked: usize,
    /// (partition, first sequence not done).
    pub cursors: Vec<(u32, u64)>,
    /// Events the group could not read (gone from the ring and the journal).
    pub lost: u64,
    /// Sending paused.
    pub paused: bool,
}

/// What a group shares with the API.
#[derive(Debug)]
pub struct GroupShared {
    /// Topic.
    pub topic: String,
    /// Subscription name.
    pub name: String,
    /// Type.
    pub kind: GroupType,
    /// At least once (acknowledgements).
    pub acked: bool,
    /// Deliveries again after which an event is dead-lettered (0: never);
    /// every member takes the group's.
    pub max_redeliveries: u32,
    /// Figures.
    pub snapshot: Mutex<GroupSnapshot>,
    /// The thread has ended.
    pub stopped: AtomicBool,
    /// When it started, UTC ns.
    pub started_ns: u64,
}

enum Ctl {
    Join {
        id: u64,
        opts: GroupOpts,
        wire: Wire,
        outbox: Arc<Outbox>,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    Leave(u64),
    Ack {
        member: u64,
        ids: Vec<(u32, u64)>,
        cumulative: bool,
    },
    Pause(bool),
    Close(Closed),
    /// End the members' streams and stop now, writing no cursor (the
    /// subscription's cursor is being reset).
    Stop(Closed),
}

struct Entry {
    tx: Sender<Ctl>,
    shared: Arc<GroupShared>,
}

type Registry = Arc<Mutex<HashMap<(String, String), Entry>>>;

/// Every subscription group of the node.
#[derive(Default)]
pub struct Groups {
    map: Registry,
    next_member: AtomicU64,
    create: tokio::sync::Mutex<()>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// One consumer's membership; dropping it leaves the group.
pub struct MemberHandle {
    /// Member id.
    pub id: u64,
    /// Its queue.
    pub outbox: Arc<Outbox>,
    /// Heartbeat interval asked for.
    pub heartbeat: Duration,
    /// The group.
    pub group: Arc<GroupShared>,
    tx: Sender<Ctl>,
}

impl MemberHandle {
    /// Acknowledges events by (partition, sequence): each one, or with
    /// `cumulative` everything this member was sent on each partition up
    /// to and including it (Exclusive and Failover only, as in Pulsar).
    ///
    /// # Errors
    /// [`ApiError::Invalid`] for a cumulative ack on Shared or Key_Shared,
    /// or on an at-most-once group; [`ApiError::Unavailable`] when the
    /// group has stopped.
    pub fn ack(&self, ids: Vec<(u32, u64)>, cumulative: bool) -> Result<(), ApiError> {
        if !self.group.acked {
            return Err(ApiError::invalid(
                "ack",
                "this subscription is AT_MOST_ONCE: there is nothing to acknowledge",
            ));
        }
        if cumulative && matches!(self.group.kind, GroupType::Shared | GroupType::KeyShared) {
            return Err(ApiError::invalid(
                "cumulative",
                format!(
                    "a {} subscription acknowledges each message; cumulative acks are for Exclusive and Failover",
                    self.group.kind.name()
                ),
            ));
        }
        self.tx
            .send(Ctl::Ack {
                member: self.id,
                ids,
                cumulative,
            })
            .map_err(|_| ApiError::Unavailable("the subscription group has stopped".into()))
    }
}

impl Drop for MemberHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Ctl::Leave(self.id));
    }
}

/// The store's id of a subscription: `<topic>/<name>`.
pub fn subscription_id(topic: &str, name: &str) -> String {
    format!("{topic}/{name}")
}

impl Groups {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A group's figures, if it is running.
    pub fn get(&self, topic: &str, name: &str) -> Option<Arc<GroupShared>> {
        self.lock()
            .get(&(topic.to_string(), name.to_string()))
            .filter(|e| !e.shared.stopped.load(Ordering::Acquire))
            .map(|e| e.shared.clone())
    }

    /// Every running group.
    pub fn all(&self) -> Vec<Arc<GroupShared>> {
        self.lock()
            .values()
            .filter(|e| !e.shared.stopped.load(Ordering::Acquire))
            .map(|e| e.shared.clone())
            .collect()
    }

    /// Pauses or resumes a running group (a no-op when none runs).
    pub fn set_paused(&self, topic: &str, name: &str, paused: bool) {
        if let Some(e) = self.lock().get(&(topic.to_string(), name.to_string())) {
            let _ = e.tx.send(Ctl::Pause(paused));
        }
    }

    /// Ends a running group's streams (its subscription was deleted).
    pub fn close(&self, topic: &str, name: &str, why: Closed) {
        if let Some(e) = self.lock().get(&(topic.to_string(), name.to_string())) {
            let _ = e.tx.send(Ctl::Close(why));
        }
    }

    /// Stops a running group at once, writing no cursor, and waits (up to
    /// 5 s) until it has: the caller is about to write its cursors. Hold
    /// [`Groups::creating`] across this and the write, so that no group
    /// starts from the old cursors meanwhile.
    pub async fn stop(&self, topic: &str, name: &str, why: Closed) {
        let running = {
            let map = self.lock();
            map.get(&(topic.to_string(), name.to_string()))
                .map(|e| (e.tx.clone(), e.shared.clone()))
        };
        let Some((tx, shared)) = running else {
            return;
        };
        let _ = tx.send(Ctl::Stop(why));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !shared.stopped.load(Ordering::Acquire) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A cursor write the group sent off before it stopped lands first.
        tokio::time::sleep(SAVE_EVERY + Duration::from_millis(100)).await;
    }

    /// The lock a group's creation takes: held, no group starts.
    pub async fn creating(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.create.lock().await
    }

    /// Waits for every group thread (after the cancel token fired).
    pub fn join(&self) {
        crate::dispatch::join_all(&self.threads);
    }
}

/// Joins (or starts) the group `spec` names; frames arrive in the handle's
/// outbox, and `notify` is woken when there is something to send.
///
/// # Errors
/// [`ApiError::Invalid`] when the group exists with another type or
/// delivery mode; [`ApiError::Conflict`] (gRPC FAILED_PRECONDITION) for a second consumer of
/// an Exclusive subscription; [`ApiError::NotFound`] for a topic without
/// rings; [`ApiError::Unavailable`] when the store or the rings cannot be
/// read.
pub async fn join(
    state: &Arc<EdgeState>,
    spec: SubscriptionSpec,
    wire: Wire,
    notify: Arc<Notify>,
) -> Result<MemberHandle, ApiError> {
    let Some(opts) = spec.group.clone() else {
        return Err(ApiError::internal("not a group subscription"));
    };
    let groups = &state.groups;
    let key = (spec.topic.clone(), spec.name.clone());
    let id = groups.next_member.fetch_add(1, Ordering::Relaxed) + 1;
    let outbox = Arc::new(Outbox::new(
        state.config.queue_events,
        state.config.queue_bytes,
        state.hub.budget().clone(),
        notify,
    ));
    let (reply, answer) = oneshot::channel();
    let ctl = Ctl::Join {
        id,
        opts: opts.clone(),
        wire,
        outbox: outbox.clone(),
        reply,
    };
    // One creation at a time: two first members must not start two groups.
    let _creating = groups.create.lock().await;
    let running = {
        let map = groups.lock();
        map.get(&key)
            .filter(|e| !e.shared.stopped.load(Ordering::Acquire))
            .map(|e| (e.tx.clone(), e.shared.clone()))
    };
    let (tx, shared, ctl) = match running {
        Some((tx, shared)) => {
            if shared.kind != opts.kind || shared.acked != opts.acked {
                return Err(ApiError::invalid(
                    "subscription_type",
                    format!(
                        "subscription {} is {} {}; this consumer asked for {} {}",
                        spec.name,
                        shared.kind.name(),
                        mode_name(shared.acked),
                        opts.kind.name(),
                        mode_name(opts.acked)
                    ),
                ));
            }
            if shared.acked && shared.max_redeliveries != opts.max_redeliveries {
                return Err(ApiError::invalid(
                    "max_redeliveries",
                    format!(
                        "subscription {} dead-letters an event after {} redeliveries; this consumer asked for {}: every member of a group takes the same",
                        spec.name,
                        redeliveries_name(shared.max_redeliveries),
                        redeliveries_name(opts.max_redeliveries)
                    ),
                ));
            }
            (tx, shared, ctl)
        }
        None => {
            let (tx, shared) = start(state, &spec, &opts).await?;
            (tx, shared, ctl)
        }
    };
    tx.send(ctl)
        .map_err(|_| ApiError::Unavailable("the subscription group has stopped; retry".into()))?;
    drop(_creating);
    answer
        .await
        .map_err(|_| ApiError::Unavailable("the subscription group has stopped; retry".into()))??;
    Ok(MemberHandle {
        id,
        outbox,
        heartbeat: spec.heartbeat,
        group: shared,
        tx,
    })
}

/// A `max_redeliveries` as the refusal says it (0: no limit).
fn redeliveries_name(n: u32) -> String {
    if n == 0 {
        "unlimited (0)".into()
    } else {
        n.to_string()
    }
}

fn mode_name(acked: bool) -> &'static str {
    if acked {
        "AT_LEAST_ONCE"
    } else {
        "AT_MOST_ONCE"
    }
}

/// Starts a group's thread: its reader at the stored cursors (at least
/// once) or the request's start.
async fn start(
    state: &Arc<EdgeState>,
    spec: &SubscriptionSpec,
    opts: &GroupOpts,
) -> Result<(Sender<Ctl>, Arc<GroupShared>), ApiError> {
    let sub_id = subscription_id(&spec.topic, &spec.name);
    let store = state.store().ok().cloned();
    let cursors = match (&store, opts.acked) {
        (Some(s), true) => s.cursors(&sub_id).await.map_err(|e| {
            tracing::error!(subscription = %sub_id, error = %e, "cannot read the group's cursors");
            ApiError::Unavailable(format!(
                "the cursors of subscription {} cannot be read now",
                spec.name
            ))
        })?,
        _ => Vec::new(),
    };
    let node_dir = state.engine.node_dir();
    let mut b = Subscriber::builder(spec.topic.clone())
        .node_dir(&node_dir)
        .journal_fill(true)
        .wait(WaitStrategy::Futex { spins: 200 });
    b = match &spec.start {
        StartSpec::Latest | StartSpec::After(_) => b.start(Start::Latest),
        StartSpec::Earliest => b.start(Start::Earliest),
        &StartSpec::Time(t) => b.start(Start::Time(t)),
    };
    if let StartSpec::After(ids) = &spec.start {
        for &(p, _, seq) in ids {
            b = b.resume_at(p, seq + 1);
        }
    }
    let resumed = !cursors.is_empty();
    for &(p, next) in &cursors {
        b = b.resume_at(p, next);
    }
    let reader = b
        .open()
        .map_err(|e| crate::dispatch::open_error(&spec.topic, "a subscription group", e))?;
    let mut core = Core::new(
        opts.kind,
        !opts.acked,
        opts.ack_timeout.as_nanos() as u64,
        opts.max_redeliveries,
    );
    for (p, next) in reader.positions() {
        core.add_partition(p, next);
    }
    let shared = Arc::new(GroupShared {
        topic: spec.topic.clone(),
        name: spec.name.clone(),
        kind: opts.kind,
        acked: opts.acked,
        max_redeliveries: opts.max_redeliveries,
        snapshot: Mutex::new(GroupSnapshot::default()),
        stopped: AtomicBool::new(false),
        started_ns: realtime_ns(),
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let sym = Symbology::open(&node_dir).ok().map(Arc::new);
    let g = Group {
        sub_id,
        node_dir: node_dir.clone(),
        spec: spec.clone(),
        store: if opts.acked { store } else { None },
        runtime: tokio::runtime::Handle::current(),
        reader,
        rx,
        core,
        shared: shared.clone(),
        members: Vec::new(),
        sym,
        inst: Vec::new(),
        wires: Vec::new(),
        buf: Vec::new(),
        out: Vec::new(),
        pb: TickEncoder::new(),
        js: String::with_capacity(1024),
        max_batch: state.config.max_batch,
        saved: cursors.clone(),
        saving: Arc::new(AtomicBool::new(false)),
        lost: 0,
        registry: state.groups.map.clone(),
        edge: state.clone(),
        key: (spec.topic.clone(), spec.name.clone()),
        stop_now: false,
    };
    tracing::info!(
        topic = %spec.topic,
        subscription = %spec.name,
        kind = opts.kind.name(),
        mode = mode_name(opts.acked),
        resumed,
        cursors = ?cursors,
        "subscription group started"
    );
    let cancel = state.cancel.clone();
    let thread = std::thread::Builder::new()
        .name("tickwire-group".into())
        .spawn(move || g.run(cancel))
        .map_err(ApiError::internal)?;
    state
        .groups
        .threads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(thread);
    state.groups.lock().insert(
        (spec.topic.clone(), spec.name.clone()),
        Entry {
            tx: tx.clone(),
            shared: shared.clone(),
        },
    );
    Ok((tx, shared))
}

/// What the group keeps of an event it read.
#[derive(Clone, Copy)]
struct Item {
    epoch: u64,
    words: [u64; BODY_WORDS],
}

/// Per instrument: not looked at yet, wanted (with its Key_Shared slot),
/// or not wanted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inst {
    Unknown,
    Wanted(u16),
    Unwanted,
}

struct Member {
    id: u64,
    wire: Wire,
    outbox: Arc<Outbox>,
    pb: BatchBuf,
    json: json::JsonBatch,
    events: u32,
    oldest_ingest_ns: u64,
}

struct Group {
    /// For the dead-letter topic ([`publish_dead_letters`]).
    edge: Arc<EdgeState>,
    sub_id: String,
    node_dir: PathBuf,
    spec: SubscriptionSpec,
    store: Option<Arc<Store>>,
    runtime: tokio::runtime::Handle,
    reader: Subscriber,
    rx: Receiver<Ctl>,
    core: Core<Item>,
    shared: Arc<GroupShared>,
    members: Vec<Member>,
    sym: Option<Arc<Symbology>>,
    inst: Vec<Inst>,
    wires: Vec<Option<Box<Wires>>>,
    /// Events of the last poll: (partition, seq, words), or a gap.
    buf: Vec<Read>,
    out: Vec<Delivery<Item>>,
    pb: TickEncoder,
    js: String,
    max_batch: u32,
    /// Cursors last written.
    saved: Vec<(u32, u64)>,
    saving: Arc<AtomicBool>,
    lost: u64,
    registry: Registry,
    key: (String, String),
    /// Stopped for a cursor reset: leave at once, write nothing.
    stop_now: bool,
}

enum Read {
    Tick(u32, u64, [u64; BODY_WORDS]),
    Gap(u32, u64, u64),
    Added(u32),
    Gone(bool),
}

impl Group {
    fn run(mut self, cancel: CancellationToken) {
        let mut last_expire = Instant::now();
        let mut last_save = Instant::now();
        let mut last_publish = Instant::now();
        let mut empty_since: Option<Instant> = Some(Instant::now());
        loop {
            if cancel.is_cancelled() {
                self.close_all(Closed::Shutdown);
                break;
            }
            let mut busy = self.controls();
            if self.stop_now {
                let mut map = self.registry.lock().unwrap_or_else(|p| p.into_inner());
                if map
                    .get(&self.key)
                    .is_some_and(|e| Arc::ptr_eq(&e.shared, &self.shared))
                {
                    map.remove(&self.key);
                }
                break;
            }
            if self.members.is_empty() {
                let since = *empty_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= LINGER && self.retire() {
                    break;
                }
            } else {
                empty_since = None;
            }
            let now = realtime_ns();
            if self.core.ready_len() < READ_AHEAD {
                match self.read() {
                    Err(why) => {
                        tracing::info!(subscription = %self.sub_id, reason = %why, "subscription group stopping");
                        self.close_all(Closed::TopicGone(why));
                        break;
                    }
                    Ok(n) => busy |= n > 0,
                }
            }
            if last_expire.elapsed() >= Duration::from_millis(20) {
                let (mut removed, mut dead) = (Vec::new(), Vec::new());
                self.core.expire(now, &mut removed, &mut dead);
                for id in removed {
                    if let Some(i) = self.members.iter().position(|m| m.id == id) {
                        let m = self.members.remove(i);
                        tracing::warn!(subscription = %self.sub_id, member = id, "consumer removed: it did not acknowledge within the ack timeout");
                        m.outbox.close(Closed::Removed(format!(
                            "removed from subscription {}: a message was not acknowledged within the ack timeout; what it held goes to the other consumers",
                            self.spec.name
                        )));
                    }
                }
                self.dead_letters(dead, now);
                last_expire = Instant::now();
            }
            busy |= self.send(now) > 0;
            if last_save.elapsed() >= SAVE_EVERY {
                self.save(false);
                last_save = Instant::now();
            }
            if last_publish.elapsed() >= Duration::from_millis(100) {
                self.publish();
                last_publish = Instant::now();
            }
            if !busy {
                if self.core.ready_len() > 0 {
                    // Waiting for credit: an ack wakes us.
                    match self.rx.recv_timeout(Duration::from_millis(1)) {
                        Ok(c) => self.control(c),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => {}
                    }
                } else {
                    self.reader.wait_for_data(Duration::from_millis(1));
                }
            }
        }
        if !self.stop_now {
            self.save(true);
        }
        self.publish();
        self.shared.stopped.store(true, Ordering::Release);
    }

    /// Leaves the registry when nothing more can arrive; false when a
    /// control message came in meanwhile.
    fn retire(&mut self) -> bool {
        let registry = self.registry.clone();
        let mut map = registry.lock().unwrap_or_else(|p| p.into_inner());
        // Joiners send under this lock: an empty channel now stays empty.
        match self.rx.try_recv() {
            Ok(c) => {
                drop(map);
                self.control(c);
                false
            }
            Err(_) => {
                if map
                    .get(&self.key)
                    .is_some_and(|e| Arc::ptr_eq(&e.shared, &self.shared))
                {
                    map.remove(&self.key);
                }
                true
            }
        }
    }

    fn controls(&mut self) -> bool {
        let mut any = false;
        loop {
            match self.rx.try_recv() {
                Ok(c) => {
                    self.control(c);
                    any = true;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return any,
            }
        }
    }

    fn control(&mut self, c: Ctl) {
        match c {
            Ctl::Join {
                id,
                opts,
                wire,
                outbox,
                reply,
            } => {
                let r = self
                    .core
                    .join_with_timeout(
                        id,
                        &opts.consumer,
                        opts.priority,
                        opts.window,
                        opts.ack_timeout.as_nanos() as u64,
                    )
                    .map_err(|e| {
                        ApiError::Conflict(format!("subscription {}: {e}", self.spec.name))
                    });
                if r.is_ok() {
                    self.members.push(Member {
                        id,
                        wire,
                        outbox,
                        pb: BatchBuf::new(),
                        json: json::JsonBatch::default(),
                        events: 0,
                        oldest_ingest_ns: 0,
                    });
                    tracing::debug!(subscription = %self.sub_id, member = id, consumer = %opts.consumer, "consumer joined");
                }
                let _ = reply.send(r);
            }
            Ctl::Leave(id) => {
                let mut dead = Vec::new();
                self.core.leave(id, &mut dead);
                self.members.retain(|m| m.id != id);
                self.dead_letters(dead, realtime_ns());
            }
            Ctl::Ack {
                member,
                ids,
                cumulative,
            } => {
                for (p, seq) in ids {
                    if cumulative {
                        self.core.ack_through(member, p, seq);
                    } else {
                        self.core.ack(member, p, seq);
                    }
                }
            }
            Ctl::Pause(p) => self.core.set_paused(p),
            Ctl::Close(why) => self.close_all(why),
            Ctl::Stop(why) => {
                self.close_all(why);
                self.stop_now = true;
            }
        }
    }

    fn close_all(&mut self, why: Closed) {
        let mut dead = Vec::new();
        for m in std::mem::take(&mut self.members) {
            self.core.leave(m.id, &mut dead);
            m.outbox.close(why.clone());
        }
        self.dead_letters(dead, realtime_ns());
    }

    /// Reads what the ring (or the journal) has, into the core.
    fn read(&mut self) -> Result<usize, String> {
        self.buf.clear();
        let buf = &mut self.buf;
        let want = READ_AHEAD - self.core.ready_len().min(READ_AHEAD);
        let n = self.reader.poll(want.clamp(1, 4096), |ev| match ev {
            Event::Tick(t) => buf.push(Read::Tick(t.partition, t.seq, *t.body.words())),
            Event::Gap {
                partition,
                from,
                to,
            } => buf.push(Read::Gap(partition, from, to)),
            Event::PartitionAdded { partition, .. } => buf.push(Read::Added(partition)),
            Event::Replaced { removed, .. } => buf.push(Read::Gone(removed)),
            _ => {}
        });
        let reads = std::mem::take(&mut self.buf);
        let now = realtime_ns();
        for r in &reads {
            match *r {
                Read::Tick(p, seq, words) => {
                    let b = ArchivedFrameBody::from_words(&words);
                    match self.instrument(b.instrument_id()) {
                        Inst::Wanted(slot) if self.spec.passes(b) => {
                            let epoch = self
                                .reader
                                .epoch_of(p, seq)
                                .or_else(|| self.reader.epoch(p))
                                .unwrap_or(0);
                            let key = self.core.key_of(p, slot);
                            self.core.offer(p, seq, key, Item { epoch, words });
                        }
                        _ => self.core.pass(p, seq),
                    }
                }
                Read::Gap(p, from, to) => {
                    tracing::warn!(subscription = %self.sub_id, partition = p, from, to, "subscription group lost events: gone from the ring and the journal");
                    self.lost += to - from + 1;
                    self.core.pass(p, to);
                    for m in &self.members {
                        gap_notice(m, &self.spec.topic, p, from, to, now);
                    }
                }
                Read::Added(p) => {
                    let next = self
                        .reader
                        .positions()
                        .into_iter()
                        .find(|x| x.0 == p)
                        .map_or(0, |x| x.1);
                    self.core.add_partition(p, next);
                }
                Read::Gone(removed) => {
                    return Err(if removed {
                        format!("topic {} was deleted", self.spec.topic)
                    } else {
                        format!("topic {} was recreated; subscribe again", self.spec.topic)
                    });
                }
            }
        }
        self.buf = reads;
        Ok(n)
    }

    /// Whether the subscription wants an instrument, and its slot.
    fn instrument(&mut self, id: u32) -> Inst {
        let idx = id as usize;
        if let Some(&i) = self.inst.get(idx)
            && i != Inst::Unknown
        {
            return i;
        }
        let mut entry = self.sym.as_ref().and_then(|s| s.get(id));
        if entry.is_none() && self.sym.as_ref().is_none_or(|s| id > s.count()) {
            // Interned after the table was opened: open it again.
            self.sym = Symbology::open(&self.node_dir).ok().map(Arc::new);
            entry = self.sym.as_ref().and_then(|s| s.get(id));
        }
        let v = match entry {
            // No names to filter by: a subscription to everything still
            // gets it (keyed by id); one that names instruments does not.
            None => {
                let s = &self.spec;
                return if s.symbols.is_empty() && s.exchanges.is_empty() && s.currencies.is_empty()
                {
                    Inst::Wanted(tickwire_proto::group::slot_of_unnamed(id))
                } else {
                    Inst::Unwanted
                };
            }
            Some(e) => {
                if self
                    .spec
                    .wants_instrument(e.symbol(), e.exchange(), e.currency())
                {
                    Inst::Wanted(self::core::slot_of(e.symbol(), e.exchange()))
                } else {
                    Inst::Unwanted
                }
            }
        };
        if idx < (1 << 24) {
            if self.inst.len() <= idx {
                self.inst.resize(idx + 1, Inst::Unknown);
            }
            self.inst[idx] = v;
        }
        v
    }

    /// Hands out what the core lets through, as batches.
    fn send(&mut self, now: u64) -> usize {
        self.out.clear();
        let members = &self.members;
        self.core.dispatch(
            now,
            4096,
            |id| {
                members
                    .iter()
                    .find(|m| m.id == id)
                    .is_some_and(|m| m.outbox.has_room())
            },
            &mut self.out,
        );
        let n = self.out.len();
        for i in 0..n {
            let d = self.out[i];
            let Some(m) = self.members.iter_mut().find(|m| m.id == d.member) else {
                continue;
            };
            let b = ArchivedFrameBody::from_words(&d.item.words);
            let meta = meta(
                &self.spec.topic,
                d.partition,
                d.seq,
                &d.item,
                now,
                d.redeliveries,
            );
            let inst = group_wires(&mut self.wires, self.sym.as_deref(), b.instrument_id());
            match &m.wire {
                Wire::Grpc => m.pb.push(self.pb.encode(&meta, b, inst.map(|w| &w.pb))),
                Wire::Json { subscription_id } => {
                    self.js.clear();
                    json::encode_tick(&mut self.js, &meta, b, inst.map(|w| &w.json));
                    m.json.push(subscription_id, &self.js);
                }
            }
            let ingest = b.ts_ingest();
            if m.events == 0 || ingest < m.oldest_ingest_ns {
                m.oldest_ingest_ns = ingest;
            }
            m.events += 1;
            if m.events >= self.max_batch {
                seal(m, now);
            }
        }
        for m in &mut self.members {
            seal(m, now);
        }
        n
    }

    fn dead_letters(&mut self, dead: Vec<DeadLetter<Item>>, now: u64) {
        if dead.is_empty() {
            return;
        }
        let mut rows = Vec::with_capacity(dead.len());
        let events: Vec<[u64; BODY_WORDS]> = dead.iter().map(|d| d.item.words).collect();
        for d in dead {
            tracing::warn!(subscription = %self.sub_id, partition = d.partition, seq = d.seq, deliveries = d.deliveries, "message dead-lettered");
            let inst = group_wires(&mut self.wires, self.sym.as_deref(), {
                ArchivedFrameBody::from_words(&d.item.words).instrument_id()
            });
            rows.push(dead_letter_row(
                &self.sub_id,
                &self.spec.topic,
                (d.partition, d.item.epoch, d.seq),
                &d.item.words,
                d.deliveries,
                inst,
                now,
            ));
        }
        let Some(store) = self.store.clone() else {
            return;
        };
        let sub = self.sub_id.clone();
        self.runtime.spawn(async move {
            if let Err(e) = store.insert_dead_letters(&rows).await {
                tracing::error!(subscription = %sub, error = %e, lost = rows.len(), "dead letters could not be written");
            }
        });
        let (edge, runtime) = (self.edge.clone(), self.runtime.clone());
        let (topic, name) = (self.spec.topic.clone(), self.spec.name.clone());
        // Making the topic waits for the shards: not on the group's thread.
        self.runtime.spawn_blocking(move || {
            publish_dead_letters(&edge, &runtime, &topic, &name, &events);
        });
    }

    /// Writes the cursors when they moved: in the background, or (at the
    /// end) waiting up to two seconds.
    fn save(&mut self, last: bool) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let cursors = self.core.cursors();
        if cursors == self.saved {
            return;
        }
        if self.saving.swap(true, Ordering::AcqRel) && !last {
            return;
        }
        let flag = self.saving.clone();
        let sub = self.sub_id.clone();
        let c = cursors.clone();
        let write = async move {
            let r = store.save_cursors(&sub, &c).await;
            flag.store(false, Ordering::Release);
            if let Err(e) = &r {
                tracing::error!(subscription = %sub, error = %e, "group cursors could not be written; retrying");
            }
            r.is_ok()
        };
        if last {
            let ok = self.runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(2), write)
                    .await
                    .unwrap_or(false)
            });
            if ok {
                self.saved = cursors;
            }
        } else {
            self.runtime.spawn(write);
            // Written or retried at the next round.
            self.saved = cursors;
        }
    }

    fn publish(&mut self) {
        let s = GroupSnapshot {
            members: self.core.member_stats(),
            counters: self.core.counters,
            ready: self.core.ready_len(),
            unacked: self.core.unacked_len(),
            cursors: self.core.cursors(),
            lost: self.lost,
            paused: self.core.paused(),
        };
        *self
            .shared
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = s;
    }
}

/// An instrument's encoded strings, from the group's symbology table.
fn group_wires<'a>(
    wires: &'a mut Vec<Option<Box<Wires>>>,
    sym: Option<&Symbology>,
    id: u32,
) -> Option<&'a Wires> {
    wires_of(wires, id, sym.and_then(|s| s.get(id)))
}

/// The dead-letter topic of subscription `name` on `topic`, named as
/// Pulsar names it: `<topic>-<subscription>-DLQ`.
pub fn dead_letter_topic(topic: &str, name: &str) -> String {
    format!("{topic}-{name}-DLQ")
}

/// Publishes events a group gave up on to its dead-letter topic
/// ([`dead_letter_topic`]), making the topic the first time: one
/// partition, kept in the command store as any topic made at run time, so
/// it is there again after a restart. Its events keep their event time,
/// source id and source sequence; the reason stays in the dead-letter
/// rows. Blocking (a topic is made by the shards): called off the
/// runtime's workers. A failure is logged; the rows keep the events.
pub(crate) fn publish_dead_letters(
    edge: &EdgeState,
    runtime: &tokio::runtime::Handle,
    topic: &str,
    name: &str,
    events: &[[u64; BODY_WORDS]],
) {
    if events.is_empty() {
        return;
    }
    let dlq = dead_letter_topic(topic, name);
    if !edge.engine.topics().iter().any(|t| t.name == dlq) {
        let req = pb::CreateTopicRequest {
            topic: dlq.clone(),
            partitions: 1,
            ..Default::default()
        };
        match runtime.block_on(crate::admin::create_topic(edge, req)) {
            Ok(_) => tracing::info!(topic = %dlq, "dead-letter topic created"),
            Err(ApiError::AlreadyExists { .. }) => {}
            Err(e) => {
                tracing::error!(topic = %dlq, error = %e, events = events.len(),
                    "the dead-letter topic cannot be made; the events are in the dead-letter rows only");
                return;
            }
        }
    }
    if let Err(e) = edge.engine.publish(&dlq, events) {
        tracing::error!(topic = %dlq, error = %e, events = events.len(),
            "dead letters not published to the dead-letter topic; they are in the dead-letter rows");
    }
}

/// The store's row for an event a group gave up on after `deliveries`
/// deliveries; `id` is (partition, epoch, sequence).
fn dead_letter_row(
    sub_id: &str,
    topic: &str,
    id: (u32, u64, u64),
    words: &[u64; BODY_WORDS],
    deliveries: u32,
    inst: Option<&Wires>,
    now: u64,
) -> DeadLetterRow {
    let (partition, epoch, seq) = id;
    let meta = TickMeta {
        topic,
        partition,
        epoch,
        seq,
        send_time_ns: now,
        snapshot: false,
        conflated: false,
        redeliveries: deliveries.saturating_sub(1),
    };
    let mut event = String::new();
    json::encode_tick(
        &mut event,
        &meta,
        ArchivedFrameBody::from_words(words),
        inst.map(|w| &w.json),
    );
    DeadLetterRow {
        subscription_id: sub_id.to_string(),
        topic_name: topic.to_string(),
        partition,
        sequence: seq,
        message_id: format!("{partition}:{epoch}:{seq}"),
        deliveries,
        reason: format!(
            "not acknowledged after {} deliveries (max_redeliveries {})",
            deliveries,
            deliveries.saturating_sub(1)
        ),
        event,
        created_at: tickwire_proto::json::rfc3339(now),
    }
}

/// The metadata of an event a group sends.
fn meta<'a>(
    topic: &'a str,
    partition: u32,
    seq: u64,
    item: &Item,
    now: u64,
    redeliveries: u32,
) -> TickMeta<'a> {
    TickMeta {
        topic,
        partition,
        epoch: item.epoch,
        seq,
        send_time_ns: now,
        snapshot: false,
        conflated: false,
        redeliveries,
    }
}

fn seal(m: &mut Member, now: u64) {
    if m.events == 0 {
        return;
    }
    let events = std::mem::take(&mut m.events);
    let bytes = match &m.wire {
        Wire::Grpc => Payload::Binary(m.pb.take().0),
        Wire::Json { subscription_id } => Payload::Text(m.json.take(subscription_id, now)),
    };
    m.outbox
        .counters
        .delivered
        .fetch_add(events as u64, Ordering::Relaxed);
    m.outbox.push(Frame {
        bytes,
        events,
        oldest_ingest_ns: m.oldest_ingest_ns,
    });
}

fn gap_notice(m: &Member, topic: &str, partition: u32, from: u64, to: u64, now: u64) {
    m.outbox.counters.gaps.fetch_add(1, Ordering::Relaxed);
    let bytes = match &m.wire {
        Wire::Grpc => Payload::Binary(notice::gap(topic, partition, from, to, "not_journaled").0),
        Wire::Json { subscription_id } => Payload::Text(json::message(
            "gap",
            serde_json::json!({
                "subscription_id": subscription_id.to_string(),
                "topic": topic, "partition": partition,
                "from_sequence": from, "to_sequence": to, "reason": "not_journaled",
            }),
            now,
        )),
    };
    m.outbox.push_notice(Frame {
        bytes,
        events: 0,
        oldest_ingest_ns: 0,
    });
}

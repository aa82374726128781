//! The broker's side of subscription groups over shared memory
//! (`shm_client::group` is the member's): the node's control socket,
//! membership, assignments, drains, ack timeouts, durable cursors and
//! dead letters. Events never pass through here: members read the rings.
//!
//! One thread serves every shm group of the node. A rebalance (a member
//! joins, leaves, dies, is removed; a partition appears; a resume) pauses
//! the members, takes each partition's switch at or past all their
//! positions, turns what departed members had not acknowledged into
//! ranges the others read again, and sends each member its selectors.
//!
//! Cursors: each member publishes its acknowledged cursor in its reader
//! slots; the group's cursor per partition is the lowest that any member,
//! departed member or unassigned range still needs, written to the command
//! store every [`SAVE_EVERY`] when it moved and when the broker stops. A
//! hard crash of the broker redelivers what was acknowledged since the
//! last write (at most [`SAVE_EVERY`]) and what was acknowledged out of
//! order above a cursor.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shm_client::group::wire::{
    Adopt, Assignment, Join, ReaderRef, Selector, SlotSet, ToBroker, ToMember,
};
use shm_client::group::{BATCH, CONTROL_SOCKET, SubscriptionType, key_slot};
use shm_client::{Event, Start, Subscriber};
use tickwire_proto::file::{RingFile, partition_paths, topic_partitions};
use tickwire_proto::futex::realtime_ns;
use tickwire_proto::group as rules;
use tickwire_proto::layout::unpack_state;
use tickwire_proto::symbology::Symbology;
use tokio_util::sync::CancellationToken;

use super::{
    Ctl, Entry, GroupShared, GroupSnapshot, GroupType, Groups, MemberStats, SAVE_EVERY,
    dead_letter_row, group_wires, publish_dead_letters, subscription_id,
};
use crate::EdgeState;
use crate::dispatch::Wires;
use crate::error::ApiError;
use crate::store::Store;

/// How long a paused member may take to say where it stands before it is
/// removed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often members' liveness locks are looked at.
const LIVENESS_EVERY: Duration = Duration::from_millis(50);
/// The thread's tick.
const TICK: Duration = Duration::from_millis(2);
/// How long a stopping broker still reads dead-lettered ranges back.
const DEAD_LETTER_GRACE: Duration = Duration::from_secs(2);

/// The control socket's thread; join it after the cancel token fired.
pub struct Coordinator {
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl Coordinator {
    /// Binds `<node dir>/control.sock` (replacing a stale one) and starts
    /// the thread.
    ///
    /// # Errors
    /// [`ApiError::Unavailable`] when another broker answers on the socket
    /// or it cannot be bound.
    pub fn start(
        state: Arc<EdgeState>,
        store: Arc<Store>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Coordinator, ApiError> {
        let dir = state.engine.node_dir();
        let path = dir.join(CONTROL_SOCKET);
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                return Err(ApiError::Unavailable(format!(
                    "another broker answers on {}: one broker per node directory",
                    path.display()
                )));
            }
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path).map_err(|e| {
            ApiError::Unavailable(format!(
                "cannot bind the control socket {}: {e}",
                path.display()
            ))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ApiError::Unavailable(format!("control socket: {e}")))?;
        let cancel = state.cancel.clone();
        let mut c = Control {
            state,
            store,
            runtime,
            node_dir: dir,
            listener,
            conns: HashMap::new(),
            next_conn: 0,
            groups: HashMap::new(),
            next_member: 0,
            uid: current_uid(),
            scans: Vec::new(),
            pending: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("tickwire-groups".into())
            .spawn(move || c.run(cancel))
            .map_err(|e| ApiError::internal(format!("control thread: {e}")))?;
        tracing::info!(socket = %path.display(), "shm subscription groups: control socket open");
        Ok(Coordinator {
            thread: Some(thread),
            path,
        })
    }

    /// Waits for the thread (after cancel): cursors are written as it ends.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the shm groups' control thread panicked");
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn current_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// The peer's user id (SO_PEERCRED).
fn peer_uid(s: &UnixStream) -> Option<(u32, i32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size we pass, on a socket
    // we own.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((cred.uid, cred.pid))
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Written when the socket takes it: a message is never cut.
    out: Vec<u8>,
    /// (group key, member id) once joined.
    member: Option<((String, String), u64)>,
    pid: i32,
}

/// An owned range: `from..to` (to = u64::MAX while open) of events
/// matching `selector`, delivered before `redeliveries` times.
#[derive(Debug, Clone)]
struct Owned {
    /// The rebalance that gave it.
    version: u64,
    /// Read again from a departed member (through its own reader: the
    /// live cursor says nothing about how far it got).
    adopted: bool,
    from: u64,
    to: u64,
    selector: Selector,
    redeliveries: u32,
}

struct Member {
    id: u64,
    conn: u64,
    name: String,
    priority: i32,
    pid: i32,
    ack_timeout: Duration,
    readers: BTreeMap<u32, ReaderRef>,
    /// Positions it reported (join, pause).
    positions: BTreeMap<u32, u64>,
    /// Last rebalance sent to it, and the last it applied.
    assigned: u64,
    applied: u64,
    owned: BTreeMap<u32, Vec<Owned>>,
    /// Acknowledged cursor last read while trusted.
    acked: BTreeMap<u32, u64>,
    /// The rebalance its cursors (`acked`) were last read after: they speak
    /// for every range given up to it.
    acked_version: u64,
    /// Lowest start of ranges given after `acked_version`.
    floor: Vec<(u64, u32, u64)>,
    /// (acked, since) per partition, for the ack timeout.
    stuck: BTreeMap<u32, (u64, Instant)>,
    /// Its live readers' cursors, last read.
    cursors: BTreeMap<u32, u64>,
    /// Its signal word value.
    signal: u32,
    slots: usize,
    active: Vec<u32>,
    /// Its own counts, as it last reported them.
    counts: Counts,
}

/// What a member reported of itself (`ToBroker::Counts`).
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    delivered: u64,
    redelivered: u64,
    acked: u64,
    unacked: u64,
}

/// What a departed member leaves until the next rebalance closes it.
struct Departed {
    owned: BTreeMap<u32, Vec<Owned>>,
    acked: BTreeMap<u32, u64>,
    /// Its live reader's position: events at or past it were never read.
    cursors: BTreeMap<u32, u64>,
    /// The positions are its last ones (else it may have read further:
    /// everything it held counts as delivered once more, so that a
    /// redelivery is never passed off as a first delivery).
    fresh: bool,
    /// It applied an assignment (else it never delivered anything).
    applied: bool,
}

struct Orphan {
    partition: u32,
    range: Owned,
}

struct HoldRec {
    version: u64,
    member: u64,
    partition: u32,
    switch: u64,
    waits: Vec<u64>,
}

enum Phase {
    Stable,
    Pausing {
        version: u64,
        waiting: HashSet<u64>,
        since: Instant,
    },
    /// Paused by the admin API: members stay paused until resumed.
    Held,
}

struct ShmGroup {
    topic: String,
    name: String,
    sub_id: String,
    kind: SubscriptionType,
    max_redeliveries: Option<u32>,
    filter: shm_client::Filter,
    rings: Vec<RingFile>,
    members: Vec<Member>,
    departed: Vec<Departed>,
    orphans: Vec<Orphan>,
    /// Per partition: nothing at or past it is anyone's yet.
    frontier: BTreeMap<u32, u64>,
    last_switch: BTreeMap<u32, u64>,
    holds: Vec<HoldRec>,
    /// Key_Shared owners, Failover actives, of the last assignment.
    owners: Vec<u64>,
    active: BTreeMap<u32, u64>,
    version: u64,
    phase: Phase,
    dirty: bool,
    paused: bool,
    saved: Vec<(u32, u64)>,
    last_save: Instant,
    last_live: Instant,
    shared: Arc<GroupShared>,
    rx: Receiver<Ctl>,
    counters: super::Counters,
    lost: u64,
}

struct Control {
    state: Arc<EdgeState>,
    store: Arc<Store>,
    runtime: tokio::runtime::Handle,
    node_dir: PathBuf,
    listener: UnixListener,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    groups: HashMap<(String, String), ShmGroup>,
    next_member: u64,
    uid: u32,
    scans: Vec<std::thread::JoinHandle<()>>,
    /// Joins waiting for a cursor reset to end.
    pending: Vec<(u64, Box<Join>)>,
}

fn group_type(k: SubscriptionType) -> GroupType {
    match k {
        SubscriptionType::Exclusive => GroupType::Exclusive,
        SubscriptionType::Failover => GroupType::Failover,
        SubscriptionType::Shared => GroupType::Shared,
        SubscriptionType::KeyShared => GroupType::KeyShared,
    }
}

impl Control {
    fn run(&mut self, cancel: CancellationToken) {
        let mut last_live = Instant::now();
        while !cancel.is_cancelled() {
            self.accept();
            for (conn, j) in std::mem::take(&mut self.pending) {
                if self.conns.contains_key(&conn) {
                    self.handle(conn, ToBroker::Join(j));
                }
            }
            self.read_conns();
            let now = Instant::now();
            let look = now.duration_since(last_live) >= LIVENESS_EVERY;
            if look {
                last_live = now;
            }
            let keys: Vec<(String, String)> = self.groups.keys().cloned().collect();
            for k in keys {
                self.tick(&k, look);
            }
            self.scans.retain(|t| !t.is_finished());
            std::thread::sleep(TICK);
        }
        // Stopping: members are told, cursors written.
        let keys: Vec<(String, String)> = self.groups.keys().cloned().collect();
        for k in keys {
            if let Some(g) = self.groups.get_mut(&k) {
                g.read_acked();
                let cursors = g.cursors();
                if !cursors.is_empty() {
                    let store = self.store.clone();
                    let sub = g.sub_id.clone();
                    let ok = self.runtime.block_on(async move {
                        tokio::time::timeout(
                            Duration::from_secs(2),
                            store.save_cursors(&sub, &cursors),
                        )
                        .await
                    });
                    if !matches!(ok, Ok(Ok(()))) {
                        tracing::error!(subscription = %g.sub_id, "shm group cursors not written at stop");
                    }
                }
                g.shared.stopped.store(true, Ordering::Release);
            }
        }
        for (_, c) in self.conns.iter_mut() {
            let _ = send(
                c,
                &ToMember::Removed {
                    reason: "the broker is stopping".into(),
                },
            );
        }
        for t in self.scans.drain(..) {
            let _ = t.join();
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let Some((uid, pid)) = peer_uid(&stream) else {
                        continue;
                    };
                    if uid != self.uid && uid != 0 {
                        tracing::warn!(uid, pid, "control socket: refused a peer of another user");
                        let message = format!(
                            "uid {uid} may not join subscription groups on this node: the broker runs as uid {}",
                            self.uid
                        );
                        let mut line =
                            serde_json::to_vec(&ToMember::Refused { message }).unwrap_or_default();
                        line.push(b'\n');
                        let _ = stream.write_all(&line);
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.next_conn += 1;
                    self.conns.insert(
                        self.next_conn,
                        Conn {
                            stream,
                            buf: Vec::new(),
                            out: Vec::new(),
                            member: None,
                            pid,
                        },
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: accept failed");
                    return;
                }
            }
        }
    }

    fn read_conns(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let mut msgs = Vec::new();
            let mut gone = false;
            if let Some(c) = self.conns.get_mut(&id) {
                if flush(c).is_err() || c.out.len() > 64 * 1024 * 1024 {
                    gone = true;
                }
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    match c.stream.read(&mut chunk) {
                        Ok(0) => {
                            gone = true;
                            break;
                        }
                        Ok(k) => c.buf.extend_from_slice(&chunk[..k]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => {
                            gone = true;
                            break;
                        }
                    }
                    if c.buf.len() > 16 * 1024 * 1024 {
                        gone = true;
                        break;
                    }
                }
                while let Some(i) = c.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = c.buf.drain(..=i).collect();
                    msgs.push(serde_json::from_slice::<ToBroker>(&line[..i]));
                }
            }
            for m in msgs {
                match m {
                    Ok(m) => self.handle(id, m),
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket: a message that is not the protocol; closing the connection");
                        if let Some(c) = self.conns.get_mut(&id) {
                            let _ = send(
                                c,
                                &ToMember::Refused {
                                    message: format!("not a control message: {e}"),
                                },
                            );
                        }
                        gone = true;
                        break;
                    }
                }
            }
            if gone {
                self.drop_conn(id, None);
            }
        }
    }

    /// A connection ended: its member leaves (with `reason`, it is told).
    fn drop_conn(&mut self, id: u64, reason: Option<String>) {
        let Some(c) = self.conns.remove(&id) else {
            return;
        };
        if let Some((key, member)) = c.member
            && let Some(g) = self.groups.get_mut(&key)
        {
            g.remove(member, reason.as_deref().unwrap_or("left"), &mut self.conns);
        }
    }

    fn handle(&mut self, conn: u64, msg: ToBroker) {
        match msg {
            ToBroker::Join(j)
                if !self
                    .groups
                    .contains_key(&(j.topic.clone(), j.subscription.clone())) =>
            {
                // A new group reads its stored cursors: not while a cursor
                // reset holds the creation lock (it is brief).
                let state = self.state.clone();
                let Ok(guard) = state.groups.create.try_lock() else {
                    self.pending.push((conn, j));
                    return;
                };
                let r = self.join(conn, *j);
                drop(guard);
                if let Err(message) = r
                    && let Some(c) = self.conns.get_mut(&conn)
                {
                    let _ = send(c, &ToMember::Refused { message });
                }
            }
            ToBroker::Join(j) => {
                let r = self.join(conn, *j);
                if let Err(message) = r
                    && let Some(c) = self.conns.get_mut(&conn)
                {
                    let _ = send(c, &ToMember::Refused { message });
                }
            }
            ToBroker::Paused { version, positions } => {
                let Some((id, g)) = self.member_of(conn) else {
                    return;
                };
                if let Some(m) = g.members.iter_mut().find(|m| m.id == id) {
                    for (p, s) in positions {
                        m.positions.insert(p, s);
                    }
                }
                if let Phase::Pausing {
                    version: v,
                    waiting,
                    ..
                } = &mut g.phase
                    && *v == version
                {
                    waiting.remove(&id);
                }
            }
            ToBroker::Counts {
                delivered,
                redelivered,
                acked,
                unacked,
            } => {
                let Some((id, g)) = self.member_of(conn) else {
                    return;
                };
                if let Some(m) = g.members.iter_mut().find(|m| m.id == id) {
                    // The group's counters grow by what the member added,
                    // and keep it when the member goes.
                    let c = &mut g.counters;
                    c.delivered += delivered.saturating_sub(m.counts.delivered);
                    c.redelivered += redelivered.saturating_sub(m.counts.redelivered);
                    c.acked += acked.saturating_sub(m.counts.acked);
                    m.counts = Counts {
                        delivered,
                        redelivered,
                        acked,
                        unacked,
                    };
                }
            }
            ToBroker::Applied { version } => {
                let Some((id, g)) = self.member_of(conn) else {
                    return;
                };
                if let Some(m) = g.members.iter_mut().find(|m| m.id == id)
                    && m.assigned == version
                {
                    m.applied = version;
                    let now = Instant::now();
                    for v in m.stuck.values_mut() {
                        v.1 = now;
                    }
                }
            }
        }
    }

    /// The member a connection joined as, and its group.
    fn member_of(&mut self, conn: u64) -> Option<(u64, &mut ShmGroup)> {
        let (key, id) = self.conns.get(&conn)?.member.clone()?;
        let g = self.groups.get_mut(&key)?;
        Some((id, g))
    }

    fn join(&mut self, conn: u64, mut j: Join) -> Result<(), String> {
        // 0 is no limit, as for a remote consumer, whatever client sent it.
        j.max_redeliveries = j.max_redeliveries.filter(|&n| n > 0);
        let Some(kind) = SubscriptionType::parse(&j.kind) else {
            return Err(format!(
                "unknown subscription type {} (exclusive, failover, shared, key_shared)",
                tickwire_proto::symbology::quoted(&j.kind)
            ));
        };
        if j.subscription.is_empty() {
            return Err("a subscription group needs a name".into());
        }
        if self.conns.get(&conn).is_some_and(|c| c.member.is_some()) {
            return Err("this connection has joined already".into());
        }
        let filter = j.filter.filter()?;
        let key = (j.topic.clone(), j.subscription.clone());
        if !self.groups.contains_key(&key) {
            let g = self.create(&j, kind, filter.clone())?;
            self.groups.insert(key.clone(), g);
        }
        let pid = self.conns.get(&conn).map_or(0, |c| c.pid);
        let Some(g) = self.groups.get_mut(&key) else {
            return Err("the group could not be created".into());
        };
        if g.kind != kind {
            return Err(format!(
                "subscription {} is {}; this consumer asked for {}",
                g.name,
                g.kind.name(),
                kind.name()
            ));
        }
        if g.max_redeliveries != j.max_redeliveries {
            let say = |m: Option<u32>| m.map_or("no limit".to_string(), |n| n.to_string());
            return Err(format!(
                "subscription {} dead-letters an event after {} redeliveries; this consumer asked for {}: every member of a group takes the same",
                g.name,
                say(g.max_redeliveries),
                say(j.max_redeliveries)
            ));
        }
        if g.filter != filter {
            return Err(format!(
                "subscription {}'s members filter events another way: every member of a group takes the same filter",
                g.name
            ));
        }
        if g.kind == SubscriptionType::Exclusive
            && let Some(m) = g.members.first()
        {
            return Err(format!(
                "subscription {} is Exclusive and consumer {:?} (pid {}) is attached",
                g.name, m.name, m.pid
            ));
        }
        if j.readers.is_empty() {
            return Err("a member needs a reader slot on every partition".into());
        }
        for r in &j.readers {
            if r.index as usize >= tickwire_proto::layout::READER_SLOTS {
                return Err(format!(
                    "reader slot {} of partition {} does not exist",
                    r.index, r.partition
                ));
            }
            if g.rings.get(r.partition as usize).is_none() {
                g.refresh_rings(&self.node_dir);
            }
            if g.rings.get(r.partition as usize).is_none() {
                return Err(format!(
                    "topic {} has no partition {}",
                    g.topic, r.partition
                ));
            }
        }
        self.next_member += 1;
        let id = self.next_member;
        let now = Instant::now();
        g.members.push(Member {
            id,
            conn,
            name: j.consumer.clone(),
            priority: j.priority,
            pid,
            ack_timeout: Duration::from_millis(j.ack_timeout_ms.max(100)),
            readers: j.readers.iter().map(|r| (r.partition, *r)).collect(),
            positions: j.positions.iter().copied().collect(),
            assigned: 0,
            applied: 0,
            acked_version: 0,
            owned: BTreeMap::new(),
            acked: j
                .positions
                .iter()
                .map(|&(p, s)| (p, s.saturating_sub(1)))
                .collect(),
            floor: Vec::new(),
            stuck: j.positions.iter().map(|&(p, _)| (p, (0, now))).collect(),
            cursors: BTreeMap::new(),
            signal: 0,
            slots: 0,
            active: Vec::new(),
            counts: Counts::default(),
        });
        g.dirty = true;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.member = Some((key, id));
            let _ = send(c, &ToMember::Welcome { member: id });
        }
        tracing::info!(subscription = %g.sub_id, member = id, consumer = %j.consumer, pid, kind = kind.name(), "shm group member joined");
        Ok(())
    }

    /// A new group: registered with the node's groups (refused when remote
    /// consumers have it), at its stored cursors or the join's start.
    fn create(
        &mut self,
        j: &Join,
        kind: SubscriptionType,
        filter: shm_client::Filter,
    ) -> Result<ShmGroup, String> {
        let Some(count) = topic_partitions(&self.node_dir, &j.topic).map_err(|e| e.to_string())?
        else {
            return Err(format!("topic {:?} has no rings on this node", j.topic));
        };
        let sub_id = subscription_id(&j.topic, &j.subscription);
        let stored = {
            let store = self.store.clone();
            let sub = sub_id.clone();
            self.runtime
                .block_on(async move { store.cursors(&sub).await })
                .map_err(|e| format!("the group's stored cursors cannot be read: {e}"))?
        };
        let mut frontier: BTreeMap<u32, u64> = stored.iter().copied().collect();
        if frontier.is_empty() && j.start != shm_client::group::wire::StartSpec::Latest {
            // Where the start lies, per partition: a probe reader says.
            let probe = Subscriber::builder(j.topic.clone())
                .node_dir(&self.node_dir)
                .start(Start::from(j.start))
                .open()
                .map_err(|e| format!("start position: {e}"))?;
            frontier = probe.positions().into_iter().collect();
        }
        let groups: &Groups = &self.state.groups;
        let key = (j.topic.clone(), j.subscription.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(GroupShared {
            topic: j.topic.clone(),
            name: j.subscription.clone(),
            kind: group_type(kind),
            acked: true,
            max_redeliveries: j.max_redeliveries.unwrap_or(0),
            snapshot: Mutex::new(GroupSnapshot::default()),
            stopped: AtomicBool::new(false),
            started_ns: realtime_ns(),
        });
        {
            let mut map = groups.lock();
            if map
                .get(&key)
                .is_some_and(|e| !e.shared.stopped.load(Ordering::Acquire))
            {
                return Err(format!(
                    "subscription {} has remote (gRPC/WebSocket) consumers on this node: a group is served over shared memory or remotely, not both",
                    j.subscription
                ));
            }
            map.insert(
                key,
                Entry {
                    tx,
                    shared: shared.clone(),
                },
            );
        }
        let mut g = ShmGroup {
            topic: j.topic.clone(),
            name: j.subscription.clone(),
            sub_id,
            kind,
            max_redeliveries: j.max_redeliveries,
            filter,
            rings: Vec::new(),
            members: Vec::new(),
            departed: Vec::new(),
            orphans: Vec::new(),
            frontier,
            last_switch: BTreeMap::new(),
            holds: Vec::new(),
            owners: Vec::new(),
            active: BTreeMap::new(),
            version: 0,
            phase: Phase::Stable,
            dirty: false,
            paused: false,
            saved: stored,
            last_save: Instant::now(),
            last_live: Instant::now(),
            shared,
            rx,
            counters: super::Counters::default(),
            lost: 0,
        };
        g.refresh_rings(&self.node_dir);
        if g.rings.len() < count as usize {
            return Err(format!("topic {:?}: its rings cannot be opened", j.topic));
        }
        tracing::info!(subscription = %g.sub_id, kind = kind.name(), resumed = !g.saved.is_empty(), "shm group started");
        Ok(g)
    }

    fn tick(&mut self, key: &(String, String), look: bool) {
        let Some(g) = self.groups.get_mut(key) else {
            return;
        };
        let now = Instant::now();
        // The admin API.
        loop {
            match g.rx.try_recv() {
                Ok(Ctl::Pause(p)) => {
                    if p != g.paused {
                        g.paused = p;
                        g.dirty = true;
                    }
                }
                Ok(Ctl::Close(why) | Ctl::Stop(why)) => {
                    let reason = match why {
                        super::Closed::Removed(r)
                        | super::Closed::SlowConsumer(r)
                        | super::Closed::TopicGone(r) => r,
                        super::Closed::Deleted => "the subscription was deleted".to_string(),
                        super::Closed::Shutdown => "the broker is stopping".to_string(),
                    };
                    let ids: Vec<u64> = g.members.iter().map(|m| m.id).collect();
                    for id in ids {
                        g.remove(id, &reason, &mut self.conns);
                    }
                    g.shared.stopped.store(true, Ordering::Release);
                    self.groups.remove(key);
                    return;
                }
                Ok(Ctl::Join { reply, .. }) => {
                    let _ = reply.send(Err(ApiError::Conflict(format!(
                        "subscription {} has shared-memory members on this node: a group is served over shared memory or remotely, not both",
                        g.name
                    ))));
                }
                Ok(Ctl::Leave(_) | Ctl::Ack { .. }) => {}
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        if look {
            g.read_acked();
            // Dead members: their liveness lock is gone (or the slot was
            // taken again).
            let dead: Vec<u64> = g
                .members
                .iter()
                .filter(|m| !g.alive(m))
                .map(|m| m.id)
                .collect();
            for id in dead {
                tracing::warn!(subscription = %g.sub_id, member = id, "shm group member died (its reader slot's liveness lock is gone)");
                g.remove(id, "its process died", &mut self.conns);
            }
            // Ack timeouts.
            let mut late = Vec::new();
            for m in &mut g.members {
                if m.acked_version != m.assigned || m.assigned == 0 {
                    continue;
                }
                for (&p, r) in &m.readers {
                    let Some(ring) = g.rings.get(p as usize) else {
                        continue;
                    };
                    let slot = &ring.ring().readers()[r.index as usize];
                    let cursor = slot.cursor.load(Ordering::Acquire);
                    let acked = m.acked.get(&p).copied().unwrap_or(0);
                    let held = g.holds.iter().any(|h| h.member == m.id && h.partition == p);
                    let e = m.stuck.entry(p).or_insert((acked, now));
                    if acked != e.0 || acked + 1 >= cursor || held {
                        *e = (acked, now);
                    } else if now.duration_since(e.1) > m.ack_timeout {
                        late.push((
                            m.id,
                            format!(
                                "partition {p} sequence {} not acknowledged within the ack timeout ({} ms)",
                                acked + 1,
                                m.ack_timeout.as_millis()
                            ),
                        ));
                        break;
                    }
                }
            }
            for (id, reason) in late {
                tracing::warn!(subscription = %g.sub_id, member = id, %reason, "shm group member removed");
                g.counters.timed_out += 1;
                g.remove(id, &reason, &mut self.conns);
            }
            // The topic grew.
            if let Ok(Some(n)) = topic_partitions(&self.node_dir, &g.topic)
                && n as usize > g.rings.len()
            {
                let before = g.rings.len() as u32;
                g.refresh_rings(&self.node_dir);
                for p in before..g.rings.len() as u32 {
                    g.frontier.entry(p).or_insert(1);
                }
                g.dirty = true;
            }
            g.releases(&mut self.conns);
            g.publish();
        }
        // Rebalance.
        enum Step {
            Start,
            Complete,
            Late(Vec<u64>),
            Nothing,
        }
        let step = match &g.phase {
            Phase::Stable | Phase::Held if g.dirty => Step::Start,
            Phase::Pausing { waiting, .. } if waiting.is_empty() => Step::Complete,
            Phase::Pausing { waiting, since, .. } if now.duration_since(*since) > PAUSE_TIMEOUT => {
                Step::Late(waiting.iter().copied().collect())
            }
            _ => Step::Nothing,
        };
        match step {
            Step::Start => {
                g.dirty = false;
                g.version += 1;
                let version = g.version;
                let mut waiting = HashSet::new();
                for m in &mut g.members {
                    if m.assigned != 0 {
                        waiting.insert(m.id);
                        notify(&mut self.conns, &g.rings, m, &ToMember::Pause { version });
                    }
                }
                g.phase = Phase::Pausing {
                    version,
                    waiting,
                    since: now,
                };
            }
            Step::Complete if g.paused => g.phase = Phase::Held,
            Step::Complete => {
                let dead = g.complete(&mut self.conns);
                self.dead_letter(key, dead);
            }
            Step::Late(late) => {
                for id in late {
                    g.remove(
                        id,
                        "it did not answer a rebalance within 5 s (not polling?)",
                        &mut self.conns,
                    );
                }
            }
            Step::Nothing => {}
        }
        let Some(g) = self.groups.get_mut(key) else {
            return;
        };
        if now.duration_since(g.last_save) >= SAVE_EVERY {
            g.last_save = now;
            let cursors = g.cursors();
            if cursors != g.saved && !cursors.is_empty() {
                g.saved = cursors.clone();
                let store = self.store.clone();
                let sub = g.sub_id.clone();
                self.runtime.spawn(async move {
                    if let Err(e) = store.save_cursors(&sub, &cursors).await {
                        tracing::error!(subscription = %sub, error = %e, "shm group cursors could not be written; retrying");
                    }
                });
            }
        }
        if !g.members.is_empty() {
            g.last_live = now;
        }
    }

    /// Writes ranges given up on to the dead letters, read from the ring
    /// or the journal on a thread of their own.
    fn dead_letter(&mut self, key: &(String, String), ranges: Vec<Orphan>) {
        if ranges.is_empty() {
            return;
        }
        let Some(g) = self.groups.get_mut(key) else {
            return;
        };
        let topic = g.topic.clone();
        let sub_id = g.sub_id.clone();
        let filter = g.filter.clone();
        let node_dir = self.node_dir.clone();
        let store = self.store.clone();
        let runtime = self.runtime.clone();
        let shared = g.shared.clone();
        let cancel = self.state.cancel.clone();
        let edge = self.state.clone();
        let name = key.1.clone();
        let t = std::thread::Builder::new()
            .name("tickwire-dead-letters".into())
            .spawn(move || {
                let mut rows = Vec::new();
                let mut events = Vec::new();
                let mut wires: Vec<Option<Box<Wires>>> = Vec::new();
                let sym = Symbology::open(&node_dir).ok();
                let now = realtime_ns();
                for o in ranges {
                    let p = o.partition;
                    let sub = Subscriber::builder(topic.clone())
                        .node_dir(&node_dir)
                        .partitions([p])
                        .resume_at(p, o.range.from)
                        .journal_fill(true)
                        .filter(filter.clone())
                        .open();
                    let mut sub = match sub {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(subscription = %sub_id, partition = p, error = %e, "dead letters: the range cannot be read");
                            continue;
                        }
                    };
                    // The group's cursors are already past the range: a
                    // broker that is stopping still reads it back (it is
                    // in the ring or the journal, a few milliseconds'
                    // work), for at most DEAD_LETTER_GRACE.
                    let mut deadline = Instant::now() + Duration::from_secs(30);
                    let mut found: Vec<(u64, [u64; tickwire_proto::frame::BODY_WORDS])> = Vec::new();
                    while sub.position(p).is_some_and(|n| n < o.range.to)
                        && Instant::now() < deadline
                    {
                        if cancel.is_cancelled() {
                            deadline = deadline.min(Instant::now() + DEAD_LETTER_GRACE);
                        }
                        let mut got = 0;
                        sub.poll(1024, |e| {
                            got += 1;
                            if let Event::Tick(t) = e
                                && t.seq < o.range.to
                                && o.range.selector.matches(t.seq, key_slot(t.instrument(), t.body.instrument_id()))
                            {
                                found.push((t.seq, *t.body.words()));
                            }
                        });
                        if got == 0 {
                            break;
                        }
                    }
                    if let Some(next) = sub.position(p).filter(|&n| n < o.range.to) {
                        tracing::error!(subscription = %sub_id, partition = p, from = next, to = o.range.to, "dead letters: part of a range was not read back (the read stalled); those events are neither redelivered nor kept");
                    }
                    for (seq, words) in found {
                        let epoch = sub.epoch_of(p, seq).unwrap_or(0);
                        let id = tickwire_proto::ArchivedFrameBody::from_words(&words).instrument_id();
                        let inst = group_wires(&mut wires, sym.as_ref(), id);
                        rows.push(dead_letter_row(
                            &sub_id,
                            &topic,
                            (p, epoch, seq),
                            &words,
                            o.range.redeliveries,
                            inst,
                            now,
                        ));
                        events.push(words);
                    }
                }
                if rows.is_empty() {
                    return;
                }
                tracing::warn!(subscription = %sub_id, events = rows.len(), "shm group: events dead-lettered after their most redeliveries");
                if let Ok(mut s) = shared.snapshot.lock() {
                    s.counters.dead_lettered += rows.len() as u64;
                }
                let n = rows.len();
                if let Err(e) = runtime.block_on(store.insert_dead_letters(&rows)) {
                    tracing::error!(subscription = %sub_id, error = %e, lost = n, "dead letters could not be written");
                }
                publish_dead_letters(&edge, &runtime, &topic, &name, &events);
            });
        match t {
            Ok(t) => self.scans.push(t),
            Err(e) => tracing::error!(error = %e, "dead letters: no thread"),
        }
    }
}

/// Queues one message for a connection and writes what the socket takes
/// (never blocking: the rest goes at the next tick).
fn send(c: &mut Conn, msg: &ToMember) -> std::io::Result<()> {
    serde_json::to_writer(&mut c.out, msg).map_err(std::io::Error::other)?;
    c.out.push(b'\n');
    flush(c)
}

/// Writes what the socket takes of a connection's queue.
fn flush(c: &mut Conn) -> std::io::Result<()> {
    while !c.out.is_empty() {
        match c.stream.write(&c.out) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(k) => {
                c.out.drain(..k);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends a member a message and bumps its signal word, which it checks
/// once per poll.
fn notify(conns: &mut HashMap<u64, Conn>, rings: &[RingFile], m: &mut Member, msg: &ToMember) {
    if let Some(c) = conns.get_mut(&m.conn)
        && let Err(e) = send(c, msg)
    {
        tracing::debug!(member = m.id, error = %e, "control message not sent");
    }
    m.signal = m.signal.wrapping_add(1);
    if let Some((&p, r)) = m.readers.iter().next()
        && let Some(ring) = rings.get(p as usize)
    {
        ring.ring().readers()[r.index as usize]
            .selector
            .store(m.signal, Ordering::Release);
    }
}

impl ShmGroup {
    fn refresh_rings(&mut self, node_dir: &Path) {
        let Ok(Some(count)) = topic_partitions(node_dir, &self.topic) else {
            return;
        };
        let paths = partition_paths(node_dir, &self.topic, count);
        for path in paths.iter().skip(self.rings.len()) {
            match RingFile::open_reader(path) {
                Ok(f) => self.rings.push(f),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "shm group: ring not opened");
                    return;
                }
            }
        }
    }

    /// Whether a member's reader slots are all still its own and locked.
    fn alive(&self, m: &Member) -> bool {
        m.readers.values().all(|r| {
            let Some(ring) = self.rings.get(r.partition as usize) else {
                return false;
            };
            let slot = &ring.ring().readers()[r.index as usize];
            let (generation, state) = unpack_state(slot.state_gen.load(Ordering::Acquire));
            generation == r.generation
                && state != tickwire_proto::layout::STATE_FREE
                && ring.reader_alive(r.index as usize)
        })
    }

    /// Reads members' acknowledged cursors and forgets the ranges they
    /// cover. A cursor read after a member applied rebalance v speaks for
    /// every range given up to v; ranges given later are not forgotten
    /// before it applied them (and its floor keeps the group's cursor
    /// below them meanwhile).
    fn read_acked(&mut self) {
        for m in &mut self.members {
            if m.applied == 0 {
                continue;
            }
            let mut read_all = true;
            for (&p, r) in &m.readers {
                let Some(ring) = self.rings.get(p as usize) else {
                    continue;
                };
                let slot = &ring.ring().readers()[r.index as usize];
                let (generation, state) = unpack_state(slot.state_gen.load(Ordering::Acquire));
                // Ours, or released by a member that closed cleanly (its
                // last cursor stays until another reader takes the slot).
                let released = generation == r.generation.wrapping_add(1)
                    && state == tickwire_proto::layout::STATE_FREE;
                if generation != r.generation && !released {
                    read_all = false;
                    continue;
                }
                let acked = slot.acked_cursor.load(Ordering::Acquire);
                m.acked.insert(p, acked);
                m.cursors.insert(p, slot.cursor.load(Ordering::Acquire));
                // Read after it applied `applied`: it speaks for those.
                let applied = m.applied;
                if let Some(owned) = m.owned.get_mut(&p) {
                    owned.retain(|o| o.version > applied || o.to > acked + 1);
                }
            }
            if read_all {
                m.acked_version = m.applied;
                let v = m.acked_version;
                m.floor.retain(|&(fv, _, _)| fv > v);
            }
        }
    }

    /// Removes a member: what it held is redelivered at the next
    /// rebalance; with a reason other than `left`, it is told.
    fn remove(&mut self, id: u64, reason: &str, conns: &mut HashMap<u64, Conn>) {
        let Some(i) = self.members.iter().position(|m| m.id == id) else {
            return;
        };
        self.read_acked();
        let mut m = self.members.remove(i);
        // Its connection no longer speaks for a member.
        if let Some(c) = conns.get_mut(&m.conn) {
            c.member = None;
        }
        if reason != "left" && reason != "its process died" {
            notify(
                conns,
                &self.rings,
                &mut m,
                &ToMember::Removed {
                    reason: reason.to_string(),
                },
            );
        }
        let mut cursors = BTreeMap::new();
        // A member removed alive may deliver a little more before it reads
        // that it was: count all it held as delivered.
        let mut fresh = reason == "left" || reason == "its process died";
        for (&p, r) in &m.readers {
            if let Some(ring) = self.rings.get(p as usize) {
                let slot = &ring.ring().readers()[r.index as usize];
                let (generation, _) = unpack_state(slot.state_gen.load(Ordering::Acquire));
                let released = generation == r.generation.wrapping_add(1)
                    && unpack_state(slot.state_gen.load(Ordering::Acquire)).1
                        == tickwire_proto::layout::STATE_FREE;
                let c = if generation == r.generation || released {
                    slot.cursor.load(Ordering::Acquire)
                } else {
                    // Taken again since: its last cursor read; whether it
                    // read further is unknown.
                    if m.applied != 0 {
                        fresh = false;
                    }
                    m.cursors.get(&p).copied().unwrap_or(0)
                };
                cursors.insert(p, c);
            }
        }
        // Ranges given after its cursors were last read count from their
        // starts.
        let mut acked = m.acked.clone();
        for &(_, p, f) in &m.floor {
            let a = acked.entry(p).or_insert(0);
            *a = (*a).min(f.saturating_sub(1));
        }
        self.departed.push(Departed {
            owned: std::mem::take(&mut m.owned),
            acked,
            cursors,
            fresh,
            applied: m.applied != 0,
        });
        self.holds.retain(|h| h.member != id);
        if let Phase::Pausing { waiting, .. } = &mut self.phase {
            waiting.remove(&id);
        }
        self.dirty = true;
        tracing::info!(subscription = %self.sub_id, member = id, consumer = %m.name, %reason, "shm group member left");
    }

    /// Ends a rebalance: switches, redelivery ranges, selectors, holds.
    /// Returns the ranges past their most redeliveries.
    fn complete(&mut self, conns: &mut HashMap<u64, Conn>) -> Vec<Orphan> {
        let started = Instant::now();
        let r = self.complete_inner(conns);
        tracing::debug!(
            subscription = %self.sub_id,
            version = self.version,
            members = self.members.len(),
            owned = self.members.iter().map(|m| m.owned.values().map(Vec::len).sum::<usize>()).sum::<usize>(),
            took_ms = started.elapsed().as_millis() as u64,
            "shm group rebalanced"
        );
        r
    }

    fn complete_inner(&mut self, conns: &mut HashMap<u64, Conn>) -> Vec<Orphan> {
        let version = self.version;
        let parts: Vec<u32> = (0..self.rings.len() as u32).collect();
        let mut dead = Vec::new();
        let mut switches = BTreeMap::new();
        for &p in &parts {
            let mut switch = self.last_switch.get(&p).copied().unwrap_or(1).max(1);
            for m in &self.members {
                if let Some(&pos) = m.positions.get(&p) {
                    switch = switch.max(pos);
                }
            }
            if let Some(&f) = self.frontier.get(&p) {
                switch = switch.max(f);
            }
            // Past what departed members read: their share below it is
            // redelivered; nobody else's is skipped.
            for d in &self.departed {
                if let Some(&c) = d.cursors.get(&p) {
                    switch = switch.max(c);
                }
            }
            for d in &self.departed {
                let acked = d.acked.get(&p).copied().unwrap_or(0);
                let cursor = d.cursors.get(&p).copied().unwrap_or(0);
                for o in d.owned.get(&p).into_iter().flatten() {
                    let lo = o.from.max(acked + 1);
                    let hi = o.to.min(switch);
                    if lo >= hi {
                        continue;
                    }
                    // Delivered before if it read into the range (a
                    // member that never got that far counts as not).
                    tracing::debug!(
                        partition = p,
                        lo,
                        hi,
                        acked,
                        cursor,
                        fresh = d.fresh,
                        adopted = o.adopted,
                        "shm group: departed range"
                    );
                    // Its cursor is stored after each batch it read: it may
                    // have handed out up to a batch past it.
                    let r = if d.applied
                        && (o.adopted || cursor.saturating_add(BATCH as u64) > lo || !d.fresh)
                    {
                        o.redeliveries + 1
                    } else {
                        o.redeliveries
                    };
                    let range = Owned {
                        version,
                        adopted: true,
                        from: lo,
                        to: hi,
                        selector: o.selector.clone(),
                        redeliveries: r,
                    };
                    if self.max_redeliveries.is_some_and(|max| r > max) {
                        dead.push(Orphan {
                            partition: p,
                            range,
                        });
                    } else {
                        self.orphans.push(Orphan {
                            partition: p,
                            range,
                        });
                    }
                }
            }
            if let Some(&f) = self.frontier.get(&p)
                && f < switch
            {
                self.orphans.push(Orphan {
                    partition: p,
                    range: Owned {
                        version,
                        adopted: true,
                        from: f,
                        to: switch,
                        selector: Selector::All,
                        redeliveries: 0,
                    },
                });
            }
            if self.members.is_empty() {
                self.frontier.insert(p, switch);
            } else {
                self.frontier.remove(&p);
            }
            switches.insert(p, switch);
            self.last_switch.insert(p, switch);
        }
        self.departed.clear();
        self.merge_orphans();
        // Holds waiting on members that left end now: what those held is
        // in the ranges handed out below, read before anything live.
        let ids: HashSet<u64> = self.members.iter().map(|m| m.id).collect();
        let mut released = Vec::new();
        for h in &mut self.holds {
            h.waits.retain(|w| ids.contains(w));
            if h.waits.is_empty() {
                released.push((h.member, h.version, h.partition));
            }
        }
        self.holds.retain(|h| !h.waits.is_empty());
        if self.members.is_empty() {
            self.phase = Phase::Stable;
            return dead;
        }
        // New selectors.
        let mut order: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        order.sort_unstable();
        let owners = if self.kind == SubscriptionType::KeyShared {
            rules::slot_owners(self.members.iter().map(|m| (m.name.as_str(), m.id)))
        } else {
            Vec::new()
        };
        let mut active = BTreeMap::new();
        for &p in &parts {
            let a = match self.kind {
                SubscriptionType::Exclusive | SubscriptionType::Failover => rules::failover_active(
                    self.members
                        .iter()
                        .map(|m| (m.priority, m.name.as_str(), m.id)),
                    p,
                ),
                _ => None,
            };
            if let Some(a) = a {
                active.insert(p, a);
            }
        }
        let drained = |m: &Member, p: u32, switch: u64| -> bool {
            m.acked_version == m.assigned && m.acked.get(&p).is_some_and(|&a| a + 1 >= switch)
        };
        let mut msgs = Vec::new();
        for (rank, &id) in order.iter().enumerate() {
            let mut slots = SlotSet::default();
            // Slots it takes over, by their previous owner.
            let mut moved_from: BTreeMap<u64, SlotSet> = BTreeMap::new();
            if self.kind == SubscriptionType::KeyShared {
                for (s, &o) in owners.iter().enumerate() {
                    if o == id {
                        slots.insert(s as u16);
                        if let Some(&old) = self.owners.get(s)
                            && old != id
                        {
                            moved_from.entry(old).or_default().insert(s as u16);
                        }
                    }
                }
            }
            let mut assignments = Vec::new();
            let mut holds = Vec::new();
            for &p in &parts {
                let switch = switches.get(&p).copied().unwrap_or(1);
                let selector = match self.kind {
                    SubscriptionType::Exclusive | SubscriptionType::Failover => {
                        if active.get(&p) == Some(&id) {
                            Selector::All
                        } else {
                            Selector::Nothing
                        }
                    }
                    SubscriptionType::Shared => Selector::Stripe {
                        index: rank as u32,
                        of: order.len() as u32,
                    },
                    SubscriptionType::KeyShared => Selector::Slots {
                        slots: slots.clone(),
                    },
                };
                // Drains: keys this member takes over from a live member
                // that may still hold some unacknowledged.
                let mut hold = None;
                let mut waits = Vec::new();
                match self.kind {
                    SubscriptionType::KeyShared => {
                        let mut moved = SlotSet::default();
                        for (old, set) in &moved_from {
                            if let Some(o) = self.members.iter().find(|m| m.id == *old)
                                && !drained(o, p, switch)
                            {
                                moved = moved.or(set);
                                waits.push(*old);
                            }
                        }
                        if !moved.is_empty() {
                            hold = Some(Selector::Slots { slots: moved });
                        }
                    }
                    SubscriptionType::Failover | SubscriptionType::Exclusive => {
                        if let (Some(&old), Some(&new)) = (self.active.get(&p), active.get(&p))
                            && new == id
                            && old != id
                            && let Some(o) = self.members.iter().find(|m| m.id == old)
                            && !drained(o, p, switch)
                        {
                            hold = Some(Selector::All);
                            waits.push(old);
                        }
                    }
                    _ => {}
                }
                let mut adopt = Vec::new();
                for o in self.orphans.iter().filter(|o| o.partition == p) {
                    let s = o.range.selector.and(&selector);
                    if s.is_nothing() {
                        continue;
                    }
                    adopt.push(Adopt {
                        from: o.range.from,
                        to: o.range.to,
                        selector: s,
                        redeliveries: o.range.redeliveries,
                    });
                }
                if hold.is_some() {
                    holds.push(HoldRec {
                        version,
                        member: id,
                        partition: p,
                        switch,
                        waits,
                    });
                }
                assignments.push(Assignment {
                    partition: p,
                    switch,
                    selector,
                    hold,
                    adopt,
                });
            }
            msgs.push((id, assignments, holds, slots.len()));
        }
        tracing::debug!(orphans = self.orphans.len(), "shm group: ranges handed out");
        self.orphans.clear();
        for (id, assignments, holds, nslots) in msgs {
            let Some(m) = self.members.iter_mut().find(|m| m.id == id) else {
                continue;
            };
            for a in &assignments {
                let owned = m.owned.entry(a.partition).or_default();
                for o in owned.iter_mut() {
                    if o.to == u64::MAX {
                        o.to = a.switch;
                    }
                }
                owned.retain(|o| o.from < o.to);
                // The same selector again: the open range goes on.
                match owned
                    .iter_mut()
                    .find(|o| o.to == a.switch && o.redeliveries == 0 && o.selector == a.selector)
                {
                    Some(o) => o.to = u64::MAX,
                    None => owned.push(Owned {
                        version,
                        adopted: false,
                        from: a.switch,
                        to: u64::MAX,
                        selector: a.selector.clone(),
                        redeliveries: 0,
                    }),
                }
                for ad in &a.adopt {
                    owned.push(Owned {
                        version,
                        adopted: true,
                        from: ad.from,
                        to: ad.to,
                        selector: ad.selector.clone(),
                        redeliveries: ad.redeliveries,
                    });
                    m.floor.push((version, a.partition, ad.from));
                }
            }
            m.slots = nslots;
            m.active = assignments
                .iter()
                .filter(|a| a.selector == Selector::All)
                .map(|a| a.partition)
                .collect();
            m.assigned = version;
            notify(
                conns,
                &self.rings,
                m,
                &ToMember::Assign {
                    version,
                    parts: assignments,
                },
            );
            self.holds.extend(holds);
        }
        for (member, v, partition) in released {
            if let Some(m) = self.members.iter_mut().find(|m| m.id == member) {
                notify(
                    conns,
                    &self.rings,
                    m,
                    &ToMember::Release {
                        version: v,
                        partition,
                    },
                );
            }
        }
        self.owners = owners;
        self.active = active;
        self.phase = Phase::Stable;
        dead
    }

    /// Ranges of one partition with the same bounds become one (their
    /// selectors joined): the same events, fewer ranges.
    fn merge_orphans(&mut self) {
        let mut merged: Vec<Orphan> = Vec::with_capacity(self.orphans.len());
        for o in self.orphans.drain(..) {
            let same = merged.iter_mut().find(|m| {
                m.partition == o.partition
                    && m.range.from == o.range.from
                    && m.range.to == o.range.to
            });
            match same.and_then(|m| m.range.selector.or(&o.range.selector).map(|s| (m, s))) {
                Some((m, s)) => {
                    m.range.selector = s;
                    // The higher count for all: a redelivery may be counted
                    // once too often, never passed off as a first delivery.
                    m.range.redeliveries = m.range.redeliveries.max(o.range.redeliveries);
                }
                None => merged.push(o),
            }
        }
        self.orphans = merged;
    }

    /// Ends drains whose previous owners have acknowledged through the
    /// switch.
    fn releases(&mut self, conns: &mut HashMap<u64, Conn>) {
        let mut done = Vec::new();
        for (i, h) in self.holds.iter().enumerate() {
            let all = h.waits.iter().all(|w| {
                self.members.iter().find(|m| m.id == *w).is_none_or(|o| {
                    o.acked_version == o.assigned
                        && o.acked
                            .get(&h.partition)
                            .is_some_and(|&a| a + 1 >= h.switch)
                })
            });
            if all {
                done.push(i);
            }
        }
        for i in done.into_iter().rev() {
            let h = self.holds.remove(i);
            if let Some(m) = self.members.iter_mut().find(|m| m.id == h.member) {
                notify(
                    conns,
                    &self.rings,
                    m,
                    &ToMember::Release {
                        version: h.version,
                        partition: h.partition,
                    },
                );
            }
        }
    }

    /// (partition, first sequence not done): the lowest any member,
    /// departed member, unassigned range or frontier still needs.
    fn cursors(&self) -> Vec<(u32, u64)> {
        let mut out: BTreeMap<u32, u64> = BTreeMap::new();
        let mut low = |p: u32, s: u64| {
            let e = out.entry(p).or_insert(s);
            *e = (*e).min(s);
        };
        for m in &self.members {
            for (&p, &a) in &m.acked {
                let mut next = a + 1;
                for &(_, fp, f) in &m.floor {
                    if fp == p {
                        next = next.min(f);
                    }
                }
                low(p, next);
            }
        }
        for d in &self.departed {
            for (&p, owned) in &d.owned {
                let a = d.acked.get(&p).copied().unwrap_or(0);
                for o in owned {
                    low(p, o.from.max(a + 1));
                }
            }
        }
        for o in &self.orphans {
            low(o.partition, o.range.from);
        }
        for (&p, &f) in &self.frontier {
            low(p, f);
        }
        out.into_iter().collect()
    }

    fn publish(&mut self) {
        let members = self
            .members
            .iter()
            .map(|m| MemberStats {
                id: m.id,
                name: m.name.clone(),
                priority: m.priority,
                unacked: if m.counts.delivered > 0 {
                    m.counts.unacked.min(u64::from(u32::MAX)) as u32
                } else {
                    m.readers
                        .keys()
                        .map(|p| {
                            let ring = self.rings.get(*p as usize);
                            let c = ring.map_or(0, |r| {
                                r.ring().readers()[m.readers[p].index as usize]
                                    .cursor
                                    .load(Ordering::Relaxed)
                            });
                            c.saturating_sub(m.acked.get(p).copied().unwrap_or(0) + 1)
                        })
                        .sum::<u64>()
                        .min(u64::from(u32::MAX)) as u32
                },
                window: 0,
                slots: m.slots as u32,
                partitions: m.active.clone(),
                draining: self.holds.iter().any(|h| h.member == m.id),
                delivered: m.counts.delivered,
                acked: m.counts.acked,
            })
            .collect();
        let mut snap = self
            .shared
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let dead_lettered = snap.counters.dead_lettered;
        let unacked = self.members.iter().map(|m| m.counts.unacked).sum::<u64>();
        *snap = GroupSnapshot {
            members,
            counters: super::Counters {
                dead_lettered,
                ..self.counters
            },
            ready: 0,
            unacked: unacked.min(u64::from(u32::MAX)) as _,
            cursors: self.cursors(),
            lost: self.lost,
            paused: self.paused,
        };
    }
}

//! Subscription groups over shared memory: several processes share one
//! named subscription with Pulsar's types (Exclusive, Failover, Shared,
//! Key_Shared), acknowledgements, redelivery and durable cursors, while
//! every event still comes straight from the ring: no broker round trip
//! per event.
//!
//! ```no_run
//! use shm_client::group::SubscriptionType;
//! use shm_client::{Event, Subscriber};
//!
//! let mut member = Subscriber::builder("market-data/normalized/equities")
//!     .subscription("risk", SubscriptionType::KeyShared)
//!     .consumer_name("risk-1")
//!     .open()?;
//! loop {
//!     let mut done = Vec::new();
//!     member.poll(256, |e| {
//!         if let Event::Tick(t) = e {
//!             // ... handle t ...
//!             done.push((t.partition, t.seq));
//!         }
//!     });
//!     for (p, s) in done {
//!         member.ack(p, s)?;
//!     }
//! #   break;
//! }
//! # Ok::<(), shm_client::Error>(())
//! ```
//!
//! How it works:
//! - Each member reads every partition with its own tethered reader (and
//!   the journal when it falls behind the ring) and delivers only the
//!   events its assignment selects: Failover and Exclusive by partition,
//!   Shared by sequence stripes (sequence mod members), Key_Shared by the
//!   instrument's hash slot (consistent hashing, 65,536 slots).
//! - The broker assigns. Membership goes over the node's Unix control
//!   socket (peer credentials checked); the broker finds a member that died
//!   through its reader slots' liveness locks. On every change it pauses the
//!   members, picks per partition a switch sequence at or past all of them,
//!   and sends the new selectors, which apply from the switch on.
//! - A member acknowledges events individually (cumulatively for
//!   Exclusive and Failover). It publishes its acknowledged cursor (every
//!   event of its own up to it acknowledged) in its reader slot at its
//!   next `poll`, `wait_for_data` or drop, never per acknowledgement (a
//!   store other cores read is not free); the broker reads it from there,
//!   stores the group's cursor (the lowest) in the command store every
//!   200 ms, and when a member goes, hands the ranges it had not
//!   acknowledged to the others to read again ([`wire::Adopt`]), with a
//!   redelivery count; past the subscription's maximum, the broker
//!   dead-letters them.
//! - Key_Shared and Failover never give a key to a new owner while its old
//!   owner holds some unacknowledged: the new owner holds those keys
//!   (buffering at most [`MAX_DEFERRED`] events) until the broker sees the
//!   old owner's acknowledged cursor pass the switch, or removes it.

pub mod wire;

use std::collections::VecDeque;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tickwire_proto::frame::BODY_WORDS;
use tickwire_proto::symbology::Symbology;
use tickwire_proto::{ArchivedFrameBody, group as rules};

use crate::{Error, Event, Start, Subscriber, SubscriberBuilder, Tick};
use wire::{Adopt, Selector, ToBroker, ToMember};

/// A subscription type, with Pulsar's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionType {
    /// One consumer; a second is refused.
    Exclusive,
    /// One active consumer per partition (by priority, then name); the
    /// others take over when it goes.
    Failover,
    /// Each event to one member.
    Shared,
    /// Each instrument to one member at a time, in order.
    KeyShared,
}

impl SubscriptionType {
    /// The wire name: `exclusive`, `failover`, `shared`, `key_shared`.
    pub fn name(self) -> &'static str {
        match self {
            SubscriptionType::Exclusive => "exclusive",
            SubscriptionType::Failover => "failover",
            SubscriptionType::Shared => "shared",
            SubscriptionType::KeyShared => "key_shared",
        }
    }

    /// From a wire name (ASCII case and `-`/`_` ignored).
    pub fn parse(s: &str) -> Option<SubscriptionType> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "exclusive" => Some(SubscriptionType::Exclusive),
            "failover" => Some(SubscriptionType::Failover),
            "shared" => Some(SubscriptionType::Shared),
            "key_shared" | "keyshared" => Some(SubscriptionType::KeyShared),
            _ => None,
        }
    }

    /// Whether cumulative acknowledgements make sense (ordered delivery
    /// of a whole partition to one member).
    pub fn cumulative(self) -> bool {
        matches!(
            self,
            SubscriptionType::Exclusive | SubscriptionType::Failover
        )
    }
}

/// The Key_Shared slot of instrument `id` (its symbology entry, when the
/// table names it): what members and the broker both select by.
pub fn key_slot(entry: Option<&tickwire_proto::symbology::Entry>, id: u32) -> u16 {
    match entry {
        Some(e) => rules::slot_of(e.symbol(), e.exchange()),
        None => rules::slot_of_unnamed(id),
    }
}

/// Events a member may hold back while a drain is waiting, before it stops
/// reading until the drain ends.
pub const MAX_DEFERRED: usize = 65_536;

/// The most events a member's live reader reads per partition per poll: it
/// stores its cursor after each such batch, so the broker knows a member
/// that died delivered nothing past its stored cursor plus this.
pub const BATCH: usize = 256;

/// The control socket's file name in the node directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Builds a group member: [`SubscriberBuilder::subscription`].
#[derive(Debug, Clone)]
pub struct GroupBuilder {
    sub: SubscriberBuilder,
    name: String,
    kind: SubscriptionType,
    consumer: Option<String>,
    priority: i32,
    ack_timeout: Duration,
    max_redeliveries: Option<u32>,
    control: Option<PathBuf>,
    timeout: Duration,
}

impl SubscriberBuilder {
    /// Makes this subscriber a member of the subscription group `name` of
    /// type `kind` (started by its first member, resumed from its stored
    /// cursors when it has some). The builder's start applies to a new
    /// group only; its filter and node directory to the member. A member
    /// reads every partition: [`partitions`](Self::partitions) is refused.
    pub fn subscription(self, name: impl Into<String>, kind: SubscriptionType) -> GroupBuilder {
        GroupBuilder {
            sub: self,
            name: name.into(),
            kind,
            consumer: None,
            priority: 0,
            ack_timeout: Duration::from_secs(30),
            max_redeliveries: None,
            control: None,
            timeout: Duration::from_secs(10),
        }
    }
}

impl GroupBuilder {
    /// The consumer's name (default `<host pid>`): Failover orders by it,
    /// Key_Shared hashes it.
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }
    /// Failover priority (lower is preferred; default 0).
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = p;
        self
    }
    /// A member that holds an event unacknowledged longer than this is
    /// removed and its events redelivered (default 30 s, at least 100 ms).
    pub fn ack_timeout(mut self, d: Duration) -> Self {
        self.ack_timeout = d.max(Duration::from_millis(100));
        self
    }
    /// Deliveries after the first before an unacknowledged event goes to
    /// the subscription's dead letters (default, and 0: never, as for a
    /// remote consumer). A group has one: a member asking for another than
    /// its members' is refused.
    pub fn max_redeliveries(mut self, n: u32) -> Self {
        self.max_redeliveries = (n > 0).then_some(n);
        self
    }
    /// The broker's control socket (default `<node dir>/control.sock`).
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.control = Some(path.into());
        self
    }
    /// How long joining may take (default 10 s).
    pub fn join_timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Opens the member's readers, joins the group and waits for its
    /// first assignment.
    ///
    /// # Errors
    /// As [`SubscriberBuilder::open`]; [`Error::Group`] when the broker's
    /// control socket cannot be reached, the broker refuses the member
    /// (an Exclusive subscription with a consumer, another type, a peer of
    /// another user), or does not answer within the join timeout.
    pub fn open(self) -> Result<GroupSubscriber, Error> {
        if self.sub.partitions.is_some() {
            return Err(Error::Group(
                "a group member reads every partition: the broker assigns them".into(),
            ));
        }
        let dir = self
            .sub
            .node_dir
            .clone()
            .unwrap_or_else(crate::default_node_dir);
        let new_group_start = self.sub.start;
        let filter = wire::FilterSpec::from(&self.sub.filter);
        let mut live = self.sub.clone().start(Start::Latest).journal_fill(true);
        if live.tether.is_none() {
            live = live.tethered(Duration::from_millis(1));
        }
        let range_builder = self.sub.clone().tether_off();
        let sub = live.open()?;
        let mut readers = Vec::new();
        for p in sub.partitions() {
            let Some((index, slot)) = sub.reader_slot(p) else {
                return Err(Error::Group(format!(
                    "no reader slot on partition {p}: a group member needs one (all 64 taken?)"
                )));
            };
            let (generation, _) =
                tickwire_proto::layout::unpack_state(slot.state_gen.load(Ordering::Acquire));
            readers.push(wire::ReaderRef {
                partition: p,
                index: index as u32,
                generation,
            });
        }
        let path = self
            .control
            .clone()
            .unwrap_or_else(|| dir.join(CONTROL_SOCKET));
        let stream = UnixStream::connect(&path).map_err(|e| {
            Error::Group(format!(
                "cannot reach the broker's control socket {}: {e} (is `tickwire serve` running on this node directory, with its edge on?)",
                path.display()
            ))
        })?;
        let mut ctl = Control::new(stream)?;
        let consumer = self.consumer.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
                std::process::id()
            )
        });
        ctl.send(&ToBroker::Join(Box::new(wire::Join {
            topic: self.sub.topic.clone(),
            subscription: self.name.clone(),
            kind: self.kind.name().into(),
            consumer: consumer.clone(),
            priority: self.priority,
            ack_timeout_ms: self.ack_timeout.as_millis().min(u64::MAX as u128) as u64,
            max_redeliveries: self.max_redeliveries,
            start: new_group_start.into(),
            filter,
            readers,
            positions: sub.positions(),
            pid: std::process::id(),
        })))?;
        let deadline = Instant::now() + self.timeout;
        let member = match ctl.recv_until(deadline)? {
            ToMember::Welcome { member } => member,
            ToMember::Refused { message } => return Err(Error::Group(message)),
            other => {
                return Err(Error::Group(format!(
                    "the broker answered a join with {other:?}"
                )));
            }
        };
        let signal_part = sub.partitions().first().copied().unwrap_or(0);
        let mut g = GroupSubscriber {
            parts: sub
                .partitions()
                .into_iter()
                .map(|p| MemberPart::new(p, sub.position(p).unwrap_or(1)))
                .collect(),
            sub,
            range_builder,
            node_dir: dir,
            ctl,
            kind: self.kind,
            name: self.name,
            consumer,
            member,
            version: 0,
            signal_part,
            signal_seen: 0,
            adopts: VecDeque::new(),
            range: None,
            range_moved: false,
            unpublished: false,
            reported: (0, 0, 0),
            deferred: VecDeque::new(),
            deferred_keys: std::collections::HashMap::new(),
            recheck: false,
            holds: Vec::new(),
            slots: Vec::new(),
            sym: None,
            paused: true,
            removed: None,
            polls: 0,
            last_check: Instant::now(),
            stats: GroupStats::default(),
        };
        // The first assignment.
        while g.version == 0 {
            let msg = g.ctl.recv_until(deadline)?;
            g.apply(msg)?;
            if let Some(r) = &g.removed {
                return Err(Error::Group(r.clone()));
            }
        }
        Ok(g)
    }
}

impl SubscriberBuilder {
    fn tether_off(mut self) -> Self {
        self.tether = None;
        self
    }
}

/// Counters a member keeps.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroupStats {
    /// Events delivered to the caller (first deliveries and redeliveries).
    pub delivered: u64,
    /// Of those, redeliveries (adopted from a member that went away).
    pub redelivered: u64,
    /// Acknowledged.
    pub acked: u64,
    /// Read but another member's.
    pub skipped: u64,
    /// Held back during a drain at some point.
    pub deferred: u64,
    /// Rebalances applied.
    pub rebalances: u64,
}

/// Acknowledgement state of an event a member owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Delivered,
    Acked,
    Deferred,
}

struct MemberPart {
    partition: u32,
    /// (from sequence, selector), ascending: the last one whose start is
    /// at or below a sequence selects it.
    regimes: Vec<(u64, Selector)>,
    /// Owned events not yet acknowledged (and acknowledged ones behind the
    /// first that is not), ascending.
    outstanding: VecDeque<(u64, St)>,
    /// Ranges adopted at or past the live reader: it delivers them in
    /// sequence order with the member's own events.
    extra: Vec<Adopt>,
    /// The live reader's next sequence.
    live: u64,
    /// The acknowledged cursor last published.
    published: u64,
}

impl MemberPart {
    fn new(partition: u32, live: u64) -> MemberPart {
        MemberPart {
            partition,
            regimes: Vec::new(),
            outstanding: VecDeque::new(),
            extra: Vec::new(),
            live,
            published: u64::MAX,
        }
    }

    fn selector(&self, seq: u64) -> Option<&Selector> {
        self.regimes
            .iter()
            .rev()
            .find(|(from, _)| *from <= seq)
            .map(|(_, s)| s)
    }

    /// The next run of sequences the live reader may deliver at or after
    /// `seq` (as [`Selector::next_run`]; `(u64::MAX, u64::MAX)`: none):
    /// what the regimes select, or everything while ranges adopted past
    /// the live reader are pending.
    fn next_run(&self, seq: u64) -> (u64, u64) {
        if !self.extra.is_empty() {
            return (seq, u64::MAX);
        }
        let Some(i) = self.regimes.iter().rposition(|(from, _)| *from <= seq) else {
            return self
                .regimes
                .first()
                .map_or((u64::MAX, u64::MAX), |r| (r.0, r.0 + 1));
        };
        // A regime's runs end where the next regime begins.
        let bound = self.regimes.get(i + 1).map_or(u64::MAX, |r| r.0);
        match self.regimes[i].1.next_run(seq) {
            Some((start, end)) if start < bound => (start, end.min(bound)),
            _ if bound == u64::MAX => (u64::MAX, u64::MAX),
            _ => (bound, bound + 1),
        }
    }

    fn pop_acked(&mut self) {
        while self
            .outstanding
            .front()
            .is_some_and(|&(_, s)| s == St::Acked)
        {
            self.outstanding.pop_front();
        }
    }

    fn insert(&mut self, seq: u64, st: St) {
        if self.outstanding.back().is_none_or(|&(s, _)| s < seq) {
            self.outstanding.push_back((seq, st));
            return;
        }
        match self.outstanding.binary_search_by_key(&seq, |&(s, _)| s) {
            Ok(i) => self.outstanding[i].1 = st,
            Err(i) => self.outstanding.insert(i, (seq, st)),
        }
    }
}

struct Hold {
    version: u64,
    partition: u32,
    from: u64,
    selector: Selector,
}

struct Deferred {
    partition: u32,
    seq: u64,
    words: [u64; BODY_WORDS],
    redeliveries: u32,
}

/// The slots any of `selectors` may select (`None`: any slot).
fn slot_cover<'a>(selectors: impl IntoIterator<Item = &'a Selector>) -> Option<wire::SlotSet> {
    selectors
        .into_iter()
        .try_fold(wire::SlotSet::default(), |all, s| {
            s.slot_cover().map(|c| all.or(&c))
        })
}

/// Held events per (partition, instrument id): how many, and the first's
/// sequence.
type DeferredKeys = std::collections::HashMap<(u32, u32), (u32, u64)>;

/// Holds an event back behind its key's drain.
fn defer(
    deferred: &mut VecDeque<Deferred>,
    keys: &mut DeferredKeys,
    key: (u32, u32),
    seq: u64,
    words: &[u64; BODY_WORDS],
    redeliveries: u32,
) {
    keys.entry(key).or_insert((0, seq)).0 += 1;
    deferred.push_back(Deferred {
        partition: key.0,
        seq,
        words: *words,
        redeliveries,
    });
}

/// One pass over a partition for every range adopted on it.
struct RangeRead {
    sub: Subscriber,
    partition: u32,
    to: u64,
    pieces: Vec<Adopt>,
}

/// A member of a subscription group over shared memory. See the module
/// docs.
pub struct GroupSubscriber {
    sub: Subscriber,
    range_builder: SubscriberBuilder,
    node_dir: PathBuf,
    ctl: Control,
    kind: SubscriptionType,
    name: String,
    consumer: String,
    member: u64,
    version: u64,
    signal_part: u32,
    signal_seen: u32,
    parts: Vec<MemberPart>,
    adopts: VecDeque<(u32, Adopt)>,
    range: Option<RangeRead>,
    /// The last poll moved the range read on (passing over is progress).
    range_moved: bool,
    /// Acknowledgements moved a cursor that is not published yet.
    unpublished: bool,
    /// (delivered, redelivered, acked) last sent to the broker.
    reported: (u64, u64, u64),
    deferred: VecDeque<Deferred>,
    /// Held events per (partition, instrument id).
    deferred_keys: DeferredKeys,
    /// A release came: look at the held events again.
    recheck: bool,
    holds: Vec<Hold>,
    /// Key_Shared slot by instrument id (`u32::MAX`: not known yet).
    slots: Vec<u32>,
    sym: Option<Symbology>,
    paused: bool,
    removed: Option<String>,
    polls: u32,
    last_check: Instant,
    stats: GroupStats,
}

/// How often a member looks at its control socket when no signal came
/// (the broker going away shows there).
const CONTROL_EVERY: Duration = Duration::from_millis(100);

/// How long a control message waits for a broker that is not reading.
const SEND_PATIENCE: Duration = Duration::from_secs(5);

impl Drop for GroupSubscriber {
    /// A member that leaves cleanly sends its last counts (the periodic
    /// report may be up to 100 ms old), so the subscription's stats show
    /// every acknowledgement it made. Its acknowledgements themselves are
    /// already in its reader slots.
    /// It never waits for a broker that is not reading: what the socket
    /// does not take at once is dropped.
    fn drop(&mut self) {
        self.publish_acks();
        self.report(Duration::ZERO);
    }
}

impl GroupSubscriber {
    /// Delivers up to `max` of this member's events, calling `f` for
    /// each in order per partition (and per key under Key_Shared); ticks
    /// carry their [`Tick::redeliveries`]. Returns how many `f` got; 0
    /// while nothing is there, during a rebalance, or once removed
    /// ([`removed`](Self::removed)).
    pub fn poll<F: FnMut(Event<'_>)>(&mut self, max: usize, mut f: F) -> usize {
        self.publish_acks();
        self.polls = self.polls.wrapping_add(1);
        if self.signalled() || (self.polls & 63 == 0 && self.last_check.elapsed() >= CONTROL_EVERY)
        {
            self.last_check = Instant::now();
            self.control();
            self.report(SEND_PATIENCE);
        }
        if self.removed.is_some() || self.paused {
            return 0;
        }
        if self.range.is_some() || !self.adopts.is_empty() {
            return self.poll_adopted(max, &mut f);
        }
        let mut n = self.flush_deferred(max, &mut f);
        if n < max && self.deferred.len() < MAX_DEFERRED {
            n += self.poll_live(max - n, &mut f);
        }
        self.publish();
        n
    }

    /// Acknowledges one event this member was given. The acknowledged
    /// cursor moves in the reader slot at the next [`poll`](Self::poll),
    /// [`wait_for_data`](Self::wait_for_data) or drop: a member killed
    /// before that has those events delivered again.
    ///
    /// # Errors
    /// [`Error::Group`] when it was not delivered to this member or is
    /// already acknowledged.
    pub fn ack(&mut self, partition: u32, seq: u64) -> Result<(), Error> {
        let Some(p) = self.parts.iter_mut().find(|p| p.partition == partition) else {
            return Err(Error::Group(format!(
                "ack {partition}:{seq}: this member reads no partition {partition}"
            )));
        };
        // Acknowledgements mostly come in delivery order: the oldest first.
        let at = if p.outstanding.front().is_some_and(|&(s, _)| s == seq) {
            Ok(0)
        } else {
            p.outstanding.binary_search_by_key(&seq, |&(s, _)| s)
        };
        match at {
            Ok(i) if p.outstanding[i].1 == St::Delivered => {
                p.outstanding[i].1 = St::Acked;
                self.stats.acked += 1;
                if i == 0 {
                    p.pop_acked();
                    // Published by the next poll or wait, not per event.
                    self.unpublished = true;
                }
                Ok(())
            }
            _ => Err(Error::Group(format!(
                "ack {partition}:{seq}: not delivered to this member, or already acknowledged"
            ))),
        }
    }

    /// Acknowledges every event of `partition` up to `seq` this member was
    /// given (Exclusive and Failover only, as in Pulsar). Returns how many.
    ///
    /// # Errors
    /// [`Error::Group`] for a Shared or Key_Shared group.
    pub fn ack_cumulative(&mut self, partition: u32, seq: u64) -> Result<usize, Error> {
        if !self.kind.cumulative() {
            return Err(Error::Group(format!(
                "cumulative acknowledgement is not allowed on a {} subscription",
                self.kind.name()
            )));
        }
        let Some(p) = self.parts.iter_mut().find(|p| p.partition == partition) else {
            return Err(Error::Group(format!(
                "ack {partition}:{seq}: this member reads no partition {partition}"
            )));
        };
        let mut n = 0;
        for e in p.outstanding.iter_mut() {
            if e.0 > seq {
                break;
            }
            if e.1 == St::Delivered {
                e.1 = St::Acked;
                n += 1;
            }
        }
        self.stats.acked += n as u64;
        p.pop_acked();
        self.unpublished = true;
        Ok(n)
    }

    /// Why the broker removed this member (it stopped acknowledging, did
    /// not answer a rebalance, the subscription was deleted, or the broker
    /// went away); it delivers nothing more. Open a new member to rejoin.
    pub fn removed(&self) -> Option<&str> {
        self.removed.as_deref()
    }

    /// This member's id in the group.
    pub fn member_id(&self) -> u64 {
        self.member
    }

    /// The subscription's name.
    pub fn subscription(&self) -> &str {
        &self.name
    }

    /// The consumer name.
    pub fn consumer_name(&self) -> &str {
        &self.consumer
    }

    /// Counters.
    pub fn stats(&self) -> GroupStats {
        self.stats
    }

    /// Events delivered and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.parts
            .iter()
            .map(|p| {
                p.outstanding
                    .iter()
                    .filter(|e| e.1 == St::Delivered)
                    .count()
            })
            .sum()
    }

    /// The member's reader, for its figures (lag, positions).
    pub fn subscriber(&self) -> &Subscriber {
        &self.sub
    }

    /// Waits up to `timeout` for data on the live rings (as
    /// [`Subscriber::wait_for_data`]).
    pub fn wait_for_data(&mut self, timeout: Duration) {
        self.publish_acks();
        let reading_range = self.range.is_some() || !self.adopts.is_empty();
        if reading_range && self.range_moved && !self.paused && self.removed.is_none() {
            // A range read goes on at once: its events are there already.
            return;
        }
        if self.paused || reading_range || self.removed.is_some() {
            std::thread::sleep(timeout.min(Duration::from_millis(1)));
            return;
        }
        self.sub.wait_for_data(timeout.min(CONTROL_EVERY));
    }

    fn signalled(&self) -> bool {
        self.sub
            .reader_slot(self.signal_part)
            .is_some_and(|(_, s)| s.selector.load(Ordering::Acquire) != self.signal_seen)
    }

    /// Tells the broker the member's counts when they changed, waiting at
    /// most `patience` for the socket to take them.
    fn report(&mut self, patience: Duration) {
        let s = self.stats;
        let now = (s.delivered, s.redelivered, s.acked);
        if self.removed.is_some() || now == self.reported {
            return;
        }
        let msg = ToBroker::Counts {
            delivered: s.delivered,
            redelivered: s.redelivered,
            acked: s.acked,
            unacked: self.unacked() as u64,
        };
        match self.ctl.send_within(&msg, patience) {
            Ok(()) => self.reported = now,
            Err(e) => self.removed = Some(e.to_string()),
        }
    }

    /// Reads and applies what the broker sent.
    fn control(&mut self) {
        if let Some((_, s)) = self.sub.reader_slot(self.signal_part) {
            self.signal_seen = s.selector.load(Ordering::Acquire);
        }
        loop {
            match self.ctl.try_recv() {
                Ok(Some(msg)) => {
                    if let Err(e) = self.apply(msg) {
                        self.removed = Some(e.to_string());
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    if self.removed.is_none() {
                        self.removed = Some(e.to_string());
                    }
                    return;
                }
            }
        }
    }

    fn apply(&mut self, msg: ToMember) -> Result<(), Error> {
        match msg {
            ToMember::Pause { version } => {
                self.paused = true;
                let positions = self.sub.positions();
                self.ctl.send(&ToBroker::Paused { version, positions })?;
            }
            ToMember::Assign { version, parts } => {
                for a in parts {
                    let i = match self.parts.iter().position(|p| p.partition == a.partition) {
                        Some(i) => i,
                        None => {
                            let live = self.sub.position(a.partition).unwrap_or(1);
                            self.parts.push(MemberPart::new(a.partition, live));
                            self.parts.len() - 1
                        }
                    };
                    let p = &mut self.parts[i];
                    p.regimes.retain(|(from, _)| *from < a.switch);
                    p.regimes.push((a.switch, a.selector));
                    if let Some(h) = a.hold
                        && !h.is_nothing()
                    {
                        self.holds.push(Hold {
                            version,
                            partition: a.partition,
                            from: a.switch,
                            selector: h,
                        });
                    }
                    // Behind the live reader: read again first. At or past
                    // it: the live reader takes them in order.
                    let live = self.sub.position(a.partition).unwrap_or(1);
                    for ad in a.adopt {
                        if ad.from >= ad.to || ad.selector.is_nothing() {
                            continue;
                        }
                        if ad.to > live {
                            p.extra.push(Adopt {
                                from: ad.from.max(live),
                                ..ad.clone()
                            });
                        }
                        if ad.from < live {
                            self.adopts.push_back((
                                a.partition,
                                Adopt {
                                    to: ad.to.min(live),
                                    ..ad
                                },
                            ));
                        }
                    }
                }
                self.version = version;
                self.paused = false;
                self.stats.rebalances += 1;
                self.cover_live();
                // The cursors account for the adopted ranges before the
                // broker trusts them again.
                for p in &mut self.parts {
                    p.published = u64::MAX;
                }
                self.publish();
                self.ctl.send(&ToBroker::Applied { version })?;
            }
            ToMember::Release { version, partition } => {
                self.holds
                    .retain(|h| !(h.version == version && h.partition == partition));
                self.recheck = true;
            }
            ToMember::Removed { reason } => {
                self.removed = Some(format!("removed from subscription {}: {reason}", self.name));
            }
            ToMember::Welcome { .. } | ToMember::Refused { .. } => {}
        }
        Ok(())
    }

    /// The instrument's Key_Shared slot.
    fn slot(
        slots: &mut Vec<u32>,
        sym: &mut Option<Symbology>,
        node_dir: &std::path::Path,
        id: u32,
    ) -> u16 {
        if let Some(&s) = slots.get(id as usize)
            && s != u32::MAX
        {
            return s as u16;
        }
        if sym.as_ref().is_none_or(|s| s.get(id).is_none()) {
            *sym = Symbology::open(node_dir).ok();
        }
        let Some(e) = sym.as_ref().and_then(|s| s.get(id)) else {
            return key_slot(None, id);
        };
        let slot = key_slot(Some(e), id);
        if (id as usize) < (1 << 24) {
            if slots.len() <= id as usize {
                slots.resize(id as usize + 1, u32::MAX);
            }
            slots[id as usize] = u32::from(slot);
        }
        slot
    }

    fn poll_live<F: FnMut(Event<'_>)>(&mut self, max: usize, f: &mut F) -> usize {
        let GroupSubscriber {
            sub,
            parts,
            holds,
            deferred,
            deferred_keys,
            slots,
            sym,
            node_dir,
            stats,
            ..
        } = self;
        let mut n = 0;
        // `want` looks at the regimes between reads, `f` updates the
        // outstanding events on a read: never both at once.
        let cell = std::cell::RefCell::new(&mut *parts);
        let want = |partition: u32, seq: u64| {
            cell.borrow()
                .iter()
                .find(|p| p.partition == partition)
                .map_or((u64::MAX, u64::MAX), |p| p.next_run(seq))
        };
        sub.poll_selected(max.min(BATCH), want, |e| {
            let Event::Tick(t) = e else {
                n += 1;
                f(e);
                return;
            };
            let mut parts = cell.borrow_mut();
            let Some(p) = parts.iter_mut().find(|p| p.partition == t.partition) else {
                stats.skipped += 1;
                return;
            };
            p.live = t.seq + 1;
            let sel = p.selector(t.seq);
            let slot = if sel.is_some_and(Selector::needs_slot)
                || !holds.is_empty()
                || !p.extra.is_empty()
            {
                Self::slot(slots, sym, node_dir, t.body.instrument_id())
            } else {
                0
            };
            let own = sel.is_some_and(|s| s.matches(t.seq, slot));
            // Else adopted from a member that went away?
            let r = if own {
                0
            } else {
                let Some(r) = p
                    .extra
                    .iter()
                    .find(|a| a.from <= t.seq && t.seq < a.to && a.selector.matches(t.seq, slot))
                    .map(|a| a.redeliveries)
                else {
                    stats.skipped += 1;
                    return;
                };
                r
            };
            let key = (t.partition, t.body.instrument_id());
            // Held by a drain, or behind an event of the same key that is.
            let held = (own
                && !holds.is_empty()
                && holds.iter().any(|h| {
                    h.partition == t.partition && t.seq >= h.from && h.selector.matches(t.seq, slot)
                }))
                || (!deferred_keys.is_empty() && deferred_keys.contains_key(&key));
            if held {
                defer(deferred, deferred_keys, key, t.seq, t.body.words(), r);
                p.insert(t.seq, St::Deferred);
                stats.deferred += 1;
                return;
            }
            let mut t = t;
            t.redeliveries = r;
            if r > 0 {
                stats.redelivered += 1;
            }
            p.insert(t.seq, St::Delivered);
            stats.delivered += 1;
            n += 1;
            f(Event::Tick(t));
        });
        let mut narrowed = false;
        for p in parts.iter_mut() {
            if let Some(pos) = sub.position(p.partition) {
                p.live = pos;
            }
            // Regimes and adopted ranges the live reader has passed.
            while p.regimes.len() > 1 && p.regimes[1].0 <= p.live {
                p.regimes.remove(0);
                narrowed = true;
            }
            if !p.extra.is_empty() {
                let (live, before) = (p.live, p.extra.len());
                p.extra.retain(|a| a.to > live);
                narrowed |= p.extra.len() != before;
            }
        }
        if narrowed {
            self.cover_live();
        }
        n
    }

    /// Tells the live reader what it may pass over: any slot no regime or
    /// adopted range selects, on any partition.
    fn cover_live(&mut self) {
        let cover = slot_cover(self.parts.iter().flat_map(|p| {
            p.regimes
                .iter()
                .map(|(_, s)| s)
                .chain(p.extra.iter().map(|a| &a.selector))
        }));
        self.sub.pass_over_slots(cover.as_ref());
    }

    /// Delivers events held for a drain that has ended, in order, keeping
    /// behind any event of the same key still held.
    fn flush_deferred<F: FnMut(Event<'_>)>(&mut self, max: usize, f: &mut F) -> usize {
        if !self.recheck || self.deferred.is_empty() {
            return 0;
        }
        let mut n = 0;
        let mut blocked: std::collections::HashSet<(u32, u32)> = std::collections::HashSet::new();
        let mut i = 0;
        while i < self.deferred.len() && n < max {
            let d = &self.deferred[i];
            let id = ArchivedFrameBody::from_words(&d.words).instrument_id();
            let key = (d.partition, id);
            let slot = Self::slot(&mut self.slots, &mut self.sym, &self.node_dir, id);
            let still = blocked.contains(&key)
                || self.holds.iter().any(|h| {
                    h.partition == d.partition && d.seq >= h.from && h.selector.matches(d.seq, slot)
                });
            if still {
                blocked.insert(key);
                i += 1;
                continue;
            }
            let Some(d) = self.deferred.remove(i) else {
                break;
            };
            if let Some(c) = self.deferred_keys.get_mut(&key) {
                c.0 -= 1;
                if c.0 == 0 {
                    self.deferred_keys.remove(&key);
                }
            }
            if let Some(p) = self.parts.iter_mut().find(|p| p.partition == d.partition) {
                p.insert(d.seq, St::Delivered);
            }
            self.stats.delivered += 1;
            n += 1;
            if d.redeliveries > 0 {
                self.stats.redelivered += 1;
            }
            f(Event::Tick(Tick {
                partition: d.partition,
                seq: d.seq,
                body: ArchivedFrameBody::from_words(&d.words),
                redeliveries: d.redeliveries,
                symbology: self.sub.symbology(),
            }));
        }
        // Looked at everything: nothing more until the next release.
        self.recheck = n == max;
        n
    }

    /// Reads adopted ranges (a member that went away, a backlog), one at a
    /// time, before anything live.
    fn poll_adopted<F: FnMut(Event<'_>)>(&mut self, max: usize, f: &mut F) -> usize {
        if self.range.is_none() {
            let Some(&(partition, _)) = self.adopts.front() else {
                return 0;
            };
            let mut pieces = Vec::new();
            self.adopts.retain(|(p, a)| {
                if *p == partition {
                    pieces.push(a.clone());
                    false
                } else {
                    true
                }
            });
            let from = pieces.iter().map(|a| a.from).min().unwrap_or(1);
            let to = pieces.iter().map(|a| a.to).max().unwrap_or(from);
            let opened = self
                .range_builder
                .clone()
                .partitions([partition])
                .resume_at(partition, from)
                .journal_fill(true)
                .open();
            match opened {
                Ok(mut sub) => {
                    sub.pass_over_slots(slot_cover(pieces.iter().map(|a| &a.selector)).as_ref());
                    self.range = Some(RangeRead {
                        sub,
                        partition,
                        to,
                        pieces,
                    });
                }
                Err(e) => {
                    // The ring went away: what it held is lost to us; say so.
                    self.removed = Some(format!(
                        "cannot read partition {partition} again from {from}: {e}"
                    ));
                    return 0;
                }
            }
        }
        let Some(mut r) = self.range.take() else {
            return 0;
        };
        let GroupSubscriber {
            parts,
            slots,
            sym,
            node_dir,
            stats,
            deferred,
            deferred_keys,
            ..
        } = self;
        let mut n = 0;
        let mut done = false;
        let (to, partition) = (r.to, r.partition);
        let pieces = &r.pieces;
        let needs_slot = pieces.iter().any(|a| a.selector.needs_slot());
        let Some(p) = parts.iter_mut().find(|p| p.partition == partition) else {
            return 0;
        };
        // Pass over what no piece can select, up to the range's end; read
        // the earliest piece's run (the callback sees every piece).
        let want = |_: u32, seq: u64| {
            pieces
                .iter()
                .filter(|a| seq < a.to)
                .filter_map(|a| {
                    let (start, end) = a.selector.next_run(seq.max(a.from))?;
                    (start < a.to).then_some((start, end.min(a.to)))
                })
                .min()
                .unwrap_or((to, to + 1))
        };
        let before = r.sub.position(partition);
        r.sub.poll_selected(max, want, |e| match e {
            Event::Tick(mut t) => {
                if t.seq >= to {
                    done = true;
                    return;
                }
                let slot = if needs_slot {
                    Self::slot(slots, sym, node_dir, t.body.instrument_id())
                } else {
                    0
                };
                let Some(piece) = pieces
                    .iter()
                    .find(|a| a.from <= t.seq && t.seq < a.to && a.selector.matches(t.seq, slot))
                else {
                    return;
                };
                let redeliveries = piece.redeliveries;
                let key = (partition, t.body.instrument_id());
                if deferred_keys
                    .get(&key)
                    .is_some_and(|&(_, first)| t.seq > first)
                {
                    defer(
                        deferred,
                        deferred_keys,
                        key,
                        t.seq,
                        t.body.words(),
                        redeliveries,
                    );
                    p.insert(t.seq, St::Deferred);
                    stats.deferred += 1;
                    return;
                }
                p.insert(t.seq, St::Delivered);
                stats.delivered += 1;
                if redeliveries > 0 {
                    stats.redelivered += 1;
                }
                n += 1;
                t.redeliveries = redeliveries;
                f(Event::Tick(t));
            }
            Event::Gap { from, to: last, .. } => {
                if from < to {
                    n += 1;
                    f(Event::Gap {
                        partition,
                        from,
                        to: last.min(to - 1),
                    });
                }
                if last + 1 >= to {
                    done = true;
                }
            }
            _ => {}
        });
        let after = r.sub.position(partition);
        self.range_moved = n > 0 || after != before;
        if after.is_some_and(|next| next >= to) {
            done = true;
        }
        if !done {
            self.range = Some(r);
        }
        self.publish();
        n
    }

    /// Publishes the acknowledged cursors if acknowledgements moved them
    /// since the last publication.
    fn publish_acks(&mut self) {
        if self.unpublished {
            self.publish();
        }
    }

    /// Publishes every partition's acknowledged cursor that moved.
    fn publish(&mut self) {
        self.unpublished = false;
        for p in &mut self.parts {
            if let Some(pos) = self.sub.position(p.partition) {
                p.live = pos;
            }
            Self::publish_part(&self.sub, p, &self.adopts, self.range.as_ref());
        }
    }

    /// The acknowledged cursor of a partition: every event of this member's
    /// up to it is acknowledged (nothing left to read again below it).
    fn publish_part(
        sub: &Subscriber,
        p: &mut MemberPart,
        adopts: &VecDeque<(u32, Adopt)>,
        range: Option<&RangeRead>,
    ) {
        let mut next = p.live;
        if let Some(&(seq, _)) = p.outstanding.front() {
            next = next.min(seq);
        }
        for (part, a) in adopts {
            if *part == p.partition {
                next = next.min(a.from);
            }
        }
        if let Some(r) = range
            && r.partition == p.partition
        {
            next = next.min(r.sub.position(p.partition).unwrap_or(0));
        }
        let acked = next.saturating_sub(1);
        if acked != p.published
            && let Some((_, slot)) = sub.reader_slot(p.partition)
        {
            slot.acked_cursor.store(acked, Ordering::Release);
            p.published = acked;
        }
    }
}

/// The member's end of the control socket: JSON lines.
struct Control {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Control {
    fn new(stream: UnixStream) -> Result<Control, Error> {
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::Group(format!("control socket: {e}")))?;
        Ok(Control {
            stream,
            buf: Vec::new(),
        })
    }

    fn send(&mut self, msg: &ToBroker) -> Result<(), Error> {
        self.send_within(msg, SEND_PATIENCE)
    }

    /// [`send`](Self::send), waiting at most `patience` for a broker that
    /// is not reading.
    fn send_within(&mut self, msg: &ToBroker, patience: Duration) -> Result<(), Error> {
        let mut line = serde_json::to_vec(msg)
            .map_err(|e| Error::Group(format!("encoding a control message: {e}")))?;
        line.push(b'\n');
        let mut off = 0;
        let deadline = Instant::now() + patience;
        while off < line.len() {
            match self.stream.write(&line[off..]) {
                Ok(0) => return Err(Error::Group("the broker closed the control socket".into())),
                Ok(k) => off += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(Error::Group(format!(
                            "the broker has not read the control socket for {patience:?}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Group(format!("control socket: {e}"))),
            }
        }
        Ok(())
    }

    /// The next whole message, if one has arrived.
    fn try_recv(&mut self) -> Result<Option<ToMember>, Error> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let msg = serde_json::from_slice(&line[..i]).map_err(|e| {
                    Error::Group(format!(
                        "the broker sent a control message this client does not understand: {e}"
                    ))
                })?;
                return Ok(Some(msg));
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(Error::Group(
                        "the broker closed the control socket (it stopped or restarted)".into(),
                    ));
                }
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Group(format!("control socket: {e}"))),
            }
        }
    }

    fn recv_until(&mut self, deadline: Instant) -> Result<ToMember, Error> {
        loop {
            if let Some(m) = self.try_recv()? {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                return Err(Error::Group(
                    "the broker did not answer within the join timeout".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_redeliveries_means_no_limit_as_for_a_remote_consumer() {
        let group = |n| {
            crate::Subscriber::builder("t")
                .subscription("s", SubscriptionType::Shared)
                .max_redeliveries(n)
        };
        assert_eq!(group(0).max_redeliveries, None);
        assert_eq!(group(3).max_redeliveries, Some(3));
    }
}

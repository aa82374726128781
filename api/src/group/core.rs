//! Who gets which event in a subscription group, and when an event counts
//! as done: the group's state machine, without I/O (its thread in
//! [`super`] reads the rings, encodes and sends).
//!
//! Each event read for the group is *ready* until it is sent to a member,
//! then *unacked* until that member acknowledges it. An ordering key keeps
//! order where the type promises it: the partition for Exclusive and
//! Failover, one of [`SLOTS`] hash slots of the instrument for Key_Shared;
//! Shared has none. The one rule that keeps Key_Shared from ever mixing a
//! key between two members (and Failover from mixing a partition): an
//! event goes to its key's owner only when no *other* member holds an
//! unacknowledged event of the same key. When slots move, the new owner
//! waits (the key is *draining*) until the old owner has acknowledged,
//! left, or been removed for not acknowledging within the ack timeout,
//! which requeues what it held, in sequence order, ahead of newer events.
//! So a group makes progress while one member acknowledges.

use std::collections::{BTreeMap, HashMap};

use super::seqmap::SeqMap;

pub use tickwire_proto::group::{SLOTS, slot_of};

/// A subscription type, with Pulsar's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupType {
    /// One consumer; a second is refused.
    Exclusive,
    /// One active consumer per partition (by priority, then name); the
    /// others stand by.
    Failover,
    /// Each event to one member, by available credit.
    Shared,
    /// Each key (instrument) to one member at a time, in order.
    KeyShared,
}

impl GroupType {
    /// Pulsar's name.
    pub fn name(self) -> &'static str {
        match self {
            GroupType::Exclusive => "Exclusive",
            GroupType::Failover => "Failover",
            GroupType::Shared => "Shared",
            GroupType::KeyShared => "Key_Shared",
        }
    }
}

/// Why a member cannot join.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// Exclusive and somebody is consuming.
    #[error("subscription is Exclusive and consumer {0:?} is attached")]
    Exclusive(String),
}

/// An event handed to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery<T> {
    /// Member id.
    pub member: u64,
    /// Partition.
    pub partition: u32,
    /// Sequence.
    pub seq: u64,
    /// Times it was sent before (0 the first time).
    pub redeliveries: u32,
    /// Its ordering key (slot, partition, or [`NO_KEY`]).
    pub key: u32,
    /// What was read.
    pub item: T,
}

/// An event given up on after too many deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetter<T> {
    /// Partition.
    pub partition: u32,
    /// Sequence.
    pub seq: u64,
    /// Deliveries it had.
    pub deliveries: u32,
    /// What was read.
    pub item: T,
}

/// Shared has no ordering key.
pub const NO_KEY: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Member {
    id: u64,
    name: String,
    priority: i32,
    window: u32,
    /// Its ack timeout (0: the group's).
    ack_timeout_ns: u64,
    unacked: u32,
    /// May be sent to in this round (its queue has room).
    open: bool,
    /// Waited for another member to drain a key in the last round.
    waiting: bool,
    delivered: u64,
    acked: u64,
}

#[derive(Debug, Clone, Copy)]
struct Ready<T> {
    key: u32,
    redeliveries: u32,
    item: T,
}

#[derive(Debug, Clone, Copy)]
struct Sent<T> {
    member: u64,
    at_ns: u64,
    key: u32,
    redeliveries: u32,
    item: T,
}

#[derive(Debug, Clone)]
struct Part<T> {
    ready: SeqMap<Ready<T>>,
    unacked: SeqMap<Sent<T>>,
    /// Next sequence to read.
    next: u64,
}

impl<T> Default for Part<T> {
    fn default() -> Self {
        Part {
            ready: SeqMap::default(),
            unacked: SeqMap::default(),
            next: 0,
        }
    }
}

/// One member's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStats {
    /// Member id.
    pub id: u64,
    /// Consumer name.
    pub name: String,
    /// Priority (Failover).
    pub priority: i32,
    /// Events sent and not acknowledged.
    pub unacked: u32,
    /// Credit: most unacknowledged events it may hold.
    pub window: u32,
    /// Hash slots it owns (Key_Shared).
    pub slots: u32,
    /// Partitions it is active on (Exclusive, Failover).
    pub partitions: Vec<u32>,
    /// It waited in the last round for another member to acknowledge a
    /// key it now owns.
    pub draining: bool,
    /// Events sent to it.
    pub delivered: u64,
    /// Events it acknowledged.
    pub acked: u64,
}

/// A group's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Sends, first and repeated.
    pub delivered: u64,
    /// Sends of an event sent before.
    pub redelivered: u64,
    /// Acknowledged events.
    pub acked: u64,
    /// Events given up on (dead-lettered).
    pub dead_lettered: u64,
    /// Members removed for not acknowledging in time.
    pub timed_out: u64,
}

/// The group's state machine.
#[derive(Debug)]
pub struct Core<T> {
    kind: GroupType,
    /// At-most-once: an event is done once sent.
    auto_ack: bool,
    ack_timeout_ns: u64,
    /// 0: never give up.
    max_redeliveries: u32,
    members: Vec<Member>,
    /// Key_Shared: slot -> owner (0 = none).
    owners: Vec<u64>,
    /// Failover and Exclusive: partition -> active member.
    active: HashMap<u32, u64>,
    /// Ordering key -> (member holding unacked events of it, how many).
    holders: HashMap<u32, (u64, u32)>,
    parts: BTreeMap<u32, Part<T>>,
    rr: usize,
    paused: bool,
    /// Counters.
    pub counters: Counters,
}

impl<T: Copy> Core<T> {
    /// A group with no members. `auto_ack`: at-most-once (done when sent).
    pub fn new(
        kind: GroupType,
        auto_ack: bool,
        ack_timeout_ns: u64,
        max_redeliveries: u32,
    ) -> Self {
        Core {
            kind,
            auto_ack,
            ack_timeout_ns,
            max_redeliveries,
            members: Vec::new(),
            owners: Vec::new(),
            active: HashMap::new(),
            holders: HashMap::new(),
            parts: BTreeMap::new(),
            rr: 0,
            paused: false,
            counters: Counters::default(),
        }
    }

    /// The type.
    pub fn kind(&self) -> GroupType {
        self.kind
    }

    /// Members now.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Stops or restarts sending (acknowledgements still count).
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Whether sending is paused.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Reading of `partition` starts at `next` (its cursor).
    /// (A partition the group reads already is left as it is.)
    pub fn add_partition(&mut self, partition: u32, next: u64) {
        if let std::collections::btree_map::Entry::Vacant(v) = self.parts.entry(partition) {
            v.insert(Part {
                next,
                ..Part::default()
            });
            self.assign();
        }
    }

    /// The ordering key of an event whose Key_Shared hash slot is `slot`.
    pub fn key_of(&self, partition: u32, slot: u16) -> u32 {
        match self.kind {
            GroupType::Shared => NO_KEY,
            GroupType::KeyShared => slot as u32,
            GroupType::Exclusive | GroupType::Failover => partition,
        }
    }

    /// Adds a member. `window`: most unacknowledged events it may hold.
    ///
    /// # Errors
    /// [`JoinError::Exclusive`] when Exclusive and taken.
    pub fn join(
        &mut self,
        id: u64,
        name: &str,
        priority: i32,
        window: u32,
    ) -> Result<(), JoinError> {
        self.join_with_timeout(id, name, priority, window, 0)
    }

    /// [`join`](Self::join) with the member's own ack timeout (0: the
    /// group's).
    ///
    /// # Errors
    /// As `join`.
    pub fn join_with_timeout(
        &mut self,
        id: u64,
        name: &str,
        priority: i32,
        window: u32,
        ack_timeout_ns: u64,
    ) -> Result<(), JoinError> {
        if self.kind == GroupType::Exclusive
            && let Some(m) = self.members.first()
        {
            return Err(JoinError::Exclusive(m.name.clone()));
        }
        self.members.push(Member {
            id,
            name: name.into(),
            priority,
            window: window.max(1),
            ack_timeout_ns,
            unacked: 0,
            open: true,
            waiting: false,
            delivered: 0,
            acked: 0,
        });
        self.assign();
        Ok(())
    }

    /// Removes a member: what it held is sent again (to whoever owns it
    /// now), or dead-lettered past the redelivery limit.
    pub fn leave(&mut self, id: u64, dead: &mut Vec<DeadLetter<T>>) {
        let Some(i) = self.members.iter().position(|m| m.id == id) else {
            return;
        };
        self.members.remove(i);
        let mut back = Vec::new();
        for (&p, part) in &self.parts {
            for (seq, s) in part.unacked.iter() {
                if s.member == id {
                    back.push((p, seq));
                }
            }
        }
        for (p, seq) in back {
            self.requeue(p, seq, dead);
        }
        self.assign();
    }

    /// An event read for the group (it passed the filters): it waits for
    /// a member. `seq` follows the partition's previous one.
    pub fn offer(&mut self, partition: u32, seq: u64, key: u32, item: T) {
        let part = self.parts.entry(partition).or_default();
        part.ready.insert(
            seq,
            Ready {
                key,
                redeliveries: 0,
                item,
            },
        );
        part.next = part.next.max(seq + 1);
    }

    /// Sequences up to `seq` of `partition` were read and need nothing
    /// (filtered out, or lost before the group read them).
    pub fn pass(&mut self, partition: u32, seq: u64) {
        let part = self.parts.entry(partition).or_default();
        part.next = part.next.max(seq + 1);
    }

    /// Events read and not yet sent.
    pub fn ready_len(&self) -> usize {
        self.parts.values().map(|p| p.ready.len()).sum()
    }

    /// Events sent and not yet acknowledged.
    pub fn unacked_len(&self) -> usize {
        self.parts.values().map(|p| p.unacked.len()).sum()
    }

    /// The partition's cursor: the first sequence not yet done (everything
    /// before it was acknowledged, filtered out or dead-lettered).
    pub fn cursor(&self, partition: u32) -> Option<u64> {
        let p = self.parts.get(&partition)?;
        let mut c = p.next;
        if let Some(s) = p.ready.first_seq() {
            c = c.min(s);
        }
        if let Some(s) = p.unacked.first_seq() {
            c = c.min(s);
        }
        Some(c)
    }

    /// Every partition's cursor.
    pub fn cursors(&self) -> Vec<(u32, u64)> {
        self.parts
            .keys()
            .filter_map(|&p| self.cursor(p).map(|c| (p, c)))
            .collect()
    }

    /// Sends what can be sent now, in sequence order per partition, at
    /// most `budget` events; `open(member)` says whether its queue has
    /// room. Deliveries are appended to `out`.
    pub fn dispatch(
        &mut self,
        now_ns: u64,
        budget: usize,
        mut open: impl FnMut(u64) -> bool,
        out: &mut Vec<Delivery<T>>,
    ) {
        if self.paused || self.members.is_empty() {
            return;
        }
        for m in &mut self.members {
            m.open = open(m.id);
            m.waiting = false;
        }
        // No more than the open members' credit: a round where members are
        // full costs nothing, whatever the backlog.
        let credit: usize = self
            .members
            .iter()
            .filter(|m| m.open)
            .map(|m| {
                if self.auto_ack {
                    budget
                } else {
                    m.window.saturating_sub(m.unacked) as usize
                }
            })
            .fold(0usize, usize::saturating_add);
        let mut left = budget.min(credit);
        if left == 0 {
            return;
        }
        let parts: Vec<u32> = self.parts.keys().copied().collect();
        let mut blocked: std::collections::HashSet<u32> = std::collections::HashSet::new();
        let mut scan: Vec<(u64, u32)> = Vec::new();
        for p in parts {
            if left == 0 {
                break;
            }
            blocked.clear();
            let Some(part) = self.parts.get(&p) else {
                continue;
            };
            // Shared sends the first events in order; the other types may
            // skip a blocked key's events to reach others behind them.
            let look = if self.kind == GroupType::Shared {
                left
            } else {
                left.saturating_mul(4).max(64)
            };
            scan.clear();
            scan.extend(part.ready.iter().take(look).map(|(s, r)| (s, r.key)));
            for &(seq, key) in &scan {
                if left == 0 {
                    break;
                }
                if key != NO_KEY && blocked.contains(&key) {
                    continue;
                }
                let Some(member) = self.target(p, key) else {
                    if key == NO_KEY {
                        // Shared: nobody has credit; later events neither.
                        break;
                    }
                    blocked.insert(key);
                    continue;
                };
                let Some(r) = self.parts.get_mut(&p).and_then(|x| x.ready.remove(seq)) else {
                    continue;
                };
                self.send(p, seq, r, member, now_ns, out);
                left -= 1;
            }
        }
    }

    /// The member the next event of `key` on `partition` may go to now.
    fn target(&mut self, partition: u32, key: u32) -> Option<u64> {
        let owner = match self.kind {
            GroupType::Shared => {
                let n = self.members.len();
                for k in 0..n {
                    let i = (self.rr + k) % n;
                    let m = &self.members[i];
                    if m.open && m.unacked < m.window {
                        self.rr = (i + 1) % n;
                        return Some(m.id);
                    }
                }
                return None;
            }
            GroupType::KeyShared => *self.owners.get(key as usize)?,
            GroupType::Exclusive | GroupType::Failover => *self.active.get(&partition)?,
        };
        let m = self.members.iter_mut().find(|m| m.id == owner)?;
        if !m.open || m.unacked >= m.window {
            return None;
        }
        if let Some(&(holder, n)) = self.holders.get(&key)
            && holder != owner
            && n > 0
        {
            // Draining: the previous owner still holds events of this key.
            m.waiting = true;
            return None;
        }
        Some(owner)
    }

    fn send(
        &mut self,
        partition: u32,
        seq: u64,
        r: Ready<T>,
        member: u64,
        now_ns: u64,
        out: &mut Vec<Delivery<T>>,
    ) {
        self.counters.delivered += 1;
        if r.redeliveries > 0 {
            self.counters.redelivered += 1;
        }
        out.push(Delivery {
            member,
            partition,
            seq,
            redeliveries: r.redeliveries,
            key: r.key,
            item: r.item,
        });
        let auto = self.auto_ack;
        if let Some(m) = self.members.iter_mut().find(|m| m.id == member) {
            m.delivered += 1;
            if !auto {
                m.unacked += 1;
            }
        }
        if auto {
            return;
        }
        if r.key != NO_KEY {
            let h = self.holders.entry(r.key).or_insert((member, 0));
            h.0 = member;
            h.1 += 1;
        }
        if let Some(part) = self.parts.get_mut(&partition) {
            part.unacked.insert(
                seq,
                Sent {
                    member,
                    at_ns: now_ns,
                    key: r.key,
                    redeliveries: r.redeliveries,
                    item: r.item,
                },
            );
        }
    }

    /// Takes `seq` of `partition` out of the unacked set (acknowledged,
    /// requeued or dead-lettered).
    fn take(&mut self, partition: u32, seq: u64) -> Option<Sent<T>> {
        self.take_held(partition, seq, None)
    }

    /// [`take`](Self::take), only if `member` (when given) holds it.
    fn take_held(&mut self, partition: u32, seq: u64, member: Option<u64>) -> Option<Sent<T>> {
        let s = self
            .parts
            .get_mut(&partition)?
            .unacked
            .remove_if(seq, |s| member.is_none_or(|m| s.member == m))?;
        if let Some(m) = self.members.iter_mut().find(|m| m.id == s.member) {
            m.unacked = m.unacked.saturating_sub(1);
        }
        if s.key != NO_KEY
            && let Some(h) = self.holders.get_mut(&s.key)
        {
            h.1 = h.1.saturating_sub(1);
            if h.1 == 0 {
                self.holders.remove(&s.key);
            }
        }
        Some(s)
    }

    fn requeue(&mut self, partition: u32, seq: u64, dead: &mut Vec<DeadLetter<T>>) {
        let Some(s) = self.take(partition, seq) else {
            return;
        };
        let deliveries = s.redeliveries + 1;
        if self.max_redeliveries > 0 && deliveries > self.max_redeliveries {
            self.counters.dead_lettered += 1;
            dead.push(DeadLetter {
                partition,
                seq,
                deliveries,
                item: s.item,
            });
            return;
        }
        if let Some(part) = self.parts.get_mut(&partition) {
            part.ready.insert(
                seq,
                Ready {
                    key: s.key,
                    redeliveries: deliveries,
                    item: s.item,
                },
            );
        }
    }

    /// A member acknowledges one event; false when it does not hold it
    /// (acknowledged before, or sent to it and since given to another).
    pub fn ack(&mut self, member: u64, partition: u32, seq: u64) -> bool {
        if self.take_held(partition, seq, Some(member)).is_none() {
            return false;
        }
        self.counters.acked += 1;
        if let Some(m) = self.members.iter_mut().find(|m| m.id == member) {
            m.acked += 1;
        }
        true
    }

    /// A member acknowledges everything it holds on `partition` up to and
    /// including `seq`; how many.
    pub fn ack_through(&mut self, member: u64, partition: u32, seq: u64) -> usize {
        let mine: Vec<u64> = self
            .parts
            .get(&partition)
            .map(|p| {
                p.unacked
                    .iter_through(seq)
                    .filter(|(_, s)| s.member == member)
                    .map(|(q, _)| q)
                    .collect()
            })
            .unwrap_or_default();
        for &q in &mine {
            self.ack(member, partition, q);
        }
        mine.len()
    }

    /// Handles acknowledgements that did not come in time. Shared: each
    /// such event is sent again (to any member). The other types keep
    /// order, so a member that holds an event longer than the ack timeout
    /// is removed (its id is appended to `removed`) and what it held is
    /// sent again in order.
    pub fn expire(&mut self, now_ns: u64, removed: &mut Vec<u64>, dead: &mut Vec<DeadLetter<T>>) {
        if self.auto_ack {
            return;
        }
        let timeouts: HashMap<u64, u64> = self
            .members
            .iter()
            .map(|m| {
                let t = if m.ack_timeout_ns > 0 {
                    m.ack_timeout_ns
                } else {
                    self.ack_timeout_ns
                };
                (m.id, t)
            })
            .collect();
        let late = |s: &Sent<T>| {
            let t = timeouts
                .get(&s.member)
                .copied()
                .unwrap_or(self.ack_timeout_ns);
            t > 0 && now_ns.saturating_sub(s.at_ns) >= t
        };
        let mut overdue: Vec<(u32, u64, u64)> = Vec::new();
        for (&p, part) in &self.parts {
            for (seq, s) in part.unacked.iter() {
                if late(s) {
                    overdue.push((p, seq, s.member));
                }
            }
        }
        if overdue.is_empty() {
            return;
        }
        if self.kind == GroupType::Shared {
            for (p, seq, _) in overdue {
                self.requeue(p, seq, dead);
            }
            return;
        }
        let mut gone: Vec<u64> = overdue.iter().map(|o| o.2).collect();
        gone.sort_unstable();
        gone.dedup();
        for id in gone {
            self.counters.timed_out += 1;
            self.leave(id, dead);
            removed.push(id);
        }
    }

    /// Recomputes who owns what after a change of members or partitions.
    fn assign(&mut self) {
        match self.kind {
            GroupType::Shared => {}
            GroupType::KeyShared => self.owners = ring_owners(&self.members),
            GroupType::Exclusive | GroupType::Failover => {
                self.active.clear();
                for &p in self.parts.keys() {
                    let members = self
                        .members
                        .iter()
                        .map(|m| (m.priority, m.name.as_str(), m.id));
                    if let Some(id) = tickwire_proto::group::failover_active(members, p) {
                        self.active.insert(p, id);
                    }
                }
            }
        }
    }

    /// Each member's figures.
    pub fn member_stats(&self) -> Vec<MemberStats> {
        self.members
            .iter()
            .map(|m| MemberStats {
                id: m.id,
                name: m.name.clone(),
                priority: m.priority,
                unacked: m.unacked,
                window: m.window,
                slots: self.owners.iter().filter(|&&o| o == m.id).count() as u32,
                partitions: {
                    let mut v: Vec<u32> = self
                        .active
                        .iter()
                        .filter(|&(_, &o)| o == m.id)
                        .map(|(&p, _)| p)
                        .collect();
                    v.sort_unstable();
                    v
                },
                draining: m.waiting,
                delivered: m.delivered,
                acked: m.acked,
            })
            .collect()
    }
}

/// Key_Shared: each slot's owner ([`tickwire_proto::group::slot_owners`]).
fn ring_owners(members: &[Member]) -> Vec<u64> {
    tickwire_proto::group::slot_owners(members.iter().map(|m| (m.name.as_str(), m.id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dispatch(c: &mut Core<u64>, now: u64) -> Vec<Delivery<u64>> {
        let mut out = Vec::new();
        c.dispatch(now, usize::MAX / 8, |_| true, &mut out);
        out
    }

    #[test]
    fn exclusive_refuses_a_second_consumer() {
        let mut c: Core<u64> = Core::new(GroupType::Exclusive, false, 0, 0);
        c.join(1, "a", 0, 10).expect("first");
        assert_eq!(c.join(2, "b", 0, 10), Err(JoinError::Exclusive("a".into())));
    }

    #[test]
    fn shared_spreads_by_credit_and_requeues_what_a_dead_member_held() {
        let mut c: Core<u64> = Core::new(GroupType::Shared, false, 1_000, 0);
        c.add_partition(0, 0);
        c.join(1, "a", 0, 2).expect("a");
        c.join(2, "b", 0, 2).expect("b");
        for s in 0..6 {
            c.offer(0, s, NO_KEY, s);
        }
        let d = dispatch(&mut c, 0);
        assert_eq!(d.len(), 4, "two each: the windows");
        assert_eq!(d.iter().filter(|x| x.member == 1).count(), 2);
        let mut dead = Vec::new();
        c.leave(1, &mut dead);
        assert_eq!(c.cursor(0), Some(0));
        // b is full; acking frees it, and a's two come back first.
        for x in d.iter().filter(|x| x.member == 2) {
            assert!(c.ack(2, 0, x.seq));
        }
        let d2 = dispatch(&mut c, 1);
        let mut got: Vec<(u64, u32)> = d2.iter().map(|x| (x.seq, x.redeliveries)).collect();
        got.sort_unstable();
        let a_had: Vec<(u64, u32)> = d
            .iter()
            .filter(|x| x.member == 1)
            .map(|x| (x.seq, 1))
            .collect();
        assert_eq!(got, a_had);
    }

    #[test]
    fn failover_gives_each_partition_one_active_member_by_priority() {
        let mut c: Core<u64> = Core::new(GroupType::Failover, false, 0, 0);
        c.add_partition(0, 0);
        c.add_partition(1, 0);
        c.join(1, "zz", 0, 10).expect("a");
        c.join(2, "aa", 5, 10).expect("b");
        let s = c.member_stats();
        assert_eq!(s[0].partitions, vec![0], "priority 0 first");
        assert_eq!(s[1].partitions, vec![1]);
        let mut dead = Vec::new();
        c.leave(1, &mut dead);
        assert_eq!(c.member_stats()[0].partitions, vec![0, 1]);
    }

    #[test]
    fn dead_letter_after_the_redelivery_limit() {
        let mut c: Core<u64> = Core::new(GroupType::Shared, false, 10, 2);
        c.add_partition(0, 5);
        c.join(1, "a", 0, 10).expect("a");
        c.offer(0, 5, NO_KEY, 7);
        let (mut removed, mut dead) = (Vec::new(), Vec::new());
        for round in 0..3u64 {
            let d = dispatch(&mut c, round * 100);
            assert_eq!(d.len(), 1, "round {round}");
            assert_eq!(d[0].redeliveries, round as u32);
            c.expire(round * 100 + 50, &mut removed, &mut dead);
        }
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].seq, dead[0].deliveries), (5, 3));
        assert_eq!(
            c.cursor(0),
            Some(6),
            "a dead letter no longer holds the cursor"
        );
        assert!(removed.is_empty(), "Shared redelivers, it does not remove");
    }

    #[test]
    fn a_key_shared_member_that_never_acks_is_removed_and_its_keys_move() {
        let mut c: Core<u64> = Core::new(GroupType::KeyShared, false, 100, 0);
        c.add_partition(0, 0);
        c.join(1, "a", 0, 100).expect("a");
        for s in 0..50 {
            c.offer(0, s, (s % 5) as u32 * 13_000, s);
        }
        assert_eq!(dispatch(&mut c, 0).len(), 50);
        c.join(2, "b", 0, 100).expect("b");
        let (mut removed, mut dead) = (Vec::new(), Vec::new());
        c.expire(200, &mut removed, &mut dead);
        assert_eq!(removed, vec![1]);
        let d = dispatch(&mut c, 300);
        assert_eq!(d.len(), 50);
        assert!(d.iter().all(|x| x.member == 2 && x.redeliveries == 1));
        assert!(d.windows(2).all(|w| w[0].seq < w[1].seq), "in order");
    }

    #[test]
    fn consistent_hashing_moves_few_slots() {
        let mk = |names: &[&str]| {
            let ms: Vec<Member> = names
                .iter()
                .enumerate()
                .map(|(i, n)| Member {
                    id: i as u64 + 1,
                    name: n.to_string(),
                    priority: 0,
                    window: 1,
                    ack_timeout_ns: 0,
                    unacked: 0,
                    open: true,
                    waiting: false,
                    delivered: 0,
                    acked: 0,
                })
                .collect();
            ring_owners(&ms)
        };
        let four = mk(&["a", "b", "c", "d"]);
        let five = mk(&["a", "b", "c", "d", "e"]);
        let moved = four.iter().zip(&five).filter(|(x, y)| x != y).count();
        assert!(moved < SLOTS / 3, "{moved} of {SLOTS} slots moved");
        assert!(
            five.iter().zip(&four).all(|(n, o)| n == o || *n == 5),
            "only to the newcomer"
        );
        for id in 1..=4u64 {
            let n = four.iter().filter(|&&o| o == id).count();
            assert!(n > SLOTS / 10, "member {id} owns {n} slots");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Join(u8),
        Leave(u8),
        Offer(u8),
        Dispatch,
        Ack(u8, u8),
        Expire,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => (0u8..6).prop_map(Op::Join),
            1 => (0u8..6).prop_map(Op::Leave),
            6 => (0u8..8).prop_map(Op::Offer),
            4 => Just(Op::Dispatch),
            6 => (0u8..6, any::<u8>()).prop_map(|(m, k)| Op::Ack(m, k)),
            1 => Just(Op::Expire),
        ]
    }

    proptest! {
        /// The drain hand-off, checked against a plain record of what each
        /// member holds: a key is never sent to a member while another
        /// holds an unacknowledged event of it; a first delivery never
        /// overtakes an earlier event of its key; and once members ack
        /// everything, every event offered was acknowledged exactly once
        /// or dead-lettered.
        #[test]
        fn key_shared_never_gives_a_key_to_two_members(ops in proptest::collection::vec(op(), 1..300), kind in 0u8..3) {
            let kind = [GroupType::KeyShared, GroupType::Failover, GroupType::Shared][kind as usize];
            let mut c: Core<u64> = Core::new(kind, false, 1_000, 3);
            for p in 0..2 {
                c.add_partition(p, 0);
            }
            let mut next = [0u64; 2];
            // (partition, seq) -> key
            let mut keys: HashMap<(u32, u64), u32> = HashMap::new();
            // member -> held (partition, seq)
            let mut held: HashMap<u64, Vec<(u32, u64)>> = HashMap::new();
            let mut first_sent: std::collections::HashSet<(u32, u64)> = Default::default();
            let mut acked: std::collections::HashSet<(u32, u64)> = Default::default();
            let mut dead_all: Vec<(u32, u64)> = Vec::new();
            let mut now = 0u64;
            let mut members: Vec<u64> = Vec::new();
            let check = |d: &[Delivery<u64>], held: &mut HashMap<u64, Vec<(u32, u64)>>, keys: &HashMap<(u32, u64), u32>, first_sent: &mut std::collections::HashSet<(u32, u64)>| -> Result<(), TestCaseError> {
                for x in d {
                    let k = keys[&(x.partition, x.seq)];
                    if kind != GroupType::Shared {
                        for (m, h) in held.iter() {
                            if *m != x.member {
                                prop_assert!(!h.iter().any(|e| keys[e] == k),
                                    "key {} sent to {} while {} holds it", k, x.member, m);
                            }
                        }
                        if x.redeliveries == 0 {
                            let earlier = keys.iter().filter(|&(&(p, s), &kk)| kk == k && p == x.partition && s < x.seq).map(|(e, _)| *e);
                            for e in earlier {
                                prop_assert!(first_sent.contains(&e), "{:?} overtook {:?}", (x.partition, x.seq), e);
                            }
                        }
                    }
                    first_sent.insert((x.partition, x.seq));
                    held.entry(x.member).or_default().push((x.partition, x.seq));
                }
                Ok(())
            };
            for o in ops {
                now += 10;
                match o {
                    Op::Join(m) => {
                        let id = m as u64 + 1;
                        if !members.contains(&id) {
                            c.join(id, &format!("m{m}"), (m % 2) as i32, 4).expect("join");
                            members.push(id);
                        }
                    }
                    Op::Leave(m) => {
                        let id = m as u64 + 1;
                        let mut dead = Vec::new();
                        c.leave(id, &mut dead);
                        dead_all.extend(dead.iter().map(|d| (d.partition, d.seq)));
                        members.retain(|&x| x != id);
                        held.remove(&id);
                        for d in dead { for h in held.values_mut() { h.retain(|e| *e != (d.partition, d.seq)); } }
                    }
                    Op::Offer(k) => {
                        let p = (k % 2) as u32;
                        let seq = next[p as usize];
                        next[p as usize] += 1;
                        let key = c.key_of(p, k as u16 * 9_000);
                        keys.insert((p, seq), key);
                        c.offer(p, seq, key, seq);
                    }
                    Op::Dispatch => {
                        let d = dispatch(&mut c, now);
                        check(&d, &mut held, &keys, &mut first_sent)?;
                    }
                    Op::Ack(m, i) => {
                        let id = m as u64 + 1;
                        if let Some(h) = held.get_mut(&id) && !h.is_empty() {
                            let e = h.remove(i as usize % h.len());
                            prop_assert!(c.ack(id, e.0, e.1), "ack of held {:?}", e);
                            prop_assert!(acked.insert(e), "{:?} acknowledged twice", e);
                        }
                    }
                    Op::Expire => {
                        now += 2_000;
                        let (mut removed, mut dead) = (Vec::new(), Vec::new());
                        c.expire(now, &mut removed, &mut dead);
                        for id in removed { held.remove(&id); members.retain(|&x| x != id); }
                        if kind == GroupType::Shared {
                            // Everything overdue went back.
                            held.clear();
                        }
                        dead_all.extend(dead.iter().map(|d| (d.partition, d.seq)));
                    }
                }
            }
            // Drain: one member that acknowledges everything.
            if members.is_empty() {
                c.join(99, "last", 0, 4).expect("join");
                members.push(99);
            }
            let mut rounds = 0;
            while c.ready_len() + c.unacked_len() > 0 {
                rounds += 1;
                prop_assert!(rounds < 10_000, "stuck: {} ready, {} unacked", c.ready_len(), c.unacked_len());
                now += 10;
                let d = dispatch(&mut c, now);
                check(&d, &mut held, &keys, &mut first_sent)?;
                let ids: Vec<u64> = held.keys().copied().collect();
                for id in ids {
                    for e in held.remove(&id).unwrap_or_default() {
                        if c.ack(id, e.0, e.1) {
                            prop_assert!(acked.insert(e), "{:?} acknowledged twice", e);
                        }
                    }
                }
                if d.is_empty() {
                    // Someone holds events but is not in `held`: time it out.
                    now += 2_000;
                    let (mut removed, mut dead) = (Vec::new(), Vec::new());
                    c.expire(now, &mut removed, &mut dead);
                    dead_all.extend(dead.iter().map(|d| (d.partition, d.seq)));
                    if members.iter().all(|m| removed.contains(m)) || c.member_count() == 0 {
                        c.join(100 + rounds as u64, &format!("r{rounds}"), 0, 4).expect("join");
                        members = vec![100 + rounds as u64];
                    }
                }
            }
            for e in keys.keys() {
                let n = acked.contains(e) as usize + dead_all.contains(e) as usize;
                prop_assert_eq!(n, 1, "{:?} acked {} dead {}", e, acked.contains(e), dead_all.contains(e));
            }
            for p in 0..2u32 {
                prop_assert_eq!(c.cursor(p), Some(next[p as usize]));
            }
        }
    }
}

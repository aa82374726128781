//! The control protocol between a group member and the broker: JSON lines
//! over the node's Unix socket (`<node dir>/control.sock`). Nothing here
//! is on the per-event path: members exchange a few messages per
//! rebalance; events come from the rings.
//!
//! A member joins ([`ToBroker::Join`]) with the reader slots it holds;
//! the broker welcomes or refuses it, then runs a rebalance: every member
//! is paused ([`ToMember::Pause`]) and answers with where it stands
//! ([`ToBroker::Paused`]); the broker picks each partition's *switch*
//! sequence (at or past every member's position) and sends each member
//! its [`Assignment`]: a [`Selector`] for the events from the switch on,
//! ranges to read again for members that went away ([`Adopt`]), and keys
//! to hold until their previous owner has acknowledged them (a drain,
//! ended by [`ToMember::Release`]). The member answers
//! [`ToBroker::Applied`]. Whenever the broker writes to a member, it bumps
//! the member's signal word (its reader slot's `selector`), which the
//! member checks once per poll.

use serde::{Deserialize, Serialize};

/// A member's message to the broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToBroker {
    /// Join a group (the first message on a connection).
    Join(Box<Join>),
    /// Paused for a rebalance: the next sequence the member reads live,
    /// per partition.
    Paused {
        /// The rebalance.
        version: u64,
        /// (partition, next sequence).
        positions: Vec<(u32, u64)>,
    },
    /// The assignment of `version` is in force; the member's acknowledged
    /// cursors in its reader slots now account for it.
    Applied {
        /// The rebalance.
        version: u64,
    },
    /// The member's own counts (the broker sees cursors, not single
    /// deliveries and acknowledgements), sent when they change, at most
    /// every 100 ms, for the subscription's stats.
    Counts {
        /// Events delivered to the application, first and repeated.
        delivered: u64,
        /// Of those, redeliveries.
        redelivered: u64,
        /// Acknowledged.
        acked: u64,
        /// Delivered and not yet acknowledged, now.
        unacked: u64,
    },
}

/// What a joining member asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Join {
    /// Topic.
    pub topic: String,
    /// Subscription name.
    pub subscription: String,
    /// `exclusive`, `failover`, `shared` or `key_shared`.
    pub kind: String,
    /// Consumer name (Failover orders by priority, then name).
    pub consumer: String,
    /// Failover priority: lower is preferred.
    pub priority: i32,
    /// A member that holds an event unacknowledged longer is removed.
    pub ack_timeout_ms: u64,
    /// Deliveries after the first before an event is dead-lettered.
    pub max_redeliveries: Option<u32>,
    /// Where a new group starts (a group with stored cursors resumes).
    pub start: StartSpec,
    /// The events the group wants.
    pub filter: FilterSpec,
    /// The member's reader slots, one per partition: its liveness.
    pub readers: Vec<ReaderRef>,
    /// The next sequence it reads live, per partition.
    pub positions: Vec<(u32, u64)>,
    /// Process id (for messages only: liveness is the reader slot's lock).
    pub pid: u32,
}

/// A start position, as [`crate::Start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartSpec {
    /// Only what comes next.
    Latest,
    /// The oldest event kept (journal, else ring).
    Earliest,
    /// The oldest event in each ring.
    RingEarliest,
    /// This sequence on every partition.
    Sequence(u64),
    /// The first event at or after this UTC time (ns).
    Time(u64),
}

impl From<crate::Start> for StartSpec {
    fn from(s: crate::Start) -> StartSpec {
        match s {
            crate::Start::Latest => StartSpec::Latest,
            crate::Start::Earliest => StartSpec::Earliest,
            crate::Start::RingEarliest => StartSpec::RingEarliest,
            crate::Start::Sequence(n) => StartSpec::Sequence(n),
            crate::Start::Time(t) => StartSpec::Time(t),
        }
    }
}

impl From<StartSpec> for crate::Start {
    fn from(s: StartSpec) -> crate::Start {
        match s {
            StartSpec::Latest => crate::Start::Latest,
            StartSpec::Earliest => crate::Start::Earliest,
            StartSpec::RingEarliest => crate::Start::RingEarliest,
            StartSpec::Sequence(n) => crate::Start::Sequence(n),
            StartSpec::Time(t) => crate::Start::Time(t),
        }
    }
}

/// A [`crate::Filter`] on the wire (kinds by name).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FilterSpec {
    /// Symbols.
    pub symbols: Vec<String>,
    /// Exchanges.
    pub exchanges: Vec<String>,
    /// Currencies.
    pub currencies: Vec<String>,
    /// `trade`, `quote`.
    pub kinds: Vec<String>,
    /// Lowest price.
    pub min_price: Option<f64>,
    /// Highest price.
    pub max_price: Option<f64>,
    /// Smallest size.
    pub min_volume: Option<u64>,
}

impl From<&crate::Filter> for FilterSpec {
    fn from(f: &crate::Filter) -> FilterSpec {
        FilterSpec {
            symbols: f.symbols.clone(),
            exchanges: f.exchanges.clone(),
            currencies: f.currencies.clone(),
            kinds: f.kinds.iter().map(|k| k.name().to_string()).collect(),
            min_price: f.min_price,
            max_price: f.max_price,
            min_volume: f.min_volume,
        }
    }
}

impl FilterSpec {
    /// The filter, or the name of a kind this version does not know.
    pub fn filter(&self) -> Result<crate::Filter, String> {
        let kinds = self
            .kinds
            .iter()
            .map(|k| crate::Kind::parse(k).ok_or_else(|| format!("unknown data type {k:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::Filter {
            symbols: self.symbols.clone(),
            exchanges: self.exchanges.clone(),
            currencies: self.currencies.clone(),
            kinds,
            min_price: self.min_price,
            max_price: self.max_price,
            min_volume: self.min_volume,
        })
    }
}

/// A reader slot a member holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderRef {
    /// Partition.
    pub partition: u32,
    /// Slot index in the partition's reader-state file.
    pub index: u32,
    /// The slot's generation when the member took it.
    pub generation: u32,
}

/// The broker's message to a member.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToMember {
    /// Joined, as this member id.
    Welcome {
        /// Member id.
        member: u64,
    },
    /// Not joined, and why.
    Refused {
        /// Why.
        message: String,
    },
    /// Stop delivering and say where you stand.
    Pause {
        /// The rebalance.
        version: u64,
    },
    /// The new assignment; deliver again.
    Assign {
        /// The rebalance.
        version: u64,
        /// Per partition.
        parts: Vec<Assignment>,
    },
    /// The previous owners of a hold of `version` on `partition` have
    /// acknowledged what they held: deliver those keys.
    Release {
        /// The rebalance that set the hold.
        version: u64,
        /// Partition.
        partition: u32,
    },
    /// Removed from the group (it redelivers what this member held).
    Removed {
        /// Why.
        reason: String,
    },
}

/// A member's assignment on one partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    /// Partition.
    pub partition: u32,
    /// From this sequence on, `selector` says what is the member's;
    /// before it, its previous selector still does.
    pub switch: u64,
    /// What is the member's from the switch on.
    pub selector: Selector,
    /// Events at or after the switch that match this wait for a
    /// [`ToMember::Release`]: their keys' previous owner may still hold
    /// some unacknowledged.
    pub hold: Option<Selector>,
    /// Ranges to read again, before anything at or after the switch.
    pub adopt: Vec<Adopt>,
}

/// A range a member reads again: events of `from..to` matching `selector`
/// are its own now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Adopt {
    /// First sequence.
    pub from: u64,
    /// One past the last.
    pub to: u64,
    /// Which events of the range.
    pub selector: Selector,
    /// Deliveries of these events before (0: never delivered).
    pub redeliveries: u32,
}

/// Consecutive sequences a Shared stripe deals to one member at a time:
/// 256 frames (16 KiB of ring or journal), so a member reads its own runs
/// and passes over the others' unread.
pub const STRIPE_BLOCK: u64 = 256;

/// Which events of a partition are a member's: by sequence (Shared
/// stripes) or by the instrument's Key_Shared slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Selector {
    /// Every event.
    All,
    /// None.
    Nothing,
    /// Sequence `s` with `(s / STRIPE_BLOCK) % of == index` (Shared):
    /// blocks of [`STRIPE_BLOCK`] consecutive events, dealt round the
    /// members, so a member passes over the others' blocks unread.
    Stripe {
        /// This member's stripe.
        index: u32,
        /// Stripes.
        of: u32,
    },
    /// Instruments whose slot is in the set (Key_Shared).
    Slots {
        /// The slots.
        slots: SlotSet,
    },
    /// Every one of these.
    And {
        /// The parts.
        all: Vec<Selector>,
    },
}

impl Selector {
    /// Whether the event at `seq` with Key_Shared slot `slot` is selected.
    #[inline]
    pub fn matches(&self, seq: u64, slot: u16) -> bool {
        match self {
            Selector::All => true,
            Selector::Nothing => false,
            Selector::Stripe { index, of } => {
                *of != 0 && (seq / STRIPE_BLOCK) % u64::from(*of) == u64::from(*index)
            }
            Selector::Slots { slots } => slots.contains(slot),
            Selector::And { all } => all.iter().all(|s| s.matches(seq, slot)),
        }
    }

    /// The next run of sequences that may match, at or after `seq`:
    /// `(start, end)`, nothing in `seq..start` matches, and each of
    /// `start..end` may (a Key_Shared slot is known only once the event is
    /// read, so its runs end at `u64::MAX`). `None` when nothing from `seq`
    /// on can match. A reader passes over `seq..start` unread and asks
    /// again at `end`.
    pub fn next_run(&self, seq: u64) -> Option<(u64, u64)> {
        match self {
            Selector::All => Some((seq, u64::MAX)),
            Selector::Nothing => None,
            Selector::Stripe { index, of } => {
                let (index, of) = (u64::from(*index), u64::from(*of));
                if of == 0 || index >= of {
                    return None;
                }
                let block = seq / STRIPE_BLOCK;
                let ahead = (index + of - block % of) % of;
                let start = if ahead == 0 {
                    seq
                } else {
                    (block + ahead).saturating_mul(STRIPE_BLOCK)
                };
                Some((
                    start,
                    (start / STRIPE_BLOCK + 1).saturating_mul(STRIPE_BLOCK),
                ))
            }
            Selector::Slots { slots } => (!slots.is_empty()).then_some((seq, u64::MAX)),
            // Each part's start bounds the whole's; where the runs do not
            // overlap, one event is read and the question asked again.
            Selector::And { all } => {
                let (start, end) = all.iter().try_fold((seq, u64::MAX), |(s, e), sel| {
                    sel.next_run(seq).map(|(a, b)| (s.max(a), e.min(b)))
                })?;
                Some((start, end.max(start.saturating_add(1))))
            }
        }
    }

    /// Whether matching needs the event's slot (else any slot will do).
    pub fn needs_slot(&self) -> bool {
        match self {
            Selector::Slots { .. } => true,
            Selector::And { all } => all.iter().any(Selector::needs_slot),
            _ => false,
        }
    }

    /// The slots an event it selects may have: `None` when any slot may
    /// (it selects by sequence, or everything). What a reader may pass
    /// over by instrument before looking at an event's sequence.
    pub fn slot_cover(&self) -> Option<SlotSet> {
        match self {
            Selector::All | Selector::Stripe { .. } => None,
            Selector::Nothing => Some(SlotSet::default()),
            Selector::Slots { slots } => Some(slots.clone()),
            Selector::And { all } => all
                .iter()
                .filter_map(Selector::slot_cover)
                .reduce(|a, b| a.and(&b)),
        }
    }

    /// Whether nothing can match.
    pub fn is_nothing(&self) -> bool {
        match self {
            Selector::Nothing => true,
            Selector::Slots { slots } => slots.is_empty(),
            Selector::Stripe { of, .. } => *of == 0,
            Selector::And { all } => all.iter().any(Selector::is_nothing),
            Selector::All => false,
        }
    }

    /// Either, when it can be said exactly in one selector (all, slot sets,
    /// the same stripe); `None` otherwise.
    pub fn or(&self, other: &Selector) -> Option<Selector> {
        match (self, other) {
            (Selector::All, _) | (_, Selector::All) => Some(Selector::All),
            (Selector::Nothing, o) | (o, Selector::Nothing) => Some(o.clone()),
            (Selector::Slots { slots: a }, Selector::Slots { slots: b }) => {
                Some(Selector::Slots { slots: a.or(b) })
            }
            (a, b) if a == b => Some(a.clone()),
            _ => None,
        }
    }

    /// Both: simplified where the two are of one kind.
    pub fn and(&self, other: &Selector) -> Selector {
        match (self, other) {
            (Selector::All, o) | (o, Selector::All) => o.clone(),
            (Selector::Nothing, _) | (_, Selector::Nothing) => Selector::Nothing,
            (Selector::Slots { slots: a }, Selector::Slots { slots: b }) => {
                let s = a.and(b);
                if s.is_empty() {
                    Selector::Nothing
                } else {
                    Selector::Slots { slots: s }
                }
            }
            (Selector::Stripe { index: i, of: n }, Selector::Stripe { index: j, of: m })
                if n == m =>
            {
                if i == j {
                    self.clone()
                } else {
                    Selector::Nothing
                }
            }
            (a, b) => {
                let mut all = Vec::new();
                for s in [a, b] {
                    match s {
                        Selector::And { all: inner } => all.extend(inner.iter().cloned()),
                        s => all.push(s.clone()),
                    }
                }
                Selector::And { all }
            }
        }
    }
}

/// A set of Key_Shared slots (65,536 bits), as runs on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct SlotSet(Box<[u64; 1024]>);

impl Default for SlotSet {
    fn default() -> Self {
        SlotSet(Box::new([0; 1024]))
    }
}

impl std::fmt::Debug for SlotSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotSet({} slots)", self.len())
    }
}

impl SlotSet {
    /// Adds a slot.
    pub fn insert(&mut self, slot: u16) {
        self.0[slot as usize >> 6] |= 1 << (slot & 63);
    }
    /// Whether the slot is in.
    #[inline]
    pub fn contains(&self, slot: u16) -> bool {
        self.0[slot as usize >> 6] & (1 << (slot & 63)) != 0
    }
    /// Slots in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }
    /// Both.
    pub fn and(&self, o: &SlotSet) -> SlotSet {
        let mut s = SlotSet::default();
        for (i, w) in s.0.iter_mut().enumerate() {
            *w = self.0[i] & o.0[i];
        }
        s
    }
    /// Either.
    pub fn or(&self, o: &SlotSet) -> SlotSet {
        let mut s = SlotSet::default();
        for (i, w) in s.0.iter_mut().enumerate() {
            *w = self.0[i] | o.0[i];
        }
        s
    }
    /// In `self`, not in `o`.
    pub fn minus(&self, o: &SlotSet) -> SlotSet {
        let mut s = SlotSet::default();
        for (i, w) in s.0.iter_mut().enumerate() {
            *w = self.0[i] & !o.0[i];
        }
        s
    }
}

/// On the wire: the set as ascending `[first, end)` runs of slots (a
/// consistent-hashing share is a few hundred runs, not 65,536 bits).
impl Serialize for SlotSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        let mut open: Option<u32> = None;
        for (i, &w) in self.0.iter().enumerate() {
            let base = (i as u32) * 64;
            match w {
                0 => {
                    if let Some(start) = open.take() {
                        runs.push((start, base));
                    }
                }
                u64::MAX => {
                    open.get_or_insert(base);
                }
                _ => {
                    for b in 0..64u32 {
                        let set = w & (1 << b) != 0;
                        match (set, open) {
                            (true, None) => open = Some(base + b),
                            (false, Some(start)) => {
                                runs.push((start, base + b));
                                open = None;
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        if let Some(start) = open {
            runs.push((start, 65_536));
        }
        runs.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SlotSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let runs = Vec::<(u32, u32)>::deserialize(d)?;
        let mut set = SlotSet::default();
        for (start, end) in runs {
            if start >= end || end > 65_536 {
                return Err(serde::de::Error::custom(format!(
                    "slot run [{start}, {end}) is not within [0, 65536)"
                )));
            }
            for slot in start..end {
                set.insert(slot as u16);
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_intersect_and_travel() {
        let mut a = SlotSet::default();
        a.insert(7);
        a.insert(65_535);
        let mut b = SlotSet::default();
        b.insert(7);
        let sa = Selector::Slots { slots: a.clone() };
        let sb = Selector::Slots { slots: b };
        let both = sa.and(&sb);
        assert!(both.matches(0, 7) && !both.matches(0, 65_535));
        let stripe = Selector::Stripe { index: 1, of: 4 };
        let mixed = stripe.and(&sa);
        let (own, other) = (STRIPE_BLOCK + 5, 2 * STRIPE_BLOCK + 5);
        assert!(mixed.matches(own, 7) && !mixed.matches(other, 7) && !mixed.matches(own, 8));
        assert_eq!(
            Selector::Stripe { index: 1, of: 4 }.and(&Selector::Stripe { index: 2, of: 4 }),
            Selector::Nothing
        );
        let text = serde_json::to_string(&mixed).expect("encodes");
        let back: Selector = serde_json::from_str(&text).expect("decodes");
        assert_eq!(back, mixed);
        assert!(serde_json::from_str::<SlotSet>("[[5, 70000]]").is_err());
        let runs = serde_json::to_string(&a).expect("encodes");
        assert_eq!(runs, "[[7,8],[65535,65536]]");
        assert_eq!(a.minus(&a).len(), 0);
    }

    /// An event outside a selector's slot cover is never selected, at any
    /// sequence: a reader may pass it over by its instrument alone.
    #[test]
    fn a_slot_cover_holds_every_slot_a_selector_can_select() {
        let mut a = SlotSet::default();
        a.insert(3);
        a.insert(9);
        let mut b = SlotSet::default();
        b.insert(9);
        b.insert(11);
        let selectors = [
            Selector::All,
            Selector::Nothing,
            Selector::Stripe { index: 1, of: 2 },
            Selector::Slots { slots: a.clone() },
            Selector::Stripe { index: 1, of: 2 }.and(&Selector::Slots { slots: a.clone() }),
            Selector::And {
                all: vec![
                    Selector::Slots { slots: a.clone() },
                    Selector::Slots { slots: b.clone() },
                ],
            },
        ];
        for sel in &selectors {
            let cover = sel.slot_cover();
            for slot in 0..16u16 {
                for seq in [0, 1, STRIPE_BLOCK, 3 * STRIPE_BLOCK + 1] {
                    if sel.matches(seq, slot) {
                        assert!(
                            cover.as_ref().is_none_or(|c| c.contains(slot)),
                            "{sel:?} selects slot {slot} at {seq}, outside its cover"
                        );
                    }
                }
            }
        }
        // Exact where it can be: the slots themselves, and their overlap.
        assert_eq!(selectors[3].slot_cover(), Some(a.clone()));
        assert_eq!(selectors[4].slot_cover(), Some(a.clone()));
        assert_eq!(selectors[5].slot_cover(), Some(a.and(&b)));
        assert_eq!(selectors[0].slot_cover(), None);
        assert_eq!(selectors[2].slot_cover(), None);
    }

    /// `next_run` never passes over a sequence `matches` selects, and its
    /// runs are exact where the selector does not need the slot.
    #[test]
    fn next_run_passes_over_only_what_cannot_match() {
        let mut slots = SlotSet::default();
        slots.insert(3);
        let selectors = [
            Selector::All,
            Selector::Nothing,
            Selector::Stripe { index: 0, of: 1 },
            Selector::Stripe { index: 2, of: 3 },
            Selector::Stripe { index: 3, of: 4 },
            Selector::Stripe { index: 4, of: 4 },
            Selector::Slots {
                slots: slots.clone(),
            },
            Selector::Slots {
                slots: SlotSet::default(),
            },
            Selector::Stripe { index: 1, of: 2 }.and(&Selector::Slots { slots }),
        ];
        let end = 20 * STRIPE_BLOCK;
        for sel in &selectors {
            // The first match at or after each sequence, from the end back.
            let mut first = vec![None; end as usize + 1];
            for s in (0..end).rev() {
                first[s as usize] = if sel.matches(s, 3) {
                    Some(s)
                } else {
                    first[s as usize + 1]
                };
            }
            for seq in 0..end {
                let run = sel.next_run(seq);
                match (run, first[seq as usize]) {
                    (None, Some(f)) => panic!("{sel:?} from {seq}: None, but {f} matches"),
                    (Some((start, stop)), f) => {
                        assert!(
                            start >= seq && stop > start,
                            "{sel:?} from {seq}: {start}..{stop}"
                        );
                        if let Some(f) = f {
                            assert!(start <= f, "{sel:?} from {seq}: {start} passes over {f}");
                        }
                        if !sel.needs_slot() {
                            match f {
                                Some(f) => assert_eq!(start, f, "{sel:?} from {seq}"),
                                None => assert!(start >= end, "{sel:?} from {seq}: {start}"),
                            }
                            let exact = (start..stop.min(end)).all(|s| sel.matches(s, 3));
                            assert!(exact, "{sel:?} from {seq}: {start}..{stop} holds a miss");
                        }
                    }
                    (None, None) => {}
                }
            }
        }
    }
}

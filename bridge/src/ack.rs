//! Which Pulsar acknowledgements may go out, given which messages are
//! committed.
//!
//! Pulsar acknowledges *entries* (ledger, entry): a producer's batch is one
//! entry holding many messages, and an acknowledgement without a batch-index
//! ack set (pulsar-rs sends none) covers the whole entry. So an entry is
//! acknowledged only once every message in it is complete (committed, or
//! dead-lettered); acknowledging it on its first message would lose the rest
//! of the batch in a crash.
//!
//! - [`AckMode::Cumulative`] (Failover, Exclusive: Pulsar delivers each
//!   topic partition in order): one cumulative acknowledgement per topic
//!   partition, at the last entry of the contiguous complete prefix.
//! - [`AckMode::Individual`] (Shared, Key_Shared: cumulative acks are not
//!   allowed): one acknowledgement per complete entry.
//!
//! Plain data, no I/O: the bridge loop feeds it and sends what it returns.

use std::collections::{HashMap, VecDeque};

use pulsar::message::proto::MessageIdData;

/// How acknowledgements are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckMode {
    /// Cumulative, at the contiguous complete watermark per topic partition.
    Cumulative,
    /// One per complete entry.
    Individual,
}

/// Where a received message is tracked; handed back to [`AckTracker::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    generation: u32,
    topic: u32,
    entry: u64,
}

/// An acknowledgement to send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ack {
    /// Topic partition name, as the consumer reported it.
    pub topic: String,
    /// Entry id (batch index cleared: the whole entry).
    pub id: MessageIdData,
    /// Cumulative (this entry and everything before it) or this entry only.
    pub cumulative: bool,
    /// Messages this acknowledgement newly covers.
    pub messages: u64,
}

#[derive(Debug)]
struct Entry {
    id: MessageIdData,
    /// Messages in the entry (1, or the batch's size).
    expected: u32,
    received: u32,
    done: u32,
    acked: bool,
}

impl Entry {
    fn complete(&self) -> bool {
        self.done >= self.expected
    }
}

#[derive(Debug)]
struct TopicTrack {
    name: String,
    /// Entry number of `entries[0]`.
    base: u64,
    entries: VecDeque<Entry>,
    dirty: bool,
}

/// Received, not yet acknowledged messages, per topic partition.
#[derive(Debug)]
pub(crate) struct AckTracker {
    mode: AckMode,
    /// Bumped by [`clear`](AckTracker::clear): older slots are ignored.
    generation: u32,
    topics: Vec<TopicTrack>,
    by_name: HashMap<String, u32>,
    /// Individual mode: complete entries to acknowledge.
    ready: Vec<(u32, u64)>,
    /// Batches cut short (fewer messages arrived than the entry declared).
    pub short_batches: u64,
}

impl AckTracker {
    pub(crate) fn new(mode: AckMode) -> AckTracker {
        AckTracker {
            mode,
            generation: 0,
            topics: Vec::new(),
            by_name: HashMap::new(),
            ready: Vec::new(),
            short_batches: 0,
        }
    }

    /// Records a received message; `in_batch` is the entry's
    /// `num_messages_in_batch` (None for an unbatched message).
    pub(crate) fn received(
        &mut self,
        topic: &str,
        id: &MessageIdData,
        in_batch: Option<i32>,
    ) -> Slot {
        let t = match self.by_name.get(topic) {
            Some(&t) => t,
            None => {
                let t = self.topics.len() as u32;
                self.topics.push(TopicTrack {
                    name: topic.to_string(),
                    base: 0,
                    entries: VecDeque::new(),
                    dirty: false,
                });
                self.by_name.insert(topic.to_string(), t);
                t
            }
        };
        let track = &mut self.topics[t as usize];
        if let Some(last) = track.entries.back_mut() {
            let same = last.id.ledger_id == id.ledger_id && last.id.entry_id == id.entry_id;
            if same && last.received < last.expected {
                last.received += 1;
                return Slot {
                    generation: self.generation,
                    topic: t,
                    entry: track.base + track.entries.len() as u64 - 1,
                };
            }
            if last.received < last.expected {
                // The rest of that batch will not come in this delivery
                // (the client dropped what it could not parse): complete
                // with what arrived, or the watermark would stop here.
                self.short_batches += 1;
                tracing::warn!(
                    ledger = last.id.ledger_id,
                    entry = last.id.entry_id,
                    declared = last.expected,
                    arrived = last.received,
                    "a batch ended short; acknowledging the messages that arrived"
                );
                last.expected = last.received;
                if last.complete() && !last.acked {
                    track.dirty = true;
                    let n = track.base + track.entries.len() as u64 - 1;
                    if self.mode == AckMode::Individual {
                        self.ready.push((t, n));
                    }
                }
            }
        }
        track.entries.push_back(Entry {
            id: MessageIdData {
                batch_index: None,
                batch_size: None,
                ack_set: Vec::new(),
                ..id.clone()
            },
            expected: in_batch.map_or(1, |n| n.max(1) as u32),
            received: 1,
            done: 0,
            acked: false,
        });
        Slot {
            generation: self.generation,
            topic: t,
            entry: track.base + track.entries.len() as u64 - 1,
        }
    }

    /// Marks one message of a slot complete (committed or dead-lettered).
    pub(crate) fn complete(&mut self, slot: Slot) {
        if slot.generation != self.generation {
            return;
        }
        let Some(track) = self.topics.get_mut(slot.topic as usize) else {
            return;
        };
        let Some(e) = slot
            .entry
            .checked_sub(track.base)
            .and_then(|i| track.entries.get_mut(i as usize))
        else {
            return;
        };
        e.done += 1;
        if e.complete() && !e.acked {
            track.dirty = true;
            if self.mode == AckMode::Individual {
                self.ready.push((slot.topic, slot.entry));
            }
        }
    }

    /// The acknowledgements that may go out now; forgets what they cover.
    pub(crate) fn take_acks(&mut self, out: &mut Vec<Ack>) {
        if self.mode == AckMode::Individual {
            for (t, n) in self.ready.drain(..) {
                let track = &mut self.topics[t as usize];
                if let Some(e) = n
                    .checked_sub(track.base)
                    .and_then(|i| track.entries.get_mut(i as usize))
                    && !e.acked
                {
                    e.acked = true;
                    out.push(Ack {
                        topic: track.name.clone(),
                        id: e.id.clone(),
                        cumulative: false,
                        messages: u64::from(e.done),
                    });
                }
            }
        }
        for track in self.topics.iter_mut().filter(|t| t.dirty) {
            track.dirty = false;
            let mut last = None;
            let mut messages = 0;
            while track
                .entries
                .front()
                .is_some_and(|e| e.complete() && e.received >= e.expected)
            {
                let Some(e) = track.entries.pop_front() else {
                    break;
                };
                track.base += 1;
                if !e.acked {
                    messages += u64::from(e.done);
                }
                last = Some(e.id);
            }
            if self.mode == AckMode::Cumulative
                && let Some(id) = last
            {
                out.push(Ack {
                    topic: track.name.clone(),
                    id,
                    cumulative: true,
                    messages,
                });
            }
        }
    }

    /// Messages received and not yet acknowledged.
    #[cfg(test)]
    pub(crate) fn unacked(&self) -> usize {
        self.topics
            .iter()
            .flat_map(|t| t.entries.iter())
            .filter(|e| !e.acked)
            .map(|e| e.received as usize)
            .sum()
    }

    /// Forgets everything (the consumer was recreated: Pulsar redelivers).
    pub(crate) fn clear(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.topics.clear();
        self.by_name.clear();
        self.ready.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(entry: u64, batch_index: Option<i32>) -> MessageIdData {
        MessageIdData {
            ledger_id: 7,
            entry_id: entry,
            batch_index,
            ..MessageIdData::default()
        }
    }

    fn acks(t: &mut AckTracker) -> Vec<(String, u64, bool, u64)> {
        let mut out = Vec::new();
        t.take_acks(&mut out);
        out.into_iter()
            .map(|a| (a.topic, a.id.entry_id, a.cumulative, a.messages))
            .collect()
    }

    #[test]
    fn cumulative_waits_for_the_contiguous_prefix() {
        let mut t = AckTracker::new(AckMode::Cumulative);
        let s: Vec<Slot> = (0..4)
            .map(|e| t.received("a", &id(e, None), None))
            .collect();
        t.complete(s[1]);
        t.complete(s[2]);
        assert!(acks(&mut t).is_empty(), "entry 0 is not committed yet");
        t.complete(s[0]);
        assert_eq!(acks(&mut t), vec![("a".into(), 2, true, 3)]);
        t.complete(s[3]);
        assert_eq!(acks(&mut t), vec![("a".into(), 3, true, 1)]);
        assert_eq!(t.unacked(), 0);
    }

    #[test]
    fn a_batch_is_acknowledged_only_when_all_its_messages_are_complete() {
        for mode in [AckMode::Cumulative, AckMode::Individual] {
            let mut t = AckTracker::new(mode);
            let s: Vec<Slot> = (0..3)
                .map(|i| t.received("a", &id(5, Some(i)), Some(3)))
                .collect();
            t.complete(s[0]);
            t.complete(s[2]);
            assert!(
                acks(&mut t).is_empty(),
                "{mode:?}: batch index 1 is not committed"
            );
            t.complete(s[1]);
            let got = acks(&mut t);
            assert_eq!(got.len(), 1, "{mode:?}");
            assert_eq!(got[0].1, 5);
            assert_eq!(got[0].2, mode == AckMode::Cumulative);
            assert_eq!(got[0].3, 3);
            assert!(acks(&mut t).is_empty(), "{mode:?}: acknowledged once");
        }
    }

    #[test]
    fn individual_acks_complete_entries_out_of_order() {
        let mut t = AckTracker::new(AckMode::Individual);
        let s: Vec<Slot> = (0..3)
            .map(|e| t.received("a", &id(e, None), None))
            .collect();
        t.complete(s[2]);
        assert_eq!(acks(&mut t), vec![("a".into(), 2, false, 1)]);
        t.complete(s[0]);
        t.complete(s[1]);
        let mut got = acks(&mut t);
        got.sort();
        assert_eq!(
            got,
            vec![("a".into(), 0, false, 1), ("a".into(), 1, false, 1)]
        );
        assert_eq!(t.unacked(), 0);
    }

    #[test]
    fn topics_are_tracked_apart() {
        let mut t = AckTracker::new(AckMode::Cumulative);
        let a = t.received("a-partition-0", &id(1, None), None);
        let b = t.received("a-partition-1", &id(1, None), None);
        let a2 = t.received("a-partition-0", &id(2, None), None);
        t.complete(b);
        t.complete(a2);
        assert_eq!(acks(&mut t), vec![("a-partition-1".into(), 1, true, 1)]);
        t.complete(a);
        assert_eq!(acks(&mut t), vec![("a-partition-0".into(), 2, true, 2)]);
    }

    #[test]
    fn a_short_batch_does_not_stop_the_watermark() {
        let mut t = AckTracker::new(AckMode::Cumulative);
        let s0 = t.received("a", &id(1, Some(0)), Some(3));
        let s1 = t.received("a", &id(2, None), None);
        assert_eq!(t.short_batches, 1);
        t.complete(s0);
        t.complete(s1);
        assert_eq!(acks(&mut t), vec![("a".into(), 2, true, 2)]);
    }

    #[test]
    fn stale_slots_after_clear_are_ignored() {
        let mut t = AckTracker::new(AckMode::Cumulative);
        let s = t.received("a", &id(1, None), None);
        t.clear();
        let fresh = t.received("a", &id(1, None), None);
        t.complete(s);
        assert!(
            acks(&mut t).is_empty(),
            "a slot from before the clear completed nothing"
        );
        t.complete(fresh);
        assert_eq!(acks(&mut t), vec![("a".into(), 1, true, 1)]);
    }
}

//! A map from sequence number to value for a group's events of one
//! partition, built for the way they come and go: added at the back in
//! sequence order (a redelivery goes back in near the front), taken mostly
//! from the front, a few at a time from just behind it (acknowledgements
//! interleaved between members).
//!
//! A `BTreeMap` did the same with four tree operations per event, and
//! taking its first key shifts the rest of a leaf: with 88-byte values
//! that `memmove` alone was 13% of a group thread draining a backlog.
//! Here the entries sit in one sorted `VecDeque`; taking one leaves a hole
//! that is dropped once it reaches either end, and the holes are swept
//! out when they outnumber the entries, so memory stays proportional to
//! what the map holds.

use std::collections::VecDeque;

/// Sorted `(seq, value)` entries with holes; see the module docs.
#[derive(Debug, Clone)]
pub struct SeqMap<V> {
    slots: VecDeque<(u64, Option<V>)>,
    len: usize,
}

impl<V> Default for SeqMap<V> {
    fn default() -> Self {
        SeqMap {
            slots: VecDeque::new(),
            len: 0,
        }
    }
}

impl<V> SeqMap<V> {
    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    fn index(&self, seq: u64) -> Result<usize, usize> {
        match (self.slots.front(), self.slots.back()) {
            (_, Some(&(last, _))) if last < seq => Err(self.slots.len()),
            (Some(&(first, _)), _) if first == seq => Ok(0),
            (None, _) => Err(0),
            _ => {
                let i = self.slots.partition_point(|&(s, _)| s < seq);
                if self.slots.get(i).is_some_and(|&(s, _)| s == seq) {
                    Ok(i)
                } else {
                    Err(i)
                }
            }
        }
    }

    /// Puts `v` at `seq`; the value it replaces, if any.
    pub fn insert(&mut self, seq: u64, v: V) -> Option<V> {
        match self.index(seq) {
            Ok(i) => {
                let old = self.slots[i].1.replace(v);
                if old.is_none() {
                    self.len += 1;
                }
                old
            }
            Err(i) => {
                if i == self.slots.len() {
                    self.slots.push_back((seq, Some(v)));
                } else {
                    self.slots.insert(i, (seq, Some(v)));
                }
                self.len += 1;
                None
            }
        }
    }

    /// Takes the value at `seq` out.
    pub fn remove(&mut self, seq: u64) -> Option<V> {
        self.remove_if(seq, |_| true)
    }

    /// Takes the value at `seq` out if `pred` holds for it.
    pub fn remove_if(&mut self, seq: u64, pred: impl FnOnce(&V) -> bool) -> Option<V> {
        let i = self.index(seq).ok()?;
        if !self.slots[i].1.as_ref().is_some_and(pred) {
            return None;
        }
        let v = self.slots[i].1.take()?;
        self.len -= 1;
        while self.slots.front().is_some_and(|e| e.1.is_none()) {
            self.slots.pop_front();
        }
        while self.slots.back().is_some_and(|e| e.1.is_none()) {
            self.slots.pop_back();
        }
        // Holes in the middle: swept when they outnumber the entries.
        if self.slots.len() > 2 * self.len + 64 {
            self.slots.retain(|e| e.1.is_some());
        }
        Some(v)
    }

    /// The first sequence held. The front is never a hole.
    pub fn first_seq(&self) -> Option<u64> {
        self.slots.front().map(|e| e.0)
    }

    /// Entries in sequence order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        self.slots
            .iter()
            .filter_map(|(s, v)| v.as_ref().map(|v| (*s, v)))
    }

    /// Entries at or before `seq`, in sequence order.
    pub fn iter_through(&self, seq: u64) -> impl Iterator<Item = (u64, &V)> {
        self.iter().take_while(move |&(s, _)| s <= seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Any sequence of inserts and removes leaves it holding exactly what
    /// a BTreeMap holds, in the same order, with its memory bounded.
    #[test]
    fn it_holds_what_a_btreemap_holds_whatever_the_order_of_changes() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut ours: SeqMap<u64> = SeqMap::default();
        let mut theirs: BTreeMap<u64, u64> = BTreeMap::new();
        let mut back = 0u64;
        for step in 0..200_000u64 {
            let r = next();
            match r % 10 {
                // New events at the back.
                0..=3 => {
                    back += 1 + r % 3;
                    assert_eq!(ours.insert(back, step), theirs.insert(back, step));
                }
                // Requeued near the front, or replaced.
                4 => {
                    let seq = back.saturating_sub(r % 5000);
                    assert_eq!(ours.insert(seq, step), theirs.insert(seq, step));
                }
                // Taken from the front, or from anywhere.
                5..=6 => {
                    if let Some((&s, _)) = theirs.first_key_value() {
                        assert_eq!(ours.first_seq(), Some(s));
                        assert_eq!(ours.remove(s), theirs.remove(&s));
                    }
                }
                _ => {
                    let seq = back.saturating_sub(r % 3000);
                    if r % 20 == 7 {
                        // Only when its value is odd.
                        let odd = theirs.get(&seq).is_some_and(|v| v % 2 == 1);
                        let want = if odd { theirs.remove(&seq) } else { None };
                        assert_eq!(ours.remove_if(seq, |v| v % 2 == 1), want);
                    } else {
                        assert_eq!(ours.remove(seq), theirs.remove(&seq));
                    }
                }
            }
            assert_eq!(ours.len(), theirs.len());
            assert!(ours.slots.len() <= 2 * ours.len() + 64 + 1);
            if step % 10_000 == 0 {
                let a: Vec<(u64, u64)> = ours.iter().map(|(s, v)| (s, *v)).collect();
                let b: Vec<(u64, u64)> = theirs.iter().map(|(s, v)| (*s, *v)).collect();
                assert_eq!(a, b);
                let cut = back.saturating_sub(1000);
                let a: Vec<u64> = ours.iter_through(cut).map(|(s, _)| s).collect();
                let b: Vec<u64> = theirs.range(..=cut).map(|(s, _)| *s).collect();
                assert_eq!(a, b);
            }
        }
        assert!(ours.len() > 1000, "the test kept something to compare");
    }
}

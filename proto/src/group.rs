//! Rules every subscription group follows, remote or over shared memory:
//! which Key_Shared slot an instrument hashes to, which member owns a slot
//! (consistent hashing), and which member is active for a partition under
//! Failover. One definition, so a key lands on the same slot whoever
//! computes it.

/// Key_Shared hash slots.
pub const SLOTS: usize = 65_536;

/// Points each member puts on the consistent-hashing ring.
pub const POINTS: u32 = 128;

/// FNV-1a, then SplitMix64's finaliser: FNV alone spreads short names
/// that differ in one byte ("a#1", "a#2") poorly over the high bits.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut z = crate::layout::fnv1a(crate::layout::FNV_OFFSET, bytes);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The Key_Shared slot of an instrument: the top 16 bits of a hash of
/// `symbol.exchange`. The same on every node and across restarts
/// (instrument ids are not).
pub fn slot_of(symbol: &str, exchange: &str) -> u16 {
    let mut key = Vec::with_capacity(symbol.len() + exchange.len() + 1);
    key.extend_from_slice(symbol.as_bytes());
    key.push(b'.');
    key.extend_from_slice(exchange.as_bytes());
    (hash(&key) >> 48) as u16
}

/// The slot of an instrument the symbology table does not name (yet):
/// keyed by its id, so its events still keep one owner and their order.
pub fn slot_of_unnamed(id: u32) -> u16 {
    (id as u16) ^ ((id >> 16) as u16)
}

/// Each slot's owner by consistent hashing: every member (`(name, id)`)
/// puts [`POINTS`] points on a ring of 2^32 (hashes of its name), and a
/// slot belongs to the first point at or after it. A member that joins or
/// leaves moves only the slots next to its own points. Empty for no
/// members.
pub fn slot_owners<'a>(members: impl IntoIterator<Item = (&'a str, u64)>) -> Vec<u64> {
    let mut points: Vec<(u32, u64)> = Vec::new();
    for (name, id) in members {
        for i in 0..POINTS {
            let h = hash(format!("{name}#{i}").as_bytes());
            points.push(((h >> 32) as u32, id));
        }
    }
    if points.is_empty() {
        return Vec::new();
    }
    points.sort_unstable();
    let mut owners = vec![0u64; SLOTS];
    let mut j = 0;
    for (s, o) in owners.iter_mut().enumerate() {
        let pos = (s as u32) << 16;
        while j < points.len() && points[j].0 < pos {
            j += 1;
        }
        *o = points.get(j).unwrap_or(&points[0]).1;
    }
    owners
}

/// Failover: the member active for `partition`, Pulsar's rule: members
/// ordered by (priority, name, id), partition p to the (p mod n)-th.
/// `None` for no members.
pub fn failover_active<'a>(
    members: impl IntoIterator<Item = (i32, &'a str, u64)>,
    partition: u32,
) -> Option<u64> {
    let mut order: Vec<(i32, &str, u64)> = members.into_iter().collect();
    if order.is_empty() {
        return None;
    }
    order.sort_unstable();
    Some(order[partition as usize % order.len()].2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_stable_and_spread() {
        assert_eq!(slot_of("AAPL", "NASDAQ"), slot_of("AAPL", "NASDAQ"));
        assert_ne!(slot_of("AAPL", "NASDAQ"), slot_of("AAPL", "NYSE"));
        let owners = slot_owners([("a", 1), ("b", 2), ("c", 3), ("d", 4)]);
        for id in 1..=4u64 {
            let n = owners.iter().filter(|&&o| o == id).count();
            assert!(n > SLOTS / 8 && n < SLOTS / 2, "member {id} owns {n} slots");
        }
    }

    #[test]
    fn failover_orders_by_priority_then_name() {
        let m = [(1, "a", 1), (0, "z", 2), (0, "b", 3)];
        assert_eq!(failover_active(m, 0), Some(3));
        assert_eq!(failover_active(m, 1), Some(2));
        assert_eq!(failover_active(m, 2), Some(1));
        assert_eq!(failover_active([], 0), None);
    }
}

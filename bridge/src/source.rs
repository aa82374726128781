//! Who produced a message and its sequence there: the dedup key every
//! frame carries as `source_id` and `source_seq`.

/// A stable 32-bit id for a producer on one topic partition. A producer's
/// sequence ids are per partition (a partitioned producer numbers each
/// partition from 0), so the partition is part of the source:
/// (`source_id`, [`source_seq`]) is the dedup key.
///
/// Exactly: `h` = FNV-1a 64 (offset basis `0xcbf29ce484222325`, prime
/// `0x100000001b3`) over the producer name's UTF-8 bytes, one zero byte,
/// then the full topic partition name as the consumer reports it (e.g.
/// `persistent://public/default/md-partition-2`); `source_id = (h ^ (h >> 32))
/// as u32`. The synthetic feed's id is built the same way over
/// `tickwire-synthetic/<node id>` (see the broker's `synthetic::source_id`).
pub fn source_id(producer: &str, topic: &str) -> u32 {
    use tickwire_proto::layout::{FNV_OFFSET, fnv1a};
    let h = fnv1a(
        fnv1a(fnv1a(FNV_OFFSET, producer.as_bytes()), &[0]),
        topic.as_bytes(),
    );
    (h ^ (h >> 32)) as u32
}

/// The sequence of one message at its producer, unique per message and the
/// same on every redelivery (the dedup key with [`source_id`]):
///
/// - not batched: the producer's sequence id;
/// - batched by a client that numbers every message (Java, C++, Go: the
///   entry's `highest_sequence_id` is `sequence_id + n - 1`):
///   `sequence_id + batch_index`, the message's own sequence id;
/// - batched by a client that numbers batches (pulsar-rs):
///   `sequence_id << 16 | batch_index`.
pub fn source_seq(meta: &pulsar::message::proto::MessageMetadata, batch_index: Option<i32>) -> u64 {
    let (Some(n), Some(i)) = (meta.num_messages_in_batch, batch_index) else {
        return meta.sequence_id;
    };
    let i = i.max(0) as u64;
    let per_message =
        n > 1 && meta.highest_sequence_id == Some(meta.sequence_id.saturating_add(n as u64 - 1));
    if per_message {
        meta.sequence_id.saturating_add(i)
    } else {
        meta.sequence_id << 16 | (i & 0xffff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulsar::message::proto::MessageMetadata;

    fn meta(seq: u64, n: Option<i32>, highest: Option<u64>) -> MessageMetadata {
        MessageMetadata {
            sequence_id: seq,
            num_messages_in_batch: n,
            highest_sequence_id: highest,
            ..MessageMetadata::default()
        }
    }

    #[test]
    fn source_sequences_are_unique_per_message_whatever_the_producer_batching() {
        // Not batched.
        assert_eq!(source_seq(&meta(41, None, None), None), 41);
        // Java-style batch: ids 100..=149 in one entry.
        let java = meta(100, Some(50), Some(149));
        assert_eq!(source_seq(&java, Some(0)), 100);
        assert_eq!(source_seq(&java, Some(49)), 149);
        // pulsar-rs-style: one id per batch; batches 5 and 6 never collide.
        let a: Vec<u64> = (0..50)
            .map(|i| source_seq(&meta(5, Some(50), None), Some(i)))
            .collect();
        let b: Vec<u64> = (0..50)
            .map(|i| source_seq(&meta(6, Some(50), None), Some(i)))
            .collect();
        let all: std::collections::HashSet<u64> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), 100);
        assert_eq!(a[3], 5 << 16 | 3);
    }
}

//! `tickwire consume`: a remote consumer of a subscription group over
//! gRPC (`ConsumeMarketData`), printing one JSON line per event and
//! acknowledging what it printed. It is also the reference for a remote
//! client's effectively-once logic: at-least-once delivery plus dropping
//! duplicates by message id (a redelivery from the same node) and by
//! source id + source sequence (the same event through another node after
//! a failover, where sequences differ).

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::time::Duration;

use tickwire_proto::pb;

/// What to consume and how.
#[derive(Debug, Clone)]
pub struct ConsumeSpec {
    /// `http://host:port` of the edge's gRPC listener.
    pub connect: String,
    /// API key, if the edge asks for one.
    pub api_key: Option<String>,
    /// The subscription request.
    pub request: pb::StreamRequest,
    /// Drop duplicates (effectively-once).
    pub dedup: bool,
    /// Acknowledge what was printed (off: a consumer that never acks).
    pub ack: bool,
    /// Cumulative acks (Exclusive, Failover).
    pub cumulative: bool,
    /// Stop after this many events (0: never).
    pub count: u64,
}

/// What a consumer saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Events printed.
    pub events: u64,
    /// Events that were redeliveries.
    pub redelivered: u64,
    /// Duplicates dropped (effectively-once).
    pub duplicates: u64,
    /// Gap notices.
    pub gaps: u64,
}

/// Remembers the last `cap` keys seen.
#[derive(Debug)]
pub struct Seen<K> {
    set: HashSet<K>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: std::hash::Hash + Eq + Copy> Seen<K> {
    /// Keeps at most `cap` keys.
    pub fn new(cap: usize) -> Self {
        Seen {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// True the first time `k` is seen (within the last `cap`).
    pub fn first(&mut self, k: K) -> bool {
        if !self.set.insert(k) {
            return false;
        }
        self.order.push_back(k);
        if self.order.len() > self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// The effectively-once filter: a message is new when neither its id nor
/// its source identity was seen.
#[derive(Debug)]
pub struct Dedup {
    ids: Seen<(u32, u64)>,
    sources: Seen<(u32, u64)>,
}

impl Dedup {
    /// Remembers the last `cap` of each.
    pub fn new(cap: usize) -> Dedup {
        Dedup {
            ids: Seen::new(cap),
            sources: Seen::new(cap),
        }
    }

    /// Whether the message is new. Source sequence 0 means the source
    /// numbers nothing: only the message id counts then.
    pub fn is_new(&mut self, partition: u32, seq: u64, source_id: u32, source_seq: u64) -> bool {
        let id_new = self.ids.first((partition, seq));
        let source_new = source_seq == 0 || self.sources.first((source_id, source_seq));
        id_new && source_new
    }
}

/// Runs until the stream ends, `count` events were printed, or Ctrl-C.
///
/// # Errors
/// Cannot connect; the edge refused the subscription or ended the stream
/// with an error (the status message says why).
pub async fn run(spec: ConsumeSpec, out: &mut impl Write) -> Result<Summary, String> {
    let channel = tonic::transport::Endpoint::from_shared(spec.connect.clone())
        .map_err(|e| format!("--connect {:?}: {e}", spec.connect))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", spec.connect))?;
    let mut client = pb::market_data_stream_client::MarketDataStreamClient::new(channel)
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ConsumeRequest>(64);
    tx.send(pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Subscribe(spec.request.clone())),
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(k) = &spec.api_key {
        let v = format!("Bearer {k}")
            .parse()
            .map_err(|_| "--api-key: not a valid header value".to_string())?;
        req.metadata_mut().insert("authorization", v);
    }
    let mut stream = client
        .consume_market_data(req)
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let mut sum = Summary::default();
    let mut dedup = Dedup::new(1 << 20);
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = tokio::signal::ctrl_c() => return Ok(sum),
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(sum),
            Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
        };
        let Some(kind) = msg.kind else { continue };
        match kind {
            pb::stream_response::Kind::Batch(b) => {
                let mut acks = Vec::with_capacity(b.messages.len());
                for m in &b.messages {
                    let Some(meta) = &m.metadata else { continue };
                    acks.push(pb::MessageId {
                        partition: meta.partition,
                        epoch: meta.epoch,
                        sequence: meta.sequence,
                    });
                    if meta.redelivery_count > 0 {
                        sum.redelivered += 1;
                    }
                    if spec.dedup
                        && !dedup.is_new(
                            meta.partition,
                            meta.sequence,
                            meta.source_id,
                            meta.source_seq,
                        )
                    {
                        sum.duplicates += 1;
                        continue;
                    }
                    let d = m.data.clone().unwrap_or_default();
                    let line = serde_json::json!({
                        "partition": meta.partition,
                        "sequence": meta.sequence,
                        "message_id": meta.message_id,
                        "event_id": m.event_id,
                        "symbol": d.symbol,
                        "exchange": d.exchange,
                        "kind": d.kind,
                        "redelivery_count": meta.redelivery_count,
                    });
                    if writeln!(out, "{line}").is_err() {
                        // The reader went away: stop without acking what
                        // it did not get.
                        return Ok(sum);
                    }
                    sum.events += 1;
                    if spec.count > 0 && sum.events >= spec.count {
                        break;
                    }
                }
                let _ = out.flush();
                if spec.ack && !acks.is_empty() {
                    if spec.cumulative {
                        // The highest of each partition.
                        acks.sort_by_key(|m| (m.partition, std::cmp::Reverse(m.sequence)));
                        acks.dedup_by_key(|m| m.partition);
                    }
                    let ack = pb::ConsumeRequest {
                        kind: Some(pb::consume_request::Kind::Ack(pb::AckRequest {
                            message_ids: acks,
                            cumulative: spec.cumulative,
                        })),
                    };
                    if tx.send(ack).await.is_err() {
                        return Err("the edge stopped reading acknowledgements".into());
                    }
                }
                if spec.count > 0 && sum.events >= spec.count {
                    // Let the last acks go out before the stream closes.
                    drop(tx);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return Ok(sum);
                }
            }
            pb::stream_response::Kind::Gap(g) => {
                sum.gaps += 1;
                let line = serde_json::json!({"gap": {"partition": g.partition, "from": g.from_sequence, "to": g.to_sequence, "reason": g.reason}});
                let _ = writeln!(out, "{line}");
            }
            pb::stream_response::Kind::End(e) => {
                return Err(format!("the stream ended: {}", e.reason));
            }
            _ => {}
        }
    }
}

/// A member of a subscription group over shared memory.
#[derive(Debug, Clone)]
pub struct ShmConsumeSpec {
    /// Node directory.
    pub node_dir: std::path::PathBuf,
    /// Topic.
    pub topic: String,
    /// Subscription name.
    pub subscription: String,
    /// Type.
    pub kind: shm_client::group::SubscriptionType,
    /// Consumer name (empty: host and pid).
    pub consumer: String,
    /// Failover priority.
    pub priority: i32,
    /// Ack timeout.
    pub ack_timeout: Duration,
    /// Dead-letter after this many redeliveries (0: never).
    pub max_redeliveries: u32,
    /// Where a new group starts.
    pub start: shm_client::Start,
    /// Which events.
    pub filter: shm_client::Filter,
    /// Drop duplicates (effectively-once).
    pub dedup: bool,
    /// Acknowledge what was printed.
    pub ack: bool,
    /// Stop after this many events (0: never).
    pub count: u64,
}

/// Runs a shared-memory group member until `count` events were printed,
/// `stop` fires, or the broker removes it; the same JSON lines as the
/// remote consumer. Acknowledges what it printed after each poll (each
/// event; cumulatively for Exclusive and Failover).
///
/// # Errors
/// The member could not join (the message says why) or was removed.
pub fn run_shm(
    spec: ShmConsumeSpec,
    stop: &tokio_util::sync::CancellationToken,
    out: &mut impl Write,
) -> Result<Summary, String> {
    use shm_client::Event;
    let mut b = shm_client::Subscriber::builder(spec.topic.clone())
        .node_dir(&spec.node_dir)
        .start(spec.start)
        .filter(spec.filter.clone())
        .subscription(spec.subscription.clone(), spec.kind)
        .priority(spec.priority)
        .ack_timeout(spec.ack_timeout);
    if !spec.consumer.is_empty() {
        b = b.consumer_name(spec.consumer.clone());
    }
    if spec.max_redeliveries > 0 {
        b = b.max_redeliveries(spec.max_redeliveries);
    }
    let mut member = b.open().map_err(|e| e.to_string())?;
    let mut sum = Summary::default();
    let mut dedup = Dedup::new(1 << 20);
    let mut acks: Vec<(u32, u64)> = Vec::with_capacity(256);
    let mut broken = false;
    while !stop.is_cancelled() {
        acks.clear();
        let want = if spec.count > 0 {
            (spec.count - sum.events).min(256) as usize
        } else {
            256
        };
        let n = member.poll(want, |e| match e {
            Event::Tick(t) => {
                acks.push((t.partition, t.seq));
                if broken {
                    return;
                }
                if t.redeliveries > 0 {
                    sum.redelivered += 1;
                }
                let b = t.body;
                if spec.dedup && !dedup.is_new(t.partition, t.seq, b.source_id(), b.source_seq()) {
                    sum.duplicates += 1;
                    return;
                }
                let inst = t.instrument();
                let line = serde_json::json!({
                    "partition": t.partition,
                    "sequence": t.seq,
                    "event_id": format!("{:08x}-{}", b.source_id(), b.source_seq()),
                    "symbol": inst.map(|e| e.symbol()),
                    "exchange": inst.map(|e| e.exchange()),
                    "kind": t.kind().map(|k| k.name()),
                    "redelivery_count": t.redeliveries,
                });
                if writeln!(out, "{line}").is_err() {
                    broken = true;
                    return;
                }
                sum.events += 1;
            }
            Event::Gap {
                partition,
                from,
                to,
            } => {
                sum.gaps += 1;
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::json!({"gap": {"partition": partition, "from": from, "to": to}})
                );
            }
            _ => {}
        });
        if broken {
            // The reader went away: what it did not get stays unacked.
            return Ok(sum);
        }
        if n > 0 && out.flush().is_err() {
            return Ok(sum);
        }
        if spec.ack && !broken {
            if spec.kind.cumulative() {
                acks.sort_unstable_by_key(|&(p, s)| (p, std::cmp::Reverse(s)));
                acks.dedup_by_key(|a| a.0);
                for &(p, s) in &acks {
                    member.ack_cumulative(p, s).map_err(|e| e.to_string())?;
                }
            } else {
                for &(p, s) in &acks {
                    member.ack(p, s).map_err(|e| e.to_string())?;
                }
            }
        }
        if let Some(r) = member.removed() {
            return Err(r.to_string());
        }
        if spec.count > 0 && sum.events >= spec.count {
            break;
        }
        if n == 0 {
            member.wait_for_data(Duration::from_millis(10));
        }
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_drops_a_redelivery_and_the_same_source_event_through_another_node() {
        let mut d = Dedup::new(4);
        assert!(d.is_new(0, 10, 7, 100));
        assert!(!d.is_new(0, 10, 7, 100), "redelivered: same id");
        assert!(!d.is_new(3, 55, 7, 100), "another node: same source event");
        assert!(d.is_new(0, 11, 0, 0), "no source sequence: by id only");
        assert!(d.is_new(0, 12, 0, 0));
        for s in 20..30 {
            assert!(d.is_new(0, s, 9, s));
        }
        assert!(d.is_new(0, 10, 7, 100), "forgotten past the window");
    }
}

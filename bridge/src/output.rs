//! The spec's `market_data_distributed` events, built for sampled committed
//! messages and published in batches to the output topic.

use std::time::Duration;

use pulsar::message::proto::MessageIdData;
use pulsar::{Pulsar, TokioExecutor};

use crate::Committed;

/// `ledger:entry:batch_index` (-1 when not batched), as Pulsar's tools print it.
pub(crate) fn pulsar_id(id: &MessageIdData) -> String {
    format!(
        "{}:{}:{}",
        id.ledger_id,
        id.entry_id,
        id.batch_index.unwrap_or(-1)
    )
}

fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_nanos(std::time::UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// The spec's `market_data_distributed` event for one committed message.
pub(crate) fn distributed_event(
    node: &str,
    target: &str,
    workflows: &[String],
    s: &crate::acker::Sampled,
    routing_key: &str,
    c: &Committed,
) -> Vec<u8> {
    let e = &s.event;
    let now = tickwire_proto::futex::realtime_ns();
    let price = tickwire_proto::frame::price_to_f64(e.px_a);
    let volume = e.size_a as f64 / 10f64.powi(e.instrument.size_decimals as i32);
    let v = serde_json::json!({
        "event_type": "market_data_distributed",
        "event_id": format!("{node}/{target}/{}/{}/{}", c.partition, c.epoch, c.seq),
        "timestamp": rfc3339(now),
        "distribution": {
            "topic": target,
            "partition": c.partition,
            "offset": c.seq,
            "epoch": c.epoch,
            "message_id": format!("{target}/{}/{}/{}", c.partition, c.epoch, c.seq),
            "subscribers_notified": c.readers,
            "distribution_latency_ms": now.saturating_sub(e.ts_event) / 1_000_000,
        },
        "data": {
            "symbol": e.instrument.symbol,
            "exchange": e.instrument.exchange,
            "currency": e.instrument.currency,
            "kind": e.kind.name(),
            "timestamp": rfc3339(e.ts_event),
            "price": price,
            "volume": volume,
        },
        "routing": {
            "routing_key": routing_key,
            "target_workflows": workflows,
            "delivery_guarantees": "at_least_once",
        },
        "source": {
            "topic": s.topic,
            "message_id": pulsar_id(&s.id),
        },
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Events waiting for the output producer; when full, events are dropped
/// (and counted) rather than slowing ingest.
pub(crate) const OUTPUT_QUEUE: usize = 8192;

/// Publishes `market_data_distributed` events in batches.
pub(crate) async fn output_task(
    pulsar: Pulsar<TokioExecutor>,
    topic: String,
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
) {
    let opts = pulsar::ProducerOptions {
        batch_size: Some(512),
        batch_byte_size: Some(512 * 1024),
        batch_timeout: Some(Duration::from_millis(20)),
        block_queue_if_full: true,
        ..pulsar::ProducerOptions::default()
    };
    let mut producer = match pulsar
        .producer()
        .with_topic(&topic)
        .with_options(opts)
        .build()
        .await
    {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, topic = %topic, "cannot create the market_data_distributed producer; events are dropped");
            while rx.recv().await.is_some() {}
            return;
        }
    };
    let mut receipts = Vec::new();
    while let Some(body) = rx.recv().await {
        match producer.send_non_blocking(body).await {
            Ok(r) => receipts.push(r),
            Err(e) => tracing::warn!(error = %e, "market_data_distributed send failed"),
        }
        if receipts.len() >= 512 || rx.is_empty() {
            let _ = producer.send_batch().await;
            for r in receipts.drain(..) {
                let _ = r.await;
            }
        }
    }
    let _ = producer.send_batch().await;
}

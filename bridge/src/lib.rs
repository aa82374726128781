//! Apache Pulsar in: consumes normalized market data from Pulsar topics,
//! hands each message to a [`Sink`] (the broker's ingest, through a trait so
//! this crate does not depend on the broker), and acknowledges a message to
//! Pulsar only once the sink reports it committed. A crash loses nothing:
//! what was not acknowledged is redelivered. Payloads that fail validation
//! go to a dead-letter topic with the reason, are counted, and never stop
//! the bridge.
//!
//! ```text
//!  Pulsar consumer ──> parse + validate ──ok──> Sink::try_send(event, token) ──> rings
//!        ^                    │                          │ Backpressure: stop pulling, drain, retry
//!        │ ack(id)            └─bad──> dead-letter topic (reason, detail) ──> ack
//!        └──────────── Sink::drain(token) <── commit completions
//! ```
//!
//! Bounded everywhere: the consumer's receiver queue, and the tokens in
//! flight (the sink refuses more than its completion queue holds).

mod ack;
mod acker;
pub mod config;
mod connect;
mod output;
pub mod payload;
pub mod sink;
pub mod source;
pub mod stats;

/// The Pulsar client this crate is built on (for tests and tools that produce).
pub use pulsar;
/// The shutdown signal [`run`] takes.
pub use tokio_util::sync::CancellationToken;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;

pub use config::{BridgeConfig, ConfigError, InitialPosition, SubscriptionType};
pub use payload::{Format, Limits, MarketEvent, Reject};
pub use sink::{Committed, Sink, SinkError};
pub use source::{source_id, source_seq};
pub use stats::BridgeStats;

/// Errors that stop the bridge: only a bad configuration (Pulsar being
/// unreachable is retried until shutdown).
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Pulsar client error.
    #[error("pulsar: {0}")]
    Pulsar(#[from] pulsar::Error),
}

/// Runs the bridge until `cancel` fires (which ends any connection retry at
/// once). Acknowledges each message once the
/// sink committed it; sends bad payloads to the dead-letter topic; emits
/// sampled `market_data_distributed` events to the output topic.
///
/// # Errors
/// [`BridgeError`] when it cannot start (bad config, Pulsar unreachable).
pub async fn run<S: Sink>(
    cfg: BridgeConfig,
    mut sink: S,
    stats: Arc<BridgeStats>,
    cancel: CancellationToken,
) -> Result<(), BridgeError> {
    cfg.validate()?;
    let limits = cfg.limits();
    // Pulsar may be down or still recovering (after a restart the health
    // check passes before every topic is served): retry with backoff.
    let Some((pulsar, mut consumer, mut dlq)) =
        connect::retry(&cancel, &stats, "connect", || connect::setup(&cfg)).await
    else {
        return Ok(());
    };
    stats.connected.store(1, Ordering::Relaxed);
    let (output, output_handle) = if cfg.output_topic.is_empty() {
        (None, None)
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel(output::OUTPUT_QUEUE);
        (
            Some(tx),
            Some(tokio::spawn(output::output_task(
                pulsar.clone(),
                cfg.output_topic.clone(),
                rx,
            ))),
        )
    };
    tracing::info!(url = %cfg.url, topics = ?cfg.topics, subscription = %cfg.subscription, kind = ?cfg.subscription_type, output = %cfg.output_topic, "pulsar bridge consuming");
    let mut acker = acker::Acker {
        pending: HashMap::new(),
        tracker: ack::AckTracker::new(cfg.subscription_type.ack_mode()),
        done: Vec::new(),
        acks: Vec::new(),
        output,
        target_topic: cfg.target_topic.clone(),
        node: cfg
            .consumer_name
            .clone()
            .unwrap_or_else(|| "tickwire".into()),
        workflows: cfg.target_workflows.clone(),
    };
    let mut next_token = 0u64;
    let mut received = 0u64;
    let mut since_ack = 0u32;
    while !cancel.is_cancelled() {
        // A message that is already there is taken without arming a timer;
        // completions are drained (and acks sent) when the stream is
        // momentarily empty, or every 64 messages.
        let ready = futures::FutureExt::now_or_never(consumer.next());
        if ready.is_none() || since_ack >= 64 {
            acker.ack_committed(&mut sink, &mut consumer, &stats).await;
            since_ack = 0;
        }
        let next = match ready {
            Some(m) => Ok(m),
            None => tokio::select! {
                m = tokio::time::timeout(Duration::from_millis(20), consumer.next()) => m,
                _ = cancel.cancelled() => break,
            },
        };
        since_ack += 1;
        let msg = match next {
            Err(_) => continue,
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "pulsar consumer error; continuing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(None) => {
                // The stream ended: resubscribe (unacked messages are redelivered).
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("pulsar consumer stream ended; resubscribing");
                acker.pending.clear();
                acker.tracker.clear();
                stats.connected.store(0, Ordering::Relaxed);
                match connect::retry(&cancel, &stats, "resubscribe", || {
                    connect::subscribe(&pulsar, &cfg)
                })
                .await
                {
                    Some(c) => consumer = c,
                    None => break,
                }
                stats.connected.store(1, Ordering::Relaxed);
                continue;
            }
        };
        stats.received.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(topic = %msg.topic, ledger = msg.message_id().ledger_id, entry = msg.message_id().entry_id, batch = ?msg.message_id().batch_index, "received");
        received += 1;
        let meta = msg.metadata();
        let (src, seq) = (
            source_id(&meta.producer_name, &msg.topic),
            source_seq(meta, msg.message_id().batch_index),
        );
        let slot = acker
            .tracker
            .received(&msg.topic, msg.message_id(), meta.num_messages_in_batch);
        let now = tickwire_proto::futex::realtime_ns();
        let reject = match payload::parse(cfg.format, &msg.payload.data, &limits, now) {
            Err(r) => Some((r.code().to_string(), r.to_string())),
            Ok(event) => {
                let token = next_token;
                next_token += 1;
                let sampled = (acker.output.is_some()
                    && received.is_multiple_of(cfg.output_sample_every))
                .then(|| {
                    Box::new(acker::Sampled {
                        topic: msg.topic.clone(),
                        id: msg.message_id().clone(),
                        event: event.clone(),
                    })
                });
                acker
                    .pending
                    .insert(token, acker::Pending { slot, sampled });
                loop {
                    match sink.try_send(&event, &msg.topic, src, seq, token) {
                        Ok(()) => break None,
                        Err(SinkError::Backpressure) => {
                            stats.backpressure.fetch_add(1, Ordering::Relaxed);
                            acker.ack_committed(&mut sink, &mut consumer, &stats).await;
                            tokio::time::sleep(Duration::from_micros(200)).await;
                            if cancel.is_cancelled() {
                                // Not sent: Pulsar redelivers it to whoever runs next.
                                acker.pending.remove(&token);
                                break None;
                            }
                        }
                        Err(SinkError::Rejected(why)) => {
                            acker.pending.remove(&token);
                            break Some(("rejected".to_string(), why.to_string()));
                        }
                    }
                }
            }
        };
        if let Some((code, detail)) = reject {
            let props = [
                ("reason", code.clone()),
                ("detail", detail.clone()),
                ("source_topic", msg.topic.clone()),
                ("source_message_id", output::pulsar_id(msg.message_id())),
            ];
            if dead_letter(&mut dlq, &msg.payload.data, &props, &cancel).await {
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(reason = %code, detail = %detail, topic = %msg.topic, "dead-lettered a message");
                acker.tracker.complete(slot);
            }
            // Else stopping before the dead-letter topic took it: left
            // unacknowledged, Pulsar redelivers it.
        }
    }
    stats.connected.store(0, Ordering::Relaxed);
    // Acknowledge what was committed before stopping (at most half a second).
    for _ in 0..50 {
        acker.ack_committed(&mut sink, &mut consumer, &stats).await;
        if acker.pending.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), consumer.close()).await;
    drop(acker);
    if let Some(h) = output_handle {
        let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
    }
    Ok(())
}

/// Sends a rejected payload to the dead-letter topic with its properties,
/// retrying with backoff until Pulsar has it (a message is acknowledged only
/// once it is either committed or dead-lettered, and acknowledgements go in
/// order). `false` only when stopping first.
async fn dead_letter(
    dlq: &mut connect::DlqProducer,
    payload: &[u8],
    props: &[(&str, String)],
    cancel: &CancellationToken,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut m = dlq.create_message().with_content(payload.to_vec());
        for (k, v) in props {
            m = m.with_property(*k, v.clone());
        }
        let send = async {
            match m.send_non_blocking().await {
                Ok(receipt) => receipt.await.map(|_| ()),
                Err(e) => Err(e),
            }
        };
        let err = tokio::select! {
            r = send => match r {
                Ok(()) => return true,
                Err(e) => e,
            },
            _ = cancel.cancelled() => return false,
        };
        tracing::warn!(error = %err, backoff_ms = backoff.as_millis() as u64, "dead-letter send failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => return false,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

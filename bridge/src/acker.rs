//! Turning commit completions into Pulsar acknowledgements and sampled
//! `market_data_distributed` events.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use pulsar::message::proto::MessageIdData;

use crate::connect::PulsarConsumer;
use crate::output::distributed_event;
use crate::{BridgeStats, Committed, MarketEvent, Sink, ack};

/// A message sampled for a `market_data_distributed` event.
pub(crate) struct Sampled {
    pub(crate) topic: String,
    pub(crate) id: MessageIdData,
    pub(crate) event: MarketEvent,
}

/// A message handed to the sink and not yet committed.
pub(crate) struct Pending {
    pub(crate) slot: ack::Slot,
    pub(crate) sampled: Option<Box<Sampled>>,
}

/// What the loop keeps between messages: bounded by the sink's in-flight
/// limit (pending), the consumer's receiver queue (tracked entries) and the
/// output queue (events).
pub(crate) struct Acker {
    pub(crate) pending: HashMap<u64, Pending>,
    pub(crate) tracker: ack::AckTracker,
    pub(crate) done: Vec<Committed>,
    pub(crate) acks: Vec<ack::Ack>,
    pub(crate) output: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    pub(crate) target_topic: String,
    pub(crate) node: String,
    pub(crate) workflows: Vec<String>,
}

impl Acker {
    /// Takes the sink's commit completions, emits sampled events and sends
    /// the acknowledgements they allow (entries whose every message is
    /// complete; cumulative where the subscription type allows).
    pub(crate) async fn ack_committed<S: Sink>(
        &mut self,
        sink: &mut S,
        consumer: &mut PulsarConsumer,
        stats: &BridgeStats,
    ) {
        self.done.clear();
        let done = &mut self.done;
        sink.drain(&mut |c| done.push(c));
        stats
            .committed
            .fetch_add(self.done.len() as u64, Ordering::Relaxed);
        for c in std::mem::take(&mut self.done) {
            let Some(p) = self.pending.remove(&c.token) else {
                continue;
            };
            self.tracker.complete(p.slot);
            if let (Some(s), Some(out)) = (&p.sampled, &self.output) {
                let key = sink.routing_key(&s.event);
                let body =
                    distributed_event(&self.node, &self.target_topic, &self.workflows, s, &key, &c);
                match out.try_send(body) {
                    Ok(()) => stats.events_out.fetch_add(1, Ordering::Relaxed),
                    Err(_) => stats.events_dropped.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
        self.send_acks(consumer, stats).await;
    }

    /// Sends what the tracker allows.
    pub(crate) async fn send_acks(&mut self, consumer: &mut PulsarConsumer, stats: &BridgeStats) {
        self.tracker.take_acks(&mut self.acks);
        for a in self.acks.drain(..) {
            tracing::debug!(topic = %a.topic, ledger = a.id.ledger_id, entry = a.id.entry_id, cumulative = a.cumulative, messages = a.messages, "ack");
            let sent = if a.cumulative {
                consumer.cumulative_ack_with_id(&a.topic, a.id).await
            } else {
                consumer.ack_with_id(&a.topic, a.id).await
            };
            match sent {
                Ok(()) => {
                    stats.acked.fetch_add(a.messages, Ordering::Relaxed);
                    stats.ack_commands.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, topic = %a.topic, "ack failed; the messages will be redelivered")
                }
            }
        }
    }
}

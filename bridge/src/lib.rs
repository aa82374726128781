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
pub mod payload;

/// The Pulsar client this crate is built on (for tests and tools that produce).
pub use pulsar;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use pulsar::consumer::{ConsumerOptions, InitialPosition};
use pulsar::message::proto::MessageIdData;
use pulsar::message::proto::command_subscribe::SubType;
use pulsar::{ConnectionRetryOptions, Consumer, OperationRetryOptions, Pulsar, TokioExecutor};
use serde::Deserialize;

pub use payload::{Format, Limits, MarketEvent, Reject};

/// Subscription types, with Pulsar's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionType {
    /// One active consumer per partition, standbys take over (default: scale-out).
    Failover,
    /// Each key sticks to one consumer (turn producer batching off: pulsar-rs does not key batches).
    KeyShared,
    /// Round-robin across consumers.
    Shared,
    /// One consumer.
    Exclusive,
}

impl SubscriptionType {
    /// Pulsar delivers each topic partition in order to one consumer, so
    /// cumulative acknowledgements are allowed.
    fn ack_mode(self) -> ack::AckMode {
        match self {
            SubscriptionType::Failover | SubscriptionType::Exclusive => ack::AckMode::Cumulative,
            SubscriptionType::KeyShared | SubscriptionType::Shared => ack::AckMode::Individual,
        }
    }

    fn sub_type(self) -> SubType {
        match self {
            SubscriptionType::Failover => SubType::Failover,
            SubscriptionType::KeyShared => SubType::KeyShared,
            SubscriptionType::Shared => SubType::Shared,
            SubscriptionType::Exclusive => SubType::Exclusive,
        }
    }
}

/// The bridge's configuration (`[bridge]` in tickwire.toml).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// On or off.
    pub enabled: bool,
    /// Pulsar service URL.
    pub url: String,
    /// Input topics (full names or short names in public/default).
    pub topics: Vec<String>,
    /// Subscription name (shared by the nodes that split the feed).
    pub subscription: String,
    /// Subscription type.
    pub subscription_type: SubscriptionType,
    /// Consumer name (default: the node id).
    pub consumer_name: Option<String>,
    /// Payload encoding.
    pub format: Format,
    /// tickwire topic the events go to.
    pub target_topic: String,
    /// Dead-letter topic for payloads that fail validation.
    pub dead_letter_topic: String,
    /// Receiver queue size (messages Pulsar may push before we ask for more).
    pub receiver_queue_size: u32,
    /// Largest payload accepted, bytes.
    pub max_payload_bytes: usize,
    /// How far in the future an event time may be, seconds.
    pub max_future_secs: u64,
    /// When not empty, only these exchanges are accepted (strict mode).
    pub exchanges: Vec<String>,
    /// Pulsar topic for `market_data_distributed` events ("" = off).
    pub output_topic: String,
    /// Emit an event for one committed message in this many (1 = every one).
    pub output_sample_every: u64,
    /// `routing.target_workflows` in the events.
    pub target_workflows: Vec<String>,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            enabled: false,
            url: "pulsar://127.0.0.1:6650".into(),
            topics: vec!["persistent://public/default/market-data-normalized".into()],
            subscription: "tickwire".into(),
            subscription_type: SubscriptionType::Failover,
            consumer_name: None,
            format: Format::Json,
            target_topic: "market-data/normalized/equities".into(),
            dead_letter_topic: "persistent://public/default/market-data-normalized-dlq".into(),
            receiver_queue_size: 1000,
            max_payload_bytes: 64 * 1024,
            max_future_secs: 60,
            exchanges: Vec::new(),
            output_topic: "persistent://public/default/market-data-distributed".into(),
            output_sample_every: 100,
            target_workflows: Vec::new(),
        }
    }
}

impl BridgeConfig {
    /// Checks values once at start.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.url.starts_with("pulsar://") && !self.url.starts_with("pulsar+ssl://") {
            return Err(format!("bridge.url: {:?} is not a pulsar:// URL", self.url));
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.is_empty()) {
            return Err("bridge.topics: at least one non-empty topic".into());
        }
        if self.subscription.is_empty() {
            return Err("bridge.subscription: must not be empty".into());
        }
        if self.receiver_queue_size == 0 {
            return Err("bridge.receiver_queue_size: must be above 0".into());
        }
        if self.output_sample_every == 0 {
            return Err("bridge.output_sample_every: must be above 0 (1 = every message)".into());
        }
        if self.max_payload_bytes == 0 {
            return Err("bridge.max_payload_bytes: must be above 0".into());
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            max_payload_bytes: self.max_payload_bytes,
            max_future_ns: self.max_future_secs.saturating_mul(1_000_000_000),
            exchanges: self.exchanges.clone(),
        }
    }
}

/// Why a sink did not take an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkError {
    /// Full: stop pulling, drain completions, retry.
    Backpressure,
    /// The event can never be taken (bad instrument, full symbology...): it
    /// goes to the dead-letter topic with this reason.
    Rejected(String),
}

/// Where the bridge puts events: the broker implements it over its ingest.
pub trait Sink: Send {
    /// Sends one event; `token` comes back through [`drain`](Sink::drain)
    /// once the event is committed. `source_id`/`source_seq` identify the
    /// event at its source (dedup key across redeliveries and nodes).
    ///
    /// # Errors
    /// [`SinkError`].
    fn try_send(
        &mut self,
        event: &MarketEvent,
        source_id: u32,
        source_seq: u64,
        token: u64,
    ) -> Result<(), SinkError>;
    /// Calls `done` for every event committed since the last call.
    fn drain(&mut self, done: &mut dyn FnMut(Committed));
    /// The routing key the sink routed `event` by, rendered with its
    /// topic's template (for the output events; called only for sampled
    /// messages).
    fn routing_key(&mut self, event: &MarketEvent) -> String;
}

/// Where a committed event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The token given to [`Sink::try_send`].
    pub token: u64,
    /// Partition of the target topic.
    pub partition: u32,
    /// Writer epoch of that partition.
    pub epoch: u64,
    /// Sequence (the offset).
    pub seq: u64,
    /// Readers registered on the partition when it was committed.
    pub readers: u32,
}

/// Counters, shared with whoever started the bridge.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Messages received from Pulsar.
    pub received: AtomicU64,
    /// Messages the sink reported committed.
    pub committed: AtomicU64,
    /// Messages covered by acknowledgements sent to Pulsar (committed or
    /// dead-lettered).
    pub acked: AtomicU64,
    /// Acknowledgement commands sent (cumulative or per entry).
    pub ack_commands: AtomicU64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Times the sink pushed back.
    pub backpressure: AtomicU64,
    /// Reconnections of the consumer.
    pub reconnects: AtomicU64,
    /// `market_data_distributed` events handed to the output producer.
    pub events_out: AtomicU64,
    /// Events dropped because the output queue was full (ingest never waits for it).
    pub events_dropped: AtomicU64,
}

/// Errors that stop the bridge (configuration, or Pulsar unreachable for
/// longer than the retry policy allows).
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Bad configuration.
    #[error("bridge config: {0}")]
    Config(String),
    /// Pulsar client error.
    #[error("pulsar: {0}")]
    Pulsar(#[from] pulsar::Error),
}

/// A stable 32-bit id for a producer on one topic partition (FNV-1a over
/// both names, folded). A producer's sequence ids are per partition (a
/// partitioned producer numbers each partition from 0), so the partition is
/// part of the source: (`source_id`, [`source_seq`]) is the dedup key.
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

type PulsarConsumer = Consumer<Vec<u8>, TokioExecutor>;

async fn connect(cfg: &BridgeConfig) -> Result<Pulsar<TokioExecutor>, BridgeError> {
    let pulsar = Pulsar::builder(cfg.url.clone(), TokioExecutor)
        .with_connection_retry_options(ConnectionRetryOptions {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_retries: u32::MAX,
            connection_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
            ..ConnectionRetryOptions::default()
        })
        .with_operation_retry_options(OperationRetryOptions {
            operation_timeout: Duration::from_secs(30),
            retry_delay: Duration::from_millis(500),
            max_retries: None,
        })
        .build()
        .await?;
    Ok(pulsar)
}

async fn subscribe(
    pulsar: &Pulsar<TokioExecutor>,
    cfg: &BridgeConfig,
) -> Result<PulsarConsumer, BridgeError> {
    let mut b = pulsar
        .consumer()
        .with_topics(&cfg.topics)
        .with_subscription(&cfg.subscription)
        .with_subscription_type(cfg.subscription_type.sub_type())
        .with_batch_size(cfg.receiver_queue_size)
        .with_options(ConsumerOptions {
            initial_position: InitialPosition::Earliest,
            durable: Some(true),
            ..ConsumerOptions::default()
        });
    if let Some(name) = &cfg.consumer_name {
        b = b.with_consumer_name(name);
    }
    Ok(b.build().await?)
}

type DlqProducer = pulsar::Producer<TokioExecutor>;

async fn setup(
    cfg: &BridgeConfig,
) -> Result<(Pulsar<TokioExecutor>, PulsarConsumer, DlqProducer), BridgeError> {
    let pulsar = connect(cfg).await?;
    let consumer = subscribe(&pulsar, cfg).await?;
    let dlq = pulsar
        .producer()
        .with_topic(&cfg.dead_letter_topic)
        .with_options(pulsar::ProducerOptions {
            block_queue_if_full: true,
            ..pulsar::ProducerOptions::default()
        })
        .build()
        .await?;
    Ok((pulsar, consumer, dlq))
}

/// Runs `op` until it succeeds (backoff 100 ms doubling to 5 s), or `None`
/// once `stop` is set.
async fn retry<T, F, Fut>(stop: &AtomicBool, what: &str, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BridgeError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!(error = %e, step = what, backoff_ms = backoff.as_millis() as u64, "pulsar not available; retrying")
            }
        }
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A message sampled for a `market_data_distributed` event.
struct Sampled {
    topic: String,
    id: MessageIdData,
    event: MarketEvent,
}

/// A message handed to the sink and not yet committed.
struct Pending {
    slot: ack::Slot,
    sampled: Option<Box<Sampled>>,
}

/// What the loop keeps between messages: bounded by the sink's in-flight
/// limit (pending), the consumer's receiver queue (tracked entries) and the
/// output queue (events).
struct Acker {
    pending: HashMap<u64, Pending>,
    tracker: ack::AckTracker,
    done: Vec<Committed>,
    acks: Vec<ack::Ack>,
    output: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    target_topic: String,
    node: String,
    workflows: Vec<String>,
}

impl Acker {
    /// Takes the sink's commit completions, emits sampled events and sends
    /// the acknowledgements they allow (entries whose every message is
    /// complete; cumulative where the subscription type allows).
    async fn ack_committed<S: Sink>(
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
    async fn send_acks(&mut self, consumer: &mut PulsarConsumer, stats: &BridgeStats) {
        self.tracker.take_acks(&mut self.acks);
        for a in self.acks.drain(..) {
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

/// `ledger:entry:batch_index` (-1 when not batched), as Pulsar's tools print it.
fn pulsar_id(id: &MessageIdData) -> String {
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
fn distributed_event(
    node: &str,
    target: &str,
    workflows: &[String],
    s: &Sampled,
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
const OUTPUT_QUEUE: usize = 8192;

/// Publishes `market_data_distributed` events in batches.
async fn output_task(
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

/// Runs the bridge until `stop` is set. Acknowledges each message once the
/// sink committed it; sends bad payloads to the dead-letter topic; emits
/// sampled `market_data_distributed` events to the output topic.
///
/// # Errors
/// [`BridgeError`] when it cannot start (bad config, Pulsar unreachable).
pub async fn run<S: Sink>(
    cfg: BridgeConfig,
    mut sink: S,
    stats: Arc<BridgeStats>,
    stop: Arc<AtomicBool>,
) -> Result<(), BridgeError> {
    cfg.validate().map_err(BridgeError::Config)?;
    let limits = cfg.limits();
    // Pulsar may be down or still recovering (after a restart the health
    // check passes before every topic is served): retry with backoff.
    let Some((pulsar, mut consumer, mut dlq)) = retry(&stop, "connect", || setup(&cfg)).await
    else {
        return Ok(());
    };
    let (output, output_handle) = if cfg.output_topic.is_empty() {
        (None, None)
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel(OUTPUT_QUEUE);
        (
            Some(tx),
            Some(tokio::spawn(output_task(
                pulsar.clone(),
                cfg.output_topic.clone(),
                rx,
            ))),
        )
    };
    tracing::info!(url = %cfg.url, topics = ?cfg.topics, subscription = %cfg.subscription, kind = ?cfg.subscription_type, output = %cfg.output_topic, "pulsar bridge consuming");
    let mut acker = Acker {
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
    while !stop.load(Ordering::Relaxed) {
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
            None => tokio::time::timeout(Duration::from_millis(20), consumer.next()).await,
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
                tokio::time::sleep(Duration::from_millis(500)).await;
                match retry(&stop, "resubscribe", || subscribe(&pulsar, &cfg)).await {
                    Some(c) => consumer = c,
                    None => break,
                }
                continue;
            }
        };
        stats.received.fetch_add(1, Ordering::Relaxed);
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
                    Box::new(Sampled {
                        topic: msg.topic.clone(),
                        id: msg.message_id().clone(),
                        event: event.clone(),
                    })
                });
                acker.pending.insert(token, Pending { slot, sampled });
                loop {
                    match sink.try_send(&event, src, seq, token) {
                        Ok(()) => break None,
                        Err(SinkError::Backpressure) => {
                            stats.backpressure.fetch_add(1, Ordering::Relaxed);
                            acker.ack_committed(&mut sink, &mut consumer, &stats).await;
                            tokio::time::sleep(Duration::from_micros(200)).await;
                            if stop.load(Ordering::Relaxed) {
                                // Not sent: Pulsar redelivers it to whoever runs next.
                                acker.pending.remove(&token);
                                break None;
                            }
                        }
                        Err(SinkError::Rejected(why)) => {
                            acker.pending.remove(&token);
                            break Some(("rejected".to_string(), why));
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
                ("source_message_id", pulsar_id(msg.message_id())),
            ];
            if dead_letter(&mut dlq, &msg.payload.data, &props, &stop).await {
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(reason = %code, detail = %detail, topic = %msg.topic, "dead-lettered a message");
                acker.tracker.complete(slot);
            }
            // Else stopping before the dead-letter topic took it: left
            // unacknowledged, Pulsar redelivers it.
        }
    }
    // Acknowledge what was committed before stopping.
    for _ in 0..50 {
        acker.ack_committed(&mut sink, &mut consumer, &stats).await;
        if acker.pending.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = consumer.close().await;
    drop(acker);
    if let Some(h) = output_handle {
        let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
    }
    Ok(())
}

/// Sends a rejected payload to the dead-letter topic with its properties,
/// retrying with backoff until Pulsar has it (a message is acknowledged only
/// once it is either committed or dead-lettered, and acknowledgements go in
/// order). `false` only when stopping first.
async fn dead_letter(
    dlq: &mut DlqProducer,
    payload: &[u8],
    props: &[(&str, String)],
    stop: &AtomicBool,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut m = dlq.create_message().with_content(payload.to_vec());
        for (k, v) in props {
            m = m.with_property(*k, v.clone());
        }
        let err = match m.send_non_blocking().await {
            Ok(receipt) => match receipt.await {
                Ok(_) => return true,
                Err(e) => e,
            },
            Err(e) => e,
        };
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        tracing::warn!(error = %err, backoff_ms = backoff.as_millis() as u64, "dead-letter send failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
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

//! The bridge's configuration: `[bridge]` in tickwire.toml.

use pulsar::message::proto::command_subscribe::SubType;
use serde::Deserialize;

use crate::ack;
use crate::payload::{Format, Limits};

/// A bridge setting that cannot be right; `key` is under `bridge.`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bridge.{key}: {why}")]
pub struct ConfigError {
    /// The key, e.g. `url`.
    pub key: &'static str,
    /// What is wrong with its value.
    pub why: String,
}

/// Where a new subscription starts reading its topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InitialPosition {
    /// What is published after the subscription is created (Pulsar's default).
    Latest,
    /// The oldest message the topic retains.
    Earliest,
}

impl InitialPosition {
    pub(crate) fn to_pulsar(self) -> pulsar::consumer::InitialPosition {
        match self {
            InitialPosition::Latest => pulsar::consumer::InitialPosition::Latest,
            InitialPosition::Earliest => pulsar::consumer::InitialPosition::Earliest,
        }
    }
}

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
    pub(crate) fn ack_mode(self) -> ack::AckMode {
        match self {
            SubscriptionType::Failover | SubscriptionType::Exclusive => ack::AckMode::Cumulative,
            SubscriptionType::KeyShared | SubscriptionType::Shared => ack::AckMode::Individual,
        }
    }

    pub(crate) fn sub_type(self) -> SubType {
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
    /// Where a subscription that does not exist yet starts: `latest` (only
    /// what is published from now on, as Pulsar does) or `earliest` (the
    /// topic's whole backlog). An existing subscription resumes where it
    /// was acknowledged, whatever this says.
    pub initial_position: InitialPosition,
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
            initial_position: InitialPosition::Latest,
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
    /// [`ConfigError`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, why: String| Err(ConfigError { key, why });
        if !self.url.starts_with("pulsar://") && !self.url.starts_with("pulsar+ssl://") {
            return bad("url", format!("{:?} is not a pulsar:// URL", self.url));
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.is_empty()) {
            return bad("topics", "at least one non-empty topic".into());
        }
        if self.subscription.is_empty() {
            return bad("subscription", "must not be empty".into());
        }
        if self.receiver_queue_size == 0 {
            return bad("receiver_queue_size", "must be above 0".into());
        }
        if self.output_sample_every == 0 {
            return bad(
                "output_sample_every",
                "must be above 0 (1 = every message)".into(),
            );
        }
        if self.max_payload_bytes == 0 {
            return bad("max_payload_bytes", "must be above 0".into());
        }
        Ok(())
    }

    pub(crate) fn limits(&self) -> Limits {
        Limits {
            max_payload_bytes: self.max_payload_bytes,
            max_future_ns: self.max_future_secs.saturating_mul(1_000_000_000),
            exchanges: self.exchanges.clone(),
        }
    }
}

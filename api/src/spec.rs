//! A subscription request, validated once: what gRPC's `StreamRequest` and
//! a WebSocket `subscribe` payload both become.

use std::time::Duration;

use tickwire_proto::frame::{ArchivedFrameBody, Kind, UNDEF_PRICE, price_from_f64};
use tickwire_proto::pb;

use crate::error::ApiError;
pub use crate::group::GroupType;

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartSpec {
    /// What comes next.
    Latest,
    /// The oldest event kept (the journal's, else the ring's).
    Earliest,
    /// After these (partition, epoch, sequence); other partitions at Latest.
    After(Vec<(u32, u64, u64)>),
    /// The first event at or after this UTC time (ns) on each partition.
    Time(u64),
}

/// What a full subscriber queue does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Skip; send a gap notice with the exact range.
    Drop,
    /// Keep the latest event per instrument until the client catches up.
    Conflate,
    /// Close the stream with a reason.
    Disconnect,
}

impl Policy {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Drop => "drop",
            Policy::Conflate => "conflate",
            Policy::Disconnect => "disconnect",
        }
    }
}

/// Limits on what one request may ask for.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Symbols in one subscription.
    pub max_symbols: usize,
}

/// A validated subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    /// Topic.
    pub topic: String,
    /// Subscription name ("" = unnamed).
    pub name: String,
    /// Symbols (empty = all).
    pub symbols: Vec<String>,
    /// Exchanges (empty = all).
    pub exchanges: Vec<String>,
    /// Currencies (empty = all).
    pub currencies: Vec<String>,
    /// Bit `1 << kind code` for each wanted kind.
    pub kinds: u8,
    /// Price range, 1e-9 fixed point.
    pub min_price: Option<i64>,
    /// Upper bound.
    pub max_price: Option<i64>,
    /// Minimum volume (raw units).
    pub min_volume: Option<u64>,
    /// Start.
    pub start: StartSpec,
    /// Initial image first.
    pub snapshot: bool,
    /// Slow-consumer policy.
    pub policy: Policy,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// A subscription group's options (`None`: a plain live stream).
    pub group: Option<GroupOpts>,
}

/// How a consumer takes part in a subscription group.
#[derive(Debug, Clone)]
pub struct GroupOpts {
    /// Type.
    pub kind: GroupType,
    /// At least once: events are done when acknowledged.
    pub acked: bool,
    /// Consumer name.
    pub consumer: String,
    /// Failover priority (lower first).
    pub priority: i32,
    /// Most unacknowledged events it holds.
    pub window: u32,
    /// Redelivery (Shared) or removal (others) after this.
    pub ack_timeout: Duration,
    /// Dead-letter after this many deliveries (0: never).
    pub max_redeliveries: u32,
}

fn finite_price(field: &str, v: Option<f64>) -> Result<Option<i64>, ApiError> {
    match v {
        None => Ok(None),
        Some(p) => price_from_f64(p)
            .map(Some)
            .ok_or_else(|| ApiError::invalid(field, format!("{p} is not a valid price"))),
    }
}

impl SubscriptionSpec {
    /// Validates a `StreamRequest`; `default_topic` stands in for an empty
    /// topic.
    ///
    /// # Errors
    /// [`ApiError::Invalid`] naming the first bad field;
    /// [`ApiError::Unimplemented`] for a subscription type or delivery mode
    /// this build cannot serve.
    pub fn from_request(
        r: &pb::StreamRequest,
        default_topic: &str,
        limits: &RequestLimits,
    ) -> Result<SubscriptionSpec, ApiError> {
        let topic = if r.topic.is_empty() {
            default_topic.to_string()
        } else {
            r.topic.clone()
        };
        if r.symbols.len() > limits.max_symbols {
            return Err(ApiError::invalid(
                "symbols",
                format!(
                    "{} symbols; at most {} per subscription",
                    r.symbols.len(),
                    limits.max_symbols
                ),
            ));
        }
        for (i, s) in r.symbols.iter().enumerate() {
            if s.is_empty() || s.len() > tickwire_proto::symbology::MAX_SYMBOL {
                return Err(ApiError::invalid(
                    format!("symbols[{i}]"),
                    format!(
                        "{} is not a symbol (1 to 32 bytes)",
                        tickwire_proto::symbology::quoted(s)
                    ),
                ));
            }
        }
        let mut kinds = 0u8;
        for (i, d) in r.data_types.iter().enumerate() {
            let k = Kind::parse(d).ok_or_else(|| {
                ApiError::invalid(
                    format!("data_types[{i}]"),
                    format!(
                        "{} is not a data type (trade, quote)",
                        tickwire_proto::symbology::quoted(d)
                    ),
                )
            })?;
            kinds |= 1 << k.code();
        }
        if kinds == 0 {
            kinds = Kind::ALL.iter().fold(0, |m, k| m | 1 << k.code());
        }
        let f = r.filters.clone().unwrap_or_default();
        let min_price = finite_price("filters.min_price", f.min_price)?;
        let max_price = finite_price("filters.max_price", f.max_price)?;
        if let (Some(lo), Some(hi)) = (min_price, max_price)
            && lo > hi
        {
            return Err(ApiError::invalid(
                "filters.max_price",
                "below filters.min_price",
            ));
        }
        let min_volume = match f.min_volume {
            None => None,
            Some(v) if v < 0 => {
                return Err(ApiError::invalid(
                    "filters.min_volume",
                    format!("{v} is negative"),
                ));
            }
            Some(v) => Some(v as u64),
        };
        let start = match pb::MessagePosition::try_from(r.start_position) {
            Ok(pb::MessagePosition::Latest) => StartSpec::Latest,
            Ok(pb::MessagePosition::Earliest) => StartSpec::Earliest,
            Ok(pb::MessagePosition::MessageId) => {
                if r.start_message_ids.is_empty() {
                    return Err(ApiError::invalid(
                        "start_message_ids",
                        "start position MESSAGE_ID needs at least one message id",
                    ));
                }
                let mut ids = Vec::new();
                for (i, m) in r.start_message_ids.iter().enumerate() {
                    if ids.iter().any(|&(p, _, _)| p == m.partition) {
                        return Err(ApiError::invalid(
                            format!("start_message_ids[{i}].partition"),
                            format!("partition {} named twice", m.partition),
                        ));
                    }
                    ids.push((m.partition, m.epoch, m.sequence));
                }
                StartSpec::After(ids)
            }
            Ok(pb::MessagePosition::Timestamp) => {
                if r.start_time_ns <= 0 {
                    return Err(ApiError::invalid(
                        "start_time_ns",
                        format!(
                            "{} is not a time: start position TIMESTAMP needs UTC nanoseconds since 1970",
                            r.start_time_ns
                        ),
                    ));
                }
                StartSpec::Time(r.start_time_ns as u64)
            }
            Err(_) => {
                return Err(ApiError::invalid(
                    "start_position",
                    format!("{} is not a start position", r.start_position),
                ));
            }
        };
        let policy = match pb::SlowConsumerPolicy::try_from(r.policy) {
            Ok(pb::SlowConsumerPolicy::Drop) => Policy::Drop,
            Ok(pb::SlowConsumerPolicy::Conflate) => Policy::Conflate,
            Ok(pb::SlowConsumerPolicy::Disconnect) => Policy::Disconnect,
            Err(_) => {
                return Err(ApiError::invalid(
                    "policy",
                    format!("{} is not a policy", r.policy),
                ));
            }
        };
        let kind = match pb::SubscriptionType::try_from(r.subscription_type) {
            Ok(pb::SubscriptionType::Exclusive) => GroupType::Exclusive,
            Ok(pb::SubscriptionType::Failover) => GroupType::Failover,
            Ok(pb::SubscriptionType::Shared) => GroupType::Shared,
            Ok(pb::SubscriptionType::KeyShared) => GroupType::KeyShared,
            Err(_) => {
                return Err(ApiError::invalid(
                    "subscription_type",
                    format!("{} is not a subscription type", r.subscription_type),
                ));
            }
        };
        let acked = match pb::DeliveryMode::try_from(r.delivery_mode) {
            Ok(pb::DeliveryMode::AtMostOnce) => false,
            Ok(pb::DeliveryMode::AtLeastOnce | pb::DeliveryMode::ExactlyOnce) => true,
            Err(_) => {
                return Err(ApiError::invalid(
                    "delivery_mode",
                    format!("{} is not a delivery mode", r.delivery_mode),
                ));
            }
        };
        let group = if kind == GroupType::Exclusive && !acked {
            None
        } else {
            if r.subscription_name.is_empty() {
                return Err(ApiError::invalid(
                    "subscription_name",
                    "a subscription group (a type other than EXCLUSIVE, or AT_LEAST_ONCE) needs a name its consumers share",
                ));
            }
            if r.snapshot {
                return Err(ApiError::invalid(
                    "snapshot",
                    "a subscription group has no initial image: each event goes to one consumer",
                ));
            }
            if r.consumer_name.len() > 100 {
                return Err(ApiError::invalid("consumer_name", "longer than 100 bytes"));
            }
            if r.receiver_queue_size > 1_000_000 {
                return Err(ApiError::invalid(
                    "receiver_queue_size",
                    format!("{} is above the 1,000,000 maximum", r.receiver_queue_size),
                ));
            }
            Some(GroupOpts {
                kind,
                acked,
                consumer: if r.consumer_name.is_empty() {
                    format!("consumer-{}", uuid::Uuid::new_v4().simple())
                } else {
                    r.consumer_name.clone()
                },
                priority: r.priority_level,
                window: match r.receiver_queue_size {
                    0 => 1000,
                    n => n,
                },
                ack_timeout: match r.ack_timeout_ms {
                    0 => Duration::from_secs(30),
                    ms if ms < 100 => {
                        return Err(ApiError::invalid(
                            "ack_timeout_ms",
                            format!("{ms} ms is below the 100 ms minimum"),
                        ));
                    }
                    ms => Duration::from_millis(ms as u64),
                },
                max_redeliveries: r.max_redeliveries,
            })
        };
        if r.consumer_name.len() + r.priority_level.unsigned_abs() as usize > 0 && group.is_none() {
            return Err(ApiError::invalid(
                if r.consumer_name.is_empty() {
                    "priority_level"
                } else {
                    "consumer_name"
                },
                "only for subscription groups (a type other than EXCLUSIVE, or AT_LEAST_ONCE)",
            ));
        }
        let heartbeat = match r.heartbeat_interval_ms {
            0 => Duration::from_secs(1),
            ms if ms < 10 => {
                return Err(ApiError::invalid(
                    "heartbeat_interval_ms",
                    format!("{ms} ms is below the 10 ms minimum"),
                ));
            }
            ms => Duration::from_millis(ms as u64),
        };
        if r.subscription_name.len() > 100 {
            return Err(ApiError::invalid(
                "subscription_name",
                "longer than 100 bytes",
            ));
        }
        Ok(SubscriptionSpec {
            topic,
            name: r.subscription_name.clone(),
            symbols: r.symbols.clone(),
            exchanges: f.exchanges,
            currencies: f.currencies,
            kinds,
            min_price,
            max_price,
            min_volume,
            start,
            snapshot: r.snapshot,
            policy,
            heartbeat,
            group,
        })
    }

    #[inline]
    /// Whether an event passes the data-type, price and volume filters
    /// (the instrument is checked by [`wants_instrument`](Self::wants_instrument)).
    pub fn passes(&self, b: &ArchivedFrameBody) -> bool {
        let s = self;
        if s.kinds & (1 << b.kind().map_or(0, Kind::code)) == 0 {
            return false;
        }
        if s.min_price.is_some() || s.max_price.is_some() {
            let px = match b.kind() {
                Some(Kind::Quote) => match (b.px_a(), b.px_b()) {
                    (UNDEF_PRICE, UNDEF_PRICE) => return false,
                    (UNDEF_PRICE, a) => a,
                    (bid, UNDEF_PRICE) => bid,
                    (bid, ask) => ((bid as i128 + ask as i128) / 2) as i64,
                },
                _ => b.px_a(),
            };
            if px == UNDEF_PRICE
                || s.min_price.is_some_and(|lo| px < lo)
                || s.max_price.is_some_and(|hi| px > hi)
            {
                return false;
            }
        }
        if let Some(v) = s.min_volume {
            let vol = match b.kind() {
                Some(Kind::Quote) => b.size_a().max(b.size_b()),
                _ => b.size_a(),
            };
            if (vol as u64) < v {
                return false;
            }
        }
        true
    }

    /// Whether an instrument (by its names) is one this subscription wants.
    pub fn wants_instrument(&self, symbol: &str, exchange: &str, currency: &str) -> bool {
        (self.symbols.is_empty() || self.symbols.iter().any(|s| s == symbol))
            && (self.exchanges.is_empty() || self.exchanges.iter().any(|e| e == exchange))
            && (self.currencies.is_empty() || self.currencies.iter().any(|c| c == currency))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        RequestLimits { max_symbols: 4 }
    }

    #[test]
    fn bad_fields_are_named() {
        let bad = |r: pb::StreamRequest| {
            SubscriptionSpec::from_request(&r, "t", &limits())
                .err()
                .map(|e| (e.field().map(str::to_string), e.to_string()))
        };
        let (f, _) = bad(pb::StreamRequest {
            data_types: vec!["trade".into(), "bars".into()],
            ..Default::default()
        })
        .expect("refused");
        assert_eq!(f.as_deref(), Some("data_types[1]"));
        let (f, _) = bad(pb::StreamRequest {
            filters: Some(pb::FilterCriteria {
                min_price: Some(5.0),
                max_price: Some(1.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .expect("refused");
        assert_eq!(f.as_deref(), Some("filters.max_price"));
        let (f, _) = bad(pb::StreamRequest {
            symbols: vec!["A".into(); 5],
            ..Default::default()
        })
        .expect("refused");
        assert_eq!(f.as_deref(), Some("symbols"));
        let (f, msg) = bad(pb::StreamRequest {
            subscription_type: pb::SubscriptionType::KeyShared as i32,
            ..Default::default()
        })
        .expect("refused");
        assert_eq!(f.as_deref(), Some("subscription_name"), "{msg}");
        let (f, _) = bad(pb::StreamRequest {
            subscription_type: pb::SubscriptionType::Shared as i32,
            subscription_name: "g".into(),
            ack_timeout_ms: 5,
            ..Default::default()
        })
        .expect("refused");
        assert_eq!(f.as_deref(), Some("ack_timeout_ms"));
        let g = SubscriptionSpec::from_request(
            &pb::StreamRequest {
                subscription_type: pb::SubscriptionType::KeyShared as i32,
                delivery_mode: pb::DeliveryMode::AtLeastOnce as i32,
                subscription_name: "g".into(),
                ..Default::default()
            },
            "t",
            &limits(),
        )
        .expect("a group")
        .group
        .expect("group options");
        assert_eq!(
            (g.kind, g.acked, g.window),
            (GroupType::KeyShared, true, 1000)
        );
        let ok = SubscriptionSpec::from_request(&pb::StreamRequest::default(), "t", &limits())
            .expect("defaults are valid");
        assert_eq!(ok.topic, "t");
        assert_eq!(ok.start, StartSpec::Latest);
        assert_eq!(ok.policy, Policy::Drop);
    }
}

//! WebSocket `/api/v1/market-data/stream`: the spec's `WebSocketMessage`
//! JSON (`type`, `payload`, `timestamp`), several subscriptions per
//! connection.
//!
//! Client to server:
//! - `{"type":"subscribe","payload":{"symbols":["AAPL"]}}`: the payload has
//!   the gRPC `StreamRequest`'s fields (`symbols`, `data_types`,
//!   `subscription_name`, `filters`, `topic`, `start`, `snapshot`,
//!   `policy`, `heartbeat_interval_ms`) plus an optional `subscription_id`;
//!   omitted ones take defaults (all data types, latest, drop).
//!   `start` is `"latest"`, `"earliest"`,
//!   `{"message_ids":[{"partition":0,"epoch":1,"sequence":41}]}` or
//!   `{"time":"2026-12-02T14:30:00Z"}` (RFC 3339; the first event at or
//!   after it, replayed from the journal).
//! - `{"type":"unsubscribe","payload":{"subscription_id":"s1"}}`.
//! - Subscription groups: `subscribe` with `subscription_name` and
//!   `subscription_type` (`exclusive`, `failover`, `shared`, `key_shared`)
//!   and/or `delivery_mode` (`at_most_once`, `at_least_once`), plus
//!   `consumer_name`, `priority_level`, `receiver_queue_size`,
//!   `ack_timeout_ms`, `max_redeliveries` as in gRPC; then
//!   `{"type":"ack","payload":{"subscription_id":"s1","message_ids":["0:1:42"],"cumulative":false}}`
//!   with the `metadata.message_id`s received (no reply; an error names
//!   the field).
//!
//! Server to client: `subscribed`, `unsubscribed`, `data` (a batch:
//! `payload.messages`), `gap`, `slow_consumer`, `snapshot_complete`,
//! `heartbeat`, `end`, and `error` (naming the field that was wrong; it
//! changes nothing else).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tickwire_proto::futex::realtime_ns;
use tickwire_proto::pb;
use tokio::sync::Notify;

use crate::EdgeState;
use crate::auth::Right;
use crate::dispatch::outbox::{Next, Payload};
use crate::dispatch::{SubscriptionHandle, Wire, json};
use crate::error::ApiError;
use crate::spec::SubscriptionSpec;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: serde_json::Value,
    #[serde(default)]
    #[allow(dead_code)]
    timestamp: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Filters {
    exchanges: Vec<String>,
    currencies: Vec<String>,
    min_price: Option<f64>,
    max_price: Option<f64>,
    min_volume: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageIdJson {
    partition: u32,
    #[serde(default)]
    epoch: u64,
    sequence: u64,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StartJson {
    Named(String),
    Ids { message_ids: Vec<MessageIdJson> },
    Time { time: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Subscribe {
    subscription_id: Option<String>,
    symbols: Vec<String>,
    data_types: Vec<String>,
    subscription_name: String,
    filters: Option<Filters>,
    topic: String,
    start: Option<StartJson>,
    snapshot: bool,
    policy: Option<String>,
    heartbeat_interval_ms: u32,
    subscription_type: Option<String>,
    delivery_mode: Option<String>,
    consumer_name: String,
    priority_level: i32,
    receiver_queue_size: u32,
    ack_timeout_ms: u32,
    max_redeliveries: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ack {
    subscription_id: String,
    /// `"<partition>:<epoch>:<sequence>"`, as in `metadata.message_id`.
    message_ids: Vec<String>,
    #[serde(default)]
    cumulative: bool,
}

/// `"<partition>:<epoch>:<sequence>"` as (partition, sequence).
pub(crate) fn parse_message_id(field: &str, id: &str) -> Result<(u32, u64), ApiError> {
    let mut it = id.split(':');
    let (Some(p), Some(e), Some(q), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(ApiError::invalid(
            field,
            format!("{id:?} is not a message id \"<partition>:<epoch>:<sequence>\""),
        ));
    };
    let bad = || {
        ApiError::invalid(
            field,
            format!("{id:?}: partition, epoch and sequence are numbers"),
        )
    };
    let p: u32 = p.parse().map_err(|_| bad())?;
    let _: u64 = e.parse().map_err(|_| bad())?;
    let q: u64 = q.parse().map_err(|_| bad())?;
    Ok((p, q))
}

/// A subscription of a connection: a plain stream or a group membership.
enum Sub {
    Live(SubscriptionHandle),
    Group(crate::group::MemberHandle),
}

impl Sub {
    fn outbox(&self) -> &crate::dispatch::outbox::Outbox {
        match self {
            Sub::Live(s) => &s.outbox,
            Sub::Group(m) => &m.outbox,
        }
    }

    fn heartbeat(&self) -> Duration {
        match self {
            Sub::Live(s) => s.heartbeat,
            Sub::Group(m) => m.heartbeat,
        }
    }

    fn record_send(&self, oldest_ingest_ns: u64, bytes: usize) {
        if let Sub::Live(s) = self {
            s.shared.record_send(oldest_ingest_ns, bytes);
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Unsubscribe {
    subscription_id: String,
}

/// The `payload` of a `subscribe` as a `StreamRequest`.
fn to_request(s: Subscribe) -> Result<(Option<String>, pb::StreamRequest), ApiError> {
    let mut r = pb::StreamRequest {
        symbols: s.symbols,
        data_types: s.data_types,
        subscription_name: s.subscription_name,
        topic: s.topic,
        snapshot: s.snapshot,
        heartbeat_interval_ms: s.heartbeat_interval_ms,
        consumer_name: s.consumer_name,
        priority_level: s.priority_level,
        receiver_queue_size: s.receiver_queue_size,
        ack_timeout_ms: s.ack_timeout_ms,
        max_redeliveries: s.max_redeliveries,
        ..Default::default()
    };
    if let Some(t) = s.subscription_type {
        r.subscription_type = match t.as_str() {
            "exclusive" => pb::SubscriptionType::Exclusive,
            "failover" => pb::SubscriptionType::Failover,
            "shared" => pb::SubscriptionType::Shared,
            "key_shared" => pb::SubscriptionType::KeyShared,
            other => {
                return Err(ApiError::invalid(
                    "payload.subscription_type",
                    format!(
                        "{other:?} is not a subscription type (exclusive, failover, shared, key_shared)"
                    ),
                ));
            }
        } as i32;
    }
    if let Some(m) = s.delivery_mode {
        r.delivery_mode = match m.as_str() {
            "at_most_once" => pb::DeliveryMode::AtMostOnce,
            "at_least_once" => pb::DeliveryMode::AtLeastOnce,
            "exactly_once" => pb::DeliveryMode::ExactlyOnce,
            other => {
                return Err(ApiError::invalid(
                    "payload.delivery_mode",
                    format!(
                        "{other:?} is not a delivery mode (at_most_once, at_least_once, exactly_once)"
                    ),
                ));
            }
        } as i32;
    }
    if let Some(f) = s.filters {
        r.filters = Some(pb::FilterCriteria {
            exchanges: f.exchanges,
            currencies: f.currencies,
            min_price: f.min_price,
            max_price: f.max_price,
            min_volume: f.min_volume,
        });
    }
    match s.start {
        None => {}
        Some(StartJson::Named(n)) => {
            r.start_position = match n.as_str() {
                "latest" => pb::MessagePosition::Latest,
                "earliest" => pb::MessagePosition::Earliest,
                other => {
                    return Err(ApiError::invalid(
                        "payload.start",
                        format!(
                            "{other:?} is not a start (latest, earliest, {{\"message_ids\": [..]}} or {{\"time\": \"2026-12-02T14:30:00Z\"}})"
                        ),
                    ));
                }
            } as i32;
        }
        Some(StartJson::Time { time }) => {
            let t = humantime::parse_rfc3339_weak(&time).map_err(|e| {
                ApiError::invalid(
                    "payload.start.time",
                    format!("{time:?} is not an RFC 3339 time such as 2026-12-02T14:30:00Z: {e}"),
                )
            })?;
            let ns = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| {
                    ApiError::invalid("payload.start.time", format!("{time:?} is before 1970"))
                })?
                .as_nanos();
            r.start_position = pb::MessagePosition::Timestamp as i32;
            r.start_time_ns = i64::try_from(ns).map_err(|_| {
                ApiError::invalid("payload.start.time", format!("{time:?} is too far ahead"))
            })?;
        }
        Some(StartJson::Ids { message_ids }) => {
            r.start_position = pb::MessagePosition::MessageId as i32;
            r.start_message_ids = message_ids
                .into_iter()
                .map(|m| pb::MessageId {
                    partition: m.partition,
                    epoch: m.epoch,
                    sequence: m.sequence,
                })
                .collect();
        }
    }
    if let Some(p) = s.policy {
        r.policy = match p.as_str() {
            "drop" => pb::SlowConsumerPolicy::Drop,
            "conflate" => pb::SlowConsumerPolicy::Conflate,
            "disconnect" => pb::SlowConsumerPolicy::Disconnect,
            other => {
                return Err(ApiError::invalid(
                    "payload.policy",
                    format!("{other:?} is not a policy (drop, conflate, disconnect)"),
                ));
            }
        } as i32;
    }
    Ok((s.subscription_id, r))
}

fn error_message(e: &ApiError, subscription_id: Option<&str>) -> Message {
    let mut p = e.body()["error"].clone();
    if let Some(id) = subscription_id {
        p["subscription_id"] = id.into();
    }
    text(json::message("error", p, realtime_ns()))
}

fn text(json: String) -> Message {
    Message::Text(json.into())
}

/// A payload of type `T`, or an error naming the field that was wrong
/// (`payload.filters.min_price`), not only the payload.
fn parse_payload<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let msg = e.inner().to_string();
        let mut field = String::from("payload");
        let path = e.path().to_string();
        if path != "." {
            field = format!("payload.{path}");
        }
        // An unknown or missing field is named by serde itself; the path
        // is where it was (or was not) found.
        if (msg.starts_with("unknown field") || msg.starts_with("missing field"))
            && let Some(name) = msg.split('`').nth(1)
            && !field.ends_with(&format!(".{name}"))
        {
            field = format!("{field}.{name}");
        }
        ApiError::invalid(field, msg)
    })
}

/// Serves one connection until the client leaves or the edge stops.
pub async fn serve(socket: WebSocket, state: Arc<EdgeState>, key: Option<String>) {
    let (mut tx, mut rx) = socket.split();
    let notify = Arc::new(Notify::new());
    let mut subs: HashMap<String, Sub> = HashMap::new();
    let mut next_id = 1u64;
    let mut heartbeat = Duration::from_secs(1);
    let mut last_send = tokio::time::Instant::now();
    loop {
        // Everything queued, then wait.
        let mut ended = Vec::new();
        let mut sent = false;
        for (id, s) in &subs {
            while let Some(n) = s.outbox().pop() {
                match n {
                    Next::Frame(f) => {
                        s.record_send(f.oldest_ingest_ns, f.bytes.len());
                        // The dispatcher wrote JSON text as a String: no
                        // copy and no second UTF-8 check.
                        let m = Message::Text(match f.bytes {
                            Payload::Text(t) => t.into(),
                            // Never built for a WebSocket subscription; a
                            // frame failing the check would go out empty
                            // rather than as bad text.
                            Payload::Binary(b) => {
                                axum::extract::ws::Utf8Bytes::try_from(b).unwrap_or_default()
                            }
                        });
                        if tx.feed(m).await.is_err() {
                            return;
                        }
                        sent = true;
                    }
                    Next::Closed(_) => {
                        ended.push(id.clone());
                        break;
                    }
                    Next::Idle => break,
                }
            }
        }
        for id in ended {
            subs.remove(&id);
        }
        if sent {
            if tx.flush().await.is_err() {
                return;
            }
            last_send = tokio::time::Instant::now();
        }
        let notified = notify.notified();
        tokio::select! {
            _ = state.cancel.cancelled() => {
                let _ = tx.send(text(json::message("end", serde_json::json!({"reason": "the broker is shutting down"}), realtime_ns()))).await;
                let _ = tx.send(Message::Close(None)).await;
                return;
            }
            _ = notified => {}
            _ = tokio::time::sleep_until(last_send + heartbeat) => {
                let m = text(json::message("heartbeat", serde_json::json!({"subscriptions": subs.len()}), realtime_ns()));
                if tx.send(m).await.is_err() {
                    return;
                }
                last_send = tokio::time::Instant::now();
            }
            m = rx.next() => {
                let m = match m {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        let e = ApiError::invalid("message", "binary messages are not understood; send JSON text");
                        if tx.send(error_message(&e, None)).await.is_err() { return; }
                        continue;
                    }
                    Some(Ok(_)) => continue, // ping/pong: answered by the library
                };
                let reply = match handle(&state, key.as_deref(), &m, &mut subs, &mut next_id, &notify).await {
                    Ok(r) => r,
                    Err((e, id)) => Some(error_message(&e, id.as_deref())),
                };
                heartbeat = subs
                    .values()
                    .map(Sub::heartbeat)
                    .min()
                    .unwrap_or(Duration::from_secs(1));
                if let Some(reply) = reply
                    && tx.send(reply).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

type Failed = (ApiError, Option<String>);

async fn handle(
    state: &Arc<EdgeState>,
    key: Option<&str>,
    text_in: &str,
    subs: &mut HashMap<String, Sub>,
    next_id: &mut u64,
    notify: &Arc<Notify>,
) -> Result<Option<Message>, Failed> {
    let m: ClientMessage = serde_json::from_str(text_in).map_err(|e| {
        (
            ApiError::invalid("message", format!("not a WebSocketMessage: {e}")),
            None,
        )
    })?;
    match m.kind.as_str() {
        "subscribe" => {
            let s: Subscribe = parse_payload(m.payload).map_err(|e| (e, None))?;
            let (id, req) = to_request(s).map_err(|e| (e, None))?;
            let id = match id {
                Some(id) if id.is_empty() || id.len() > 64 => {
                    return Err((
                        ApiError::invalid("payload.subscription_id", "1 to 64 bytes"),
                        None,
                    ));
                }
                Some(id) => id,
                None => loop {
                    let id = format!("s{next_id}");
                    *next_id += 1;
                    if !subs.contains_key(&id) {
                        break id;
                    }
                },
            };
            if subs.contains_key(&id) {
                return Err((
                    ApiError::AlreadyExists {
                        what: "subscription_id",
                        name: id.clone(),
                    },
                    Some(id),
                ));
            }
            if subs.len() >= state.config.max_subscriptions_per_connection {
                return Err((
                    ApiError::Limit(format!(
                        "{} subscriptions on this connection; the limit is {}",
                        subs.len(),
                        state.config.max_subscriptions_per_connection
                    )),
                    Some(id),
                ));
            }
            let spec = SubscriptionSpec::from_request(&req, &state.default_topic, &state.limits)
                .map_err(|e| (prefix_payload(e), Some(id.clone())))?;
            state
                .auth
                .allow(key, &spec.topic, Right::Read)
                .map_err(|e| (e, Some(id.clone())))?;
            let name = spec.name.clone();
            let topic = spec.topic.clone();
            if spec.group.is_some() {
                let wire = Wire::Json {
                    subscription_id: Arc::from(id.as_str()),
                };
                let m = crate::group::join(state, spec, wire, notify.clone())
                    .await
                    .map_err(|e| (e, Some(id.clone())))?;
                let kind = m.group.kind.name();
                subs.insert(id.clone(), Sub::Group(m));
                return Ok(Some(text(json::message(
                    "subscribed",
                    serde_json::json!({"subscription_id": id, "topic": topic, "subscription_type": kind}),
                    realtime_ns(),
                ))));
            }
            let sub = state
                .hub
                .subscribe(
                    spec,
                    Wire::Json {
                        subscription_id: Arc::from(id.as_str()),
                    },
                    notify.clone(),
                )
                .await
                .map_err(|e| (e, Some(id.clone())))?;
            state.subscriptions.attach(&name, &sub);
            subs.insert(id.clone(), Sub::Live(sub));
            Ok(Some(text(json::message(
                "subscribed",
                serde_json::json!({"subscription_id": id, "topic": topic}),
                realtime_ns(),
            ))))
        }
        "unsubscribe" => {
            let u: Unsubscribe = parse_payload(m.payload).map_err(|e| (e, None))?;
            if subs.remove(&u.subscription_id).is_none() {
                return Err((
                    ApiError::NotFound {
                        what: "subscription_id",
                        name: u.subscription_id.clone(),
                    },
                    Some(u.subscription_id),
                ));
            }
            Ok(Some(text(json::message(
                "unsubscribed",
                serde_json::json!({"subscription_id": u.subscription_id}),
                realtime_ns(),
            ))))
        }
        "ack" => {
            let a: Ack = parse_payload(m.payload).map_err(|e| (e, None))?;
            let sid = Some(a.subscription_id.clone());
            let Some(Sub::Group(member)) = subs.get(&a.subscription_id) else {
                return Err((
                    ApiError::invalid(
                        "payload.subscription_id",
                        format!(
                            "{:?} is not a subscription group of this connection",
                            a.subscription_id
                        ),
                    ),
                    sid,
                ));
            };
            let mut ids = Vec::with_capacity(a.message_ids.len());
            for (i, m) in a.message_ids.iter().enumerate() {
                ids.push(
                    parse_message_id(&format!("payload.message_ids[{i}]"), m)
                        .map_err(|e| (e, sid.clone()))?,
                );
            }
            member
                .ack(ids, a.cumulative)
                .map_err(|e| (prefix_payload(e), sid.clone()))?;
            Ok(None)
        }
        other => Err((
            ApiError::invalid(
                "type",
                format!(
                    "{other:?} is not a message type a client sends (subscribe, unsubscribe, ack)"
                ),
            ),
            None,
        )),
    }
}

fn prefix_payload(e: ApiError) -> ApiError {
    match e {
        ApiError::Invalid { field, why } => ApiError::Invalid {
            field: format!("payload.{field}"),
            why,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of<T: serde::de::DeserializeOwned + std::fmt::Debug>(payload: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(payload).expect("json");
        let e = parse_payload::<T>(v).expect_err("a bad payload");
        e.body()["error"]["field"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    #[test]
    fn a_bad_payload_names_the_field_by_its_path() {
        for (payload, field) in [
            (
                r#"{"filters":{"min_price":"x"}}"#,
                "payload.filters.min_price",
            ),
            (r#"{"symbols":"AAPL"}"#, "payload.symbols"),
            (r#"{"symbols":["AAPL", 7]}"#, "payload.symbols[1]"),
            (r#"{"symbol":["AAPL"]}"#, "payload.symbol"),
            (
                r#"{"filters":{"min_prise":1}}"#,
                "payload.filters.min_prise",
            ),
            (r#"{"snapshot":"yes"}"#, "payload.snapshot"),
        ] {
            assert_eq!(field_of::<Subscribe>(payload), field, "{payload}");
        }
        assert_eq!(field_of::<Unsubscribe>("{}"), "payload.subscription_id");
    }

    #[test]
    fn a_time_start_is_an_rfc3339_time_and_a_bad_one_names_the_field() {
        let sub = |start: &str| {
            let v: serde_json::Value =
                serde_json::from_str(&format!(r#"{{"start":{start}}}"#)).expect("json");
            to_request(parse_payload::<Subscribe>(v).expect("payload"))
        };
        let (_, r) = sub(r#"{"time":"2026-12-02T14:30:00.5Z"}"#).expect("ok");
        assert_eq!(r.start_position, pb::MessagePosition::Timestamp as i32);
        assert_eq!(r.start_time_ns, 1_796_221_800_500_000_000);
        for bad in [
            r#"{"time":"yesterday"}"#,
            r#"{"time":"1969-12-31T23:59:59Z"}"#,
        ] {
            let e = sub(bad).expect_err("refused");
            assert_eq!(e.body()["error"]["field"], "payload.start.time", "{bad}");
        }
    }
}

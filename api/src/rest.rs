//! REST (axum): latest value, admin, health, Prometheus metrics, the
//! OpenAPI document, and the WebSocket upgrade.
//!
//! Topic names contain `/`: in a path they are percent-encoded
//! (`market-data%2Fnormalized%2Fequities`).

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tickwire_proto::json::{Decimal, rfc3339};
use tickwire_proto::pb;
use tickwire_proto::symbology::quoted;

use crate::EdgeState;
use crate::auth::Right;
use crate::error::ApiError;

type S = State<Arc<EdgeState>>;

/// Every route (method, path), as the OpenAPI document lists them.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/metrics"),
    ("get", "/api/v1/openapi.json"),
    ("get", "/api/v1/market-data/{symbol}/latest"),
    ("get", "/api/v1/market-data/{symbol}/history"),
    ("get", "/api/v1/market-data/stream"),
    ("get", "/api/v1/topics"),
    ("post", "/api/v1/topics"),
    ("get", "/api/v1/topics/{topic}"),
    ("patch", "/api/v1/topics/{topic}"),
    ("delete", "/api/v1/topics/{topic}"),
    ("get", "/api/v1/topics/{topic}/stats"),
    ("get", "/api/v1/subscriptions"),
    ("post", "/api/v1/subscriptions"),
    ("get", "/api/v1/subscriptions/{topic}/{name}"),
    ("delete", "/api/v1/subscriptions/{topic}/{name}"),
    ("post", "/api/v1/subscriptions/{topic}/{name}/pause"),
    ("post", "/api/v1/subscriptions/{topic}/{name}/resume"),
    ("post", "/api/v1/subscriptions/{topic}/{name}/reset"),
    ("get", "/api/v1/subscriptions/{topic}/{name}/dead-letters"),
    ("get", "/api/v1/stats/distribution"),
    ("get", "/api/v1/stats/metrics"),
    ("get", "/api/v1/stats/deliveries"),
    ("get", "/api/v1/routing-rules"),
    ("post", "/api/v1/routing-rules"),
    ("put", "/api/v1/routing-rules/{name}"),
    ("delete", "/api/v1/routing-rules/{name}"),
];

/// The OpenAPI 3 document served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// The HTTP router (REST, WebSocket, health, metrics).
pub fn router(state: Arc<EdgeState>) -> axum::Router {
    axum::Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/market-data/{symbol}/latest", get(latest))
        .route("/api/v1/market-data/{symbol}/history", get(history))
        .route("/api/v1/market-data/stream", get(ws))
        .route("/api/v1/topics", get(list_topics).post(create_topic))
        .route(
            "/api/v1/topics/{topic}",
            get(get_topic).patch(grow_topic).delete(delete_topic),
        )
        .route("/api/v1/topics/{topic}/stats", get(topic_stats))
        .route(
            "/api/v1/subscriptions",
            get(list_subscriptions).post(create_subscription),
        )
        .route(
            "/api/v1/subscriptions/{topic}/{name}",
            get(subscription_stats).delete(delete_subscription),
        )
        .route("/api/v1/subscriptions/{topic}/{name}/pause", post(pause))
        .route(
            "/api/v1/subscriptions/{topic}/{name}/dead-letters",
            get(dead_letters),
        )
        .route("/api/v1/subscriptions/{topic}/{name}/resume", post(resume))
        .route("/api/v1/subscriptions/{topic}/{name}/reset", post(reset))
        .route("/api/v1/stats/distribution", get(distribution))
        .route("/api/v1/stats/metrics", get(metrics_range))
        .route("/api/v1/stats/deliveries", get(deliveries))
        .route("/api/v1/routing-rules", get(list_rules).post(create_rule))
        .route(
            "/api/v1/routing-rules/{name}",
            axum::routing::put(replace_rule).delete(delete_rule),
        )
        .fallback(|| async {
            ApiError::NotFound {
                what: "route",
                name: "see /api/v1/openapi.json".into(),
            }
        })
        .layer(axum::extract::DefaultBodyLimit::max(
            state.config.max_request_bytes,
        ))
        .with_state(state)
}

fn key(state: &EdgeState, h: &HeaderMap) -> Result<Option<String>, ApiError> {
    state.auth.check_http(h)
}

async fn health(State(state): S) -> Response {
    let topics: Vec<serde_json::Value> = state
        .engine
        .topics()
        .iter()
        .map(|t| {
            let running = state.hub.running().iter().any(|r| r.topic == t.name);
            serde_json::json!({"topic": t.name, "dispatcher": if running {"running"} else {"stopped"}})
        })
        .collect();
    let ok = topics.iter().all(|t| t["dispatcher"] == "running");
    let body = serde_json::json!({
        "status": if ok {"ok"} else {"degraded"},
        "uptime_secs": state.started.elapsed().as_secs(),
        "topics": topics,
        "cache": state.cache.mode(),
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(state): S) -> Response {
    let mut out = String::new();
    let running = state.hub.running();
    let mut lines = Vec::new();
    for (name, help, f) in [
        (
            "tickwire_edge_events_total",
            "Events the edge read from the rings.",
            0,
        ),
        (
            "tickwire_edge_delivered_total",
            "Events handed to subscriber queues.",
            1,
        ),
        (
            "tickwire_edge_dropped_total",
            "Events a subscriber did not get (slow, paused, overrun).",
            2,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let n = name;
        for t in &running {
            let v = match f {
                0 => t.events.load(Ordering::Relaxed),
                1 => t.delivered.load(Ordering::Relaxed),
                _ => t.dropped.load(Ordering::Relaxed),
            };
            lines.push(format!("{n}{{topic=\"{}\"}} {v}", t.topic));
        }
        out.push_str(&lines.join("\n"));
        out.push('\n');
        lines.clear();
    }
    let n = "tickwire_edge_subscribers";
    let _ = writeln!(
        out,
        "# HELP {n} Live remote subscriptions.\n# TYPE {n} gauge"
    );
    for t in &running {
        let _ = writeln!(
            out,
            "{n}{{topic=\"{}\"}} {}",
            t.topic,
            t.subscribers.load(Ordering::Relaxed)
        );
    }
    let n = "tickwire_edge_streams_open";
    let _ = writeln!(out, "# HELP {n} Open gRPC streams.\n# TYPE {n} gauge");
    let _ = writeln!(
        out,
        "{n} {}",
        state.config.max_streams - state.streams.available_permits()
    );
    for (n, help, pick) in [
        (
            "tickwire_edge_dispatch_latency_seconds",
            "Ingest to dispatch latency.",
            0,
        ),
        (
            "tickwire_edge_send_latency_seconds",
            "Ingest to socket write latency (oldest event of each message).",
            1,
        ),
    ] {
        let _ = writeln!(out, "# HELP {n} {help}\n# TYPE {n} summary");
        for t in &running {
            let h = if pick == 0 {
                &t.dispatch_latency
            } else {
                &t.send_latency
            };
            let Ok(h) = h.lock() else { continue };
            for q in [0.5, 0.99, 0.999] {
                let _ = writeln!(
                    out,
                    "{n}{{topic=\"{}\",quantile=\"{q}\"}} {:e}",
                    t.topic,
                    h.value_at_quantile(q) as f64 / 1e9
                );
            }
            let _ = writeln!(out, "{n}_count{{topic=\"{}\"}} {}", t.topic, h.len());
        }
    }
    {
        let c = state.cache.counters();
        for (n, help, v) in [
            (
                "tickwire_cache_redis_writes_total",
                "Cache keys written to Redis.",
                &c.redis_writes,
            ),
            (
                "tickwire_cache_redis_errors_total",
                "Redis calls of the cache that failed or timed out.",
                &c.redis_errors,
            ),
            (
                "tickwire_cache_redis_hits_total",
                "REST reads answered from Redis (symbols another node holds).",
                &c.redis_hits,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {n} {help}\n# TYPE {n} counter\n{n} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let mode = state.cache.mode();
        let _ = writeln!(
            out,
            "# HELP tickwire_cache_redis_up 1 when the cache writes to Redis, 0 when Redis is configured but unreachable (the node serves from its own copy).\n# TYPE tickwire_cache_redis_up gauge\ntickwire_cache_redis_up {}",
            u8::from(mode == "redis")
        );
    }
    for (n, help, v) in state.engine.counters() {
        let _ = writeln!(out, "# HELP {n} {help}\n# TYPE {n} counter\n{n} {v}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// axum's `Path`, with a parameter that does not decode (a symbol that is
/// not UTF-8, a name that does not parse) answered as every other bad
/// parameter: 400 with the JSON error naming it, not axum's plain text.
struct Path<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S>
    for Path<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(t)) => Ok(Path(t)),
            Err(e) => {
                let field = match &e {
                    PathRejection::FailedToDeserializePathParams(f) => match f.kind() {
                        ErrorKind::InvalidUtf8InPathParam { key }
                        | ErrorKind::ParseErrorAtKey { key, .. } => key.clone(),
                        _ => "path".into(),
                    },
                    _ => "path".into(),
                };
                Err(ApiError::invalid(field, e.body_text()))
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LatestQuery {
    exchange: Option<String>,
    currency: Option<String>,
    topic: Option<String>,
}

fn nonempty(field: &str, v: &Option<String>, max: usize) -> Result<(), ApiError> {
    match v {
        Some(s) if s.is_empty() || s.len() > max => Err(ApiError::invalid(
            field,
            format!("{}: 1 to {max} bytes", quoted(s)),
        )),
        _ => Ok(()),
    }
}

/// Checks an instrument's path symbol and its `exchange`/`currency`
/// parameters against the symbology's field sizes.
fn instrument_params(
    symbol: &str,
    exchange: &Option<String>,
    currency: &Option<String>,
) -> Result<(), ApiError> {
    use tickwire_proto::symbology::{MAX_CURRENCY, MAX_EXCHANGE, MAX_SYMBOL};
    if symbol.is_empty() || symbol.len() > MAX_SYMBOL {
        return Err(ApiError::invalid(
            "symbol",
            format!("{}: 1 to {MAX_SYMBOL} bytes", quoted(symbol)),
        ));
    }
    nonempty("exchange", exchange, MAX_EXCHANGE)?;
    nonempty("currency", currency, MAX_CURRENCY)
}

async fn latest(
    State(state): S,
    headers: HeaderMap,
    Path(symbol): Path<String>,
    query: Result<Query<LatestQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    instrument_params(&symbol, &q.exchange, &q.currency)?;
    let topic = q
        .topic
        .clone()
        .unwrap_or_else(|| state.default_topic.clone());
    state.auth.allow(k.as_deref(), &topic, Right::Read)?;
    let t = state.hub.topic(&topic)?;
    let sym = state.hub.symbology()?;
    let mut best: Option<(u32, crate::dispatch::Latest)> = None;
    let mut venues = Vec::new();
    {
        let latest = t
            .latest
            .lock()
            .map_err(|_| ApiError::internal("latest table poisoned"))?;
        for id in sym.ids_of(&symbol) {
            let Some(e) = sym.get(id) else { continue };
            if q.exchange.as_deref().is_some_and(|x| x != e.exchange())
                || q.currency.as_deref().is_some_and(|c| c != e.currency())
            {
                continue;
            }
            let Some(l) = latest.get(&id) else { continue };
            venues.push(e.exchange());
            if best.is_none_or(|(_, b)| l.body().ts_event() > b.body().ts_event()) {
                best = Some((id, *l));
            }
        }
    }
    let Some((id, l)) = best else {
        return cached_latest(&state, &symbol, &q).await;
    };
    let e = sym
        .get(id)
        .ok_or_else(|| ApiError::internal("symbology entry vanished"))?;
    venues.sort();
    venues.dedup();
    Ok(Json(latest_json(&topic, e, &l, &venues)).into_response())
}

/// `latest:{symbol}` from the cache (Redis: another node holds the
/// symbol's partition), when this node has none; 404 otherwise.
async fn cached_latest(
    state: &EdgeState,
    symbol: &str,
    q: &LatestQuery,
) -> Result<Response, ApiError> {
    // Narrowed by venue or currency, the answer says so: AAPL exists,
    // just not on that venue.
    let not_found = || {
        let narrowed: Vec<String> = [("exchange", &q.exchange), ("currency", &q.currency)]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} {v}")))
            .collect();
        ApiError::NotFound {
            what: "symbol",
            name: if narrowed.is_empty() {
                symbol.to_string()
            } else {
                format!("{symbol} ({})", narrowed.join(", "))
            },
        }
    };
    let Some((text, crate::cache::Source::Redis)) =
        state.cache.get(&format!("latest:{symbol}")).await
    else {
        return Err(not_found());
    };
    /// The fields a cached answer is narrowed by.
    #[derive(Deserialize)]
    struct Cached {
        data: CachedData,
    }
    #[derive(Deserialize)]
    struct CachedData {
        exchange: String,
        currency: String,
    }
    let (Ok(Cached { data }), Some(rest)) = (
        serde_json::from_str::<Cached>(&text),
        text.trim_start().strip_prefix('{'),
    ) else {
        tracing::warn!(
            symbol,
            "cache: latest:{{symbol}} in Redis is not a latest answer; ignored"
        );
        return Err(not_found());
    };
    if q.exchange.as_ref().is_some_and(|x| *x != data.exchange)
        || q.currency.as_ref().is_some_and(|c| *c != data.currency)
    {
        return Err(not_found());
    }
    // The cached text as it is (a tree would turn its decimals into
    // floats), marked as the cache's: `cache` sorts before `data`.
    let body = format!(r#"{{"cache":"redis",{rest}"#);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The spec's `LatestDataResponse` for the latest event `l` of instrument
/// `e` in `topic` (REST latest, and `latest:{symbol}` in the cache).
/// Fields are declared in alphabetical order, the order a
/// JSON object tree would print them, and serialize straight into the
/// response body: no tree of maps is built per request.
#[derive(serde::Serialize)]
pub(crate) struct LatestJson<'a> {
    data: LatestData<'a>,
    message_id: String,
    partition: u32,
    sequence: u64,
    source: &'a str,
    symbol: &'a str,
    timestamp: String,
    topic: &'a str,
    venues: &'a [&'a str],
}

/// `data` of [`LatestJson`]: a quote has the bid and ask fields, any other
/// kind `price` and `volume` (`null` where the event has no price).
#[derive(serde::Serialize)]
struct LatestData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    ask_price: Option<Option<Decimal>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ask_size: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bid_price: Option<Option<Decimal>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bid_size: Option<Decimal>,
    currency: &'a str,
    exchange: &'a str,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<Option<Decimal>>,
    symbol: &'a str,
    timestamp: String,
    timestamp_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    volume: Option<Decimal>,
}

/// [`LatestJson`] of `l`, the latest event of `e`, seen on `venues`.
pub(crate) fn latest_json<'a>(
    topic: &'a str,
    e: &'a tickwire_proto::symbology::Entry,
    l: &crate::dispatch::Latest,
    venues: &'a [&'a str],
) -> LatestJson<'a> {
    let b = l.body();
    let decimals = e.size_decimals();
    let timestamp = rfc3339(b.ts_event());
    let mut data = LatestData {
        ask_price: None,
        ask_size: None,
        bid_price: None,
        bid_size: None,
        currency: e.currency(),
        exchange: e.exchange(),
        kind: b.kind().map_or("unknown", tickwire_proto::Kind::name),
        price: None,
        symbol: e.symbol(),
        timestamp: timestamp.clone(),
        timestamp_ns: b.ts_event(),
        volume: None,
    };
    match b.kind() {
        Some(tickwire_proto::Kind::Quote) => {
            data.bid_price = Some(Decimal::price(b.px_a()));
            data.bid_size = Some(Decimal::size(b.size_a(), decimals));
            data.ask_price = Some(Decimal::price(b.px_b()));
            data.ask_size = Some(Decimal::size(b.size_b(), decimals));
        }
        _ => {
            data.price = Some(Decimal::price(b.px_a()));
            data.volume = Some(Decimal::size(b.size_a(), decimals));
        }
    }
    LatestJson {
        data,
        message_id: format!("{}:{}:{}", l.partition, l.epoch, l.seq),
        partition: l.partition,
        sequence: l.seq,
        source: e.exchange(),
        symbol: e.symbol(),
        timestamp,
        topic,
        venues,
    }
}

/// Bytes a WebSocket connection reads at a time (not a limit on what a
/// client may send: that is `max_request_bytes`).
const WS_READ_CHUNK: usize = 4096;

async fn ws(
    State(state): S,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    let upgrade = upgrade.map_err(|e| ApiError::invalid("upgrade", e.body_text()))?;
    let permit = state
        .ws_connections
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::Limit(format!(
                "{} WebSocket connections are open",
                state.config.max_ws_connections
            ))
        })?;
    let max = state.config.max_request_bytes;
    Ok(upgrade
        .max_message_size(max)
        .max_frame_size(max)
        // Clients send a few small requests; tungstenite zero-fills this
        // much of its read buffer on every read attempt, and the writer
        // polls for a request each time it wakes to send (128 KiB by
        // default: 13% of the server core at 2M fan-out deliveries/s).
        .read_buffer_size(WS_READ_CHUNK)
        .on_upgrade(move |socket| async move {
            crate::stream::ws::serve(socket, state, k).await;
            drop(permit);
        }))
}

async fn list_topics(State(state): S, headers: HeaderMap) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    let topics: Vec<serde_json::Value> = crate::admin::list_topics(&state)
        .into_iter()
        .filter(|t| {
            state
                .auth
                .allow(k.as_deref(), &t.topic, Right::Read)
                .is_ok()
        })
        .map(|t| topic_json(&t))
        .collect();
    Ok(Json(serde_json::json!({ "topics": topics })).into_response())
}

fn topic_json(t: &pb::TopicInfo) -> serde_json::Value {
    serde_json::json!({
        "topic": t.topic, "partitions": t.partitions, "capacity": t.capacity,
        "retention_policy": t.retention_policy, "enabled": t.enabled, "origin": t.origin,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTopic {
    topic: String,
    partitions: u32,
    #[serde(default)]
    capacity: Option<u64>,
    #[serde(default)]
    retention_policy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateTopic {
    partitions: u32,
}

fn json_body<T: serde::de::DeserializeOwned>(
    r: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    r.map(|Json(v)| v).map_err(|e| {
        if let axum::extract::rejection::JsonRejection::MissingJsonContentType(_) = e {
            return ApiError::invalid(
                "content-type",
                "the body must be JSON, sent with content-type: application/json",
            );
        }
        let text = e.body_text();
        let field = text
            .split('`')
            .nth(1)
            .map_or("body".to_string(), str::to_string);
        ApiError::invalid(field, text)
    })
}

async fn create_topic(
    State(state): S,
    headers: HeaderMap,
    body: Result<Json<CreateTopic>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    let c = json_body(body)?;
    state.auth.allow(k.as_deref(), &c.topic, Right::Admin)?;
    let t = crate::admin::create_topic(
        &state,
        pb::CreateTopicRequest {
            topic: c.topic,
            partitions: c.partitions,
            capacity: c.capacity.unwrap_or(0),
            retention_policy: c.retention_policy.unwrap_or_default(),
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(topic_json(&t))).into_response())
}

async fn grow_topic(
    State(state): S,
    headers: HeaderMap,
    Path(topic): Path<String>,
    body: Result<Json<UpdateTopic>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    state.auth.allow(k.as_deref(), &topic, Right::Admin)?;
    let u = json_body(body)?;
    let t = crate::admin::grow_topic(&state, &topic, u.partitions).await?;
    Ok(Json(topic_json(&t)).into_response())
}

async fn get_topic(
    State(state): S,
    headers: HeaderMap,
    Path(topic): Path<String>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    state.auth.allow(k.as_deref(), &topic, Right::Read)?;
    crate::admin::list_topics(&state)
        .into_iter()
        .find(|t| t.topic == topic)
        .map(|t| Json(topic_json(&t)).into_response())
        .ok_or(ApiError::NotFound {
            what: "topic",
            name: topic,
        })
}

async fn delete_topic(
    State(state): S,
    headers: HeaderMap,
    Path(topic): Path<String>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    state.auth.allow(k.as_deref(), &topic, Right::Admin)?;
    crate::admin::delete_topic(&state, &topic).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) fn stats_json(s: &pb::TopicStats) -> serde_json::Value {
    let l = s.latency.unwrap_or_default();
    serde_json::json!({
        "topic": s.topic, "partitions": s.partitions, "events": s.events, "bytes": s.bytes,
        "events_per_sec": s.events_per_sec, "subscribers": s.subscribers,
        "delivered": s.delivered, "dropped": s.dropped,
        "latency_us": {"p50": l.p50_us, "p99": l.p99_us, "p999": l.p999_us, "max": l.max_us},
    })
}

async fn topic_stats(
    State(state): S,
    headers: HeaderMap,
    Path(topic): Path<String>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    state.auth.allow(k.as_deref(), &topic, Right::Read)?;
    Ok(Json(stats_json(&crate::admin::topic_stats(&state, &topic)?)).into_response())
}

async fn distribution(State(state): S, headers: HeaderMap) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    let mut out = Vec::new();
    for t in state.engine.topics() {
        if state.auth.allow(k.as_deref(), &t.name, Right::Read).is_ok() {
            out.push(stats_json(&crate::admin::topic_stats(&state, &t.name)?));
        }
    }
    Ok(Json(serde_json::json!({ "topics": out, "timestamp": rfc3339(tickwire_proto::futex::realtime_ns()) })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsQuery {
    topic: Option<String>,
    start_time: Option<String>,
    end_time: Option<String>,
    limit: Option<String>,
    /// Only for `/stats/deliveries`.
    status: Option<String>,
}

/// A checked query-side range request: the topic (read access checked),
/// `[start, end)` (default the last hour) and the row limit.
struct RangeRequest {
    topic: String,
    start: u64,
    end: u64,
    limit: i64,
}

fn range_request(
    state: &EdgeState,
    headers: &HeaderMap,
    q: &MetricsQuery,
) -> Result<RangeRequest, ApiError> {
    let k = key(state, headers)?;
    let topic = q
        .topic
        .clone()
        .unwrap_or_else(|| state.default_topic.clone());
    state.auth.allow(k.as_deref(), &topic, Right::Read)?;
    let end = match q.end_time.as_deref() {
        Some(v) => time_param("end_time", v)?,
        None => tickwire_proto::futex::realtime_ns(),
    };
    let start = match q.start_time.as_deref() {
        Some(v) => time_param("start_time", v)?,
        None => end.saturating_sub(3_600_000_000_000),
    };
    if start >= end {
        return Err(ApiError::invalid(
            "start_time",
            format!("{} is not before end_time {}", rfc3339(start), rfc3339(end)),
        ));
    }
    let limit = match q.limit.as_deref() {
        None => 10_000,
        Some(l) => match l.parse::<i64>() {
            Ok(n) if (1..=100_000).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(
                    "limit",
                    format!("{l:?}: 1 to 100000 rows"),
                ));
            }
        },
    };
    Ok(RangeRequest {
        topic,
        start,
        end,
        limit,
    })
}

impl RangeRequest {
    /// The answer: the range, then the rows under `name`.
    fn answer(&self, name: &str, rows: Vec<serde_json::Value>) -> Response {
        let mut body = serde_json::json!({
            "topic": self.topic,
            "start_time": rfc3339(self.start),
            "end_time": rfc3339(self.end),
            "count": rows.len(),
        });
        body[name] = serde_json::Value::Array(rows);
        Json(body).into_response()
    }
}

fn store_unreadable(e: crate::store::StoreError) -> ApiError {
    tracing::warn!(error = %e, "the query-side store cannot be read");
    ApiError::Unavailable("the query-side store cannot be read now".into())
}

/// `GET /api/v1/stats/metrics`: a topic's `distribution_metrics_ts` rows
/// in a time range (default the last hour), oldest first.
async fn metrics_range(
    State(state): S,
    headers: HeaderMap,
    query: Result<Query<MetricsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    if q.status.is_some() {
        return Err(ApiError::invalid(
            "status",
            "metrics rows have no status (it filters /api/v1/stats/deliveries)",
        ));
    }
    let r = range_request(&state, &headers, &q)?;
    let rows = state
        .store()?
        .metrics(&r.topic, r.start as i64, r.end as i64, r.limit)
        .await
        .map_err(store_unreadable)?;
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "timestamp": rfc3339(r.ts_ns.max(0) as u64), "topic_name": r.topic_name,
                "partition_id": r.partition_id, "throughput_per_second": r.throughput_per_second,
                "latency_p50_ms": r.latency_p50_ms, "latency_p99_ms": r.latency_p99_ms,
                "error_rate": r.error_rate, "backlog_size": r.backlog_size,
                "consumer_count": r.consumer_count, "producer_count": r.producer_count,
            })
        })
        .collect();
    Ok(r.answer("metrics", rows))
}

/// `GET /api/v1/stats/deliveries`: a topic's `message_delivery_log` rows
/// (every failed delivery, a sample of successful ones) in a time range
/// (default the last hour), oldest first, optionally of one `status`.
async fn deliveries(
    State(state): S,
    headers: HeaderMap,
    query: Result<Query<MetricsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let r = range_request(&state, &headers, &q)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s @ ("delivered" | "failed")) => Some(s),
        Some(other) => {
            return Err(ApiError::invalid(
                "status",
                format!(
                    "{} is not a delivery status (delivered, failed)",
                    quoted(other)
                ),
            ));
        }
    };
    let rows = state
        .store()?
        .deliveries(&r.topic, r.start as i64, r.end as i64, status, r.limit)
        .await
        .map_err(store_unreadable)?;
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|d| {
            serde_json::json!({
                "timestamp": rfc3339(d.ts_ns.max(0) as u64), "message_id": d.message_id,
                "partition_id": d.partition_id, "offset_position": d.offset_position,
                "delivery_latency_ms": d.delivery_latency_ms, "status": d.status,
                "error_message": d.error_message,
            })
        })
        .collect();
    Ok(r.answer("deliveries", rows))
}

pub(crate) fn sub_json(s: &pb::SubscriptionStats) -> serde_json::Value {
    let status = pb::SubscriptionStatus::try_from(s.status).map_or("ERROR", |x| {
        x.as_str_name().trim_start_matches("SUBSCRIPTION_STATUS_")
    });
    serde_json::json!({
        "subscription_id": s.subscription_id, "topic": s.topic, "subscription": s.subscription,
        "status": status, "delivered": s.delivered, "dropped": s.dropped, "gaps": s.gaps,
        "conflated": s.conflated, "lag": s.lag, "rate_per_sec": s.rate_per_sec,
        "connections": s.connections,
        "last_activity": (s.last_activity_ns > 0).then(|| rfc3339(s.last_activity_ns as u64)),
        "created_at": rfc3339(s.created_at_ns as u64),
        "subscription_type": (!s.subscription_type.is_empty()).then_some(&s.subscription_type),
        "delivery_mode": (!s.delivery_mode.is_empty()).then_some(&s.delivery_mode),
        "unacked": s.unacked, "acked": s.acked, "redelivered": s.redelivered, "dead_lettered": s.dead_lettered,
        "backlog": s.backlog,
        "cursors": s.cursors.iter().map(|c| serde_json::json!({"partition": c.partition, "next_sequence": c.sequence})).collect::<Vec<_>>(),
        "consumers": s.consumers.iter().map(|c| serde_json::json!({
            "consumer_name": c.consumer_name, "priority_level": c.priority_level,
            "unacked": c.unacked, "receiver_queue_size": c.receiver_queue_size,
            "hash_slots": c.hash_slots, "active_partitions": c.active_partitions,
            "draining": c.draining, "delivered": c.delivered, "acked": c.acked,
        })).collect::<Vec<_>>(),
    })
}

async fn list_subscriptions(State(state): S, headers: HeaderMap) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    let subs: Vec<_> = state
        .subscriptions
        .all(&state.groups)
        .iter()
        .filter(|s| {
            state
                .auth
                .allow(k.as_deref(), &s.topic, Right::Read)
                .is_ok()
        })
        .map(sub_json)
        .collect();
    Ok(Json(serde_json::json!({ "subscriptions": subs })).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CreateSubscription {
    topic: String,
    subscription: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    symbols: Vec<String>,
    data_types: Vec<String>,
    filters: Option<serde_json::Value>,
    start_position: Option<String>,
    policy: Option<String>,
    delivery_mode: Option<String>,
}

fn enum_field<E: Copy>(
    field: &str,
    v: Option<&str>,
    names: &[(&str, E)],
    default: E,
) -> Result<E, ApiError> {
    match v {
        None => Ok(default),
        Some(s) => names
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(s))
            .map(|&(_, e)| e)
            .ok_or_else(|| {
                let all: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
                ApiError::invalid(
                    field,
                    format!("{} is not one of {}", quoted(s), all.join(", ")),
                )
            }),
    }
}

async fn create_subscription(
    State(state): S,
    headers: HeaderMap,
    body: Result<Json<CreateSubscription>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    let c = json_body(body)?;
    let topic = state.topic_or_default(&c.topic);
    state.auth.allow(k.as_deref(), &topic, Right::Admin)?;
    use pb::{
        DeliveryMode as D, MessagePosition as M, SlowConsumerPolicy as P, SubscriptionType as T,
    };
    let filters = match c.filters {
        None => None,
        Some(v) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields, default)]
            #[derive(Default)]
            struct F {
                exchanges: Vec<String>,
                currencies: Vec<String>,
                min_price: Option<f64>,
                max_price: Option<f64>,
                min_volume: Option<i64>,
            }
            let f: F = serde_json::from_value(v)
                .map_err(|e| ApiError::invalid("filters", e.to_string()))?;
            Some(pb::FilterCriteria {
                exchanges: f.exchanges,
                currencies: f.currencies,
                min_price: f.min_price,
                max_price: f.max_price,
                min_volume: f.min_volume,
            })
        }
    };
    let r = pb::SubscriptionRequest {
        topic,
        subscription: c.subscription,
        r#type: enum_field(
            "type",
            c.kind.as_deref(),
            &[
                ("Exclusive", T::Exclusive),
                ("Shared", T::Shared),
                ("Failover", T::Failover),
                ("KeyShared", T::KeyShared),
                ("Key_Shared", T::KeyShared),
            ],
            T::Exclusive,
        )? as i32,
        filters,
        start_position: enum_field(
            "start_position",
            c.start_position.as_deref(),
            &[("Latest", M::Latest), ("Earliest", M::Earliest)],
            M::Latest,
        )? as i32,
        action: pb::SubscriptionAction::Create as i32,
        symbols: c.symbols,
        data_types: c.data_types,
        policy: enum_field(
            "policy",
            c.policy.as_deref(),
            &[
                ("drop", P::Drop),
                ("conflate", P::Conflate),
                ("disconnect", P::Disconnect),
            ],
            P::Drop,
        )? as i32,
        delivery_mode: enum_field(
            "delivery_mode",
            c.delivery_mode.as_deref(),
            &[
                ("at_most_once", D::AtMostOnce),
                ("at_least_once", D::AtLeastOnce),
                ("exactly_once", D::ExactlyOnce),
            ],
            D::AtMostOnce,
        )? as i32,
        ..Default::default()
    };
    let resp = state.subscriptions.manage(&state, r).await?;
    let stats = resp.stats.unwrap_or_default();
    Ok((StatusCode::CREATED, Json(sub_json(&stats))).into_response())
}

async fn subscription_stats(
    State(state): S,
    headers: HeaderMap,
    Path((topic, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    state.auth.allow(k.as_deref(), &topic, Right::Read)?;
    Ok(Json(sub_json(&state.subscriptions.stats(
        &state.groups,
        &topic,
        &name,
    )?))
    .into_response())
}

async fn delete_subscription(
    State(state): S,
    headers: HeaderMap,
    Path((topic, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    state.auth.allow(k.as_deref(), &topic, Right::Admin)?;
    state.subscriptions.delete(&state, &topic, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn set_paused(
    state: Arc<EdgeState>,
    headers: HeaderMap,
    topic: String,
    name: String,
    pause: bool,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    state.auth.allow(k.as_deref(), &topic, Right::Admin)?;
    let action = if pause {
        pb::SubscriptionAction::Pause
    } else {
        pb::SubscriptionAction::Resume
    };
    let r = state
        .subscriptions
        .manage(
            &state,
            pb::SubscriptionRequest {
                topic,
                subscription: name,
                action: action as i32,
                ..Default::default()
            },
        )
        .await?;
    Ok(Json(sub_json(&r.stats.unwrap_or_default())).into_response())
}

/// `POST .../reset`: where an at-least-once group's cursor goes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ResetBody {
    /// `earliest`, `latest`, `message_id` or `timestamp`.
    position: Option<String>,
    /// For `message_id`: `"<partition>:<epoch>:<sequence>"`, one per partition.
    message_ids: Vec<String>,
    /// For `timestamp`: RFC 3339.
    time: Option<String>,
}

/// Moves a subscription group's cursor; its consumers are ended and resume
/// there when they join again.
async fn reset(
    State(state): S,
    headers: HeaderMap,
    Path((topic, name)): Path<(String, String)>,
    body: Result<Json<ResetBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    state.auth.allow(k.as_deref(), &topic, Right::Admin)?;
    let b = json_body(body)?;
    use pb::MessagePosition as M;
    let position = enum_field(
        "position",
        b.position.as_deref(),
        &[
            ("earliest", M::Earliest),
            ("latest", M::Latest),
            ("message_id", M::MessageId),
            ("timestamp", M::Timestamp),
        ],
        M::Earliest,
    )?;
    let mut ids = Vec::with_capacity(b.message_ids.len());
    for (i, id) in b.message_ids.iter().enumerate() {
        let (partition, sequence) =
            crate::stream::ws::parse_message_id(&format!("message_ids[{i}]"), id)?;
        ids.push(pb::MessageId {
            partition,
            epoch: 0,
            sequence,
        });
    }
    let start_time_ns = match b.time.as_deref() {
        Some(t) => crate::bars::parse_time(t).map_err(|e| ApiError::invalid("time", e))?,
        None => 0,
    };
    let r = state
        .subscriptions
        .manage(
            &state,
            pb::SubscriptionRequest {
                topic,
                subscription: name,
                action: pb::SubscriptionAction::Reset as i32,
                start_position: position as i32,
                start_message_ids: ids,
                start_time_ns,
                ..Default::default()
            },
        )
        .await?;
    let mut v = r
        .stats
        .as_ref()
        .map(sub_json)
        .unwrap_or_else(|| serde_json::json!({}));
    v["subscription_id"] = serde_json::json!(r.subscription_id);
    v["message"] = serde_json::json!(r.message);
    Ok(Json(v).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DeadLetterQuery {
    limit: Option<String>,
}

/// A subscription group's dead letters: events given up on after the most
/// redeliveries it allows, with the reason, oldest first.
async fn dead_letters(
    State(state): S,
    headers: HeaderMap,
    Path((topic, name)): Path<(String, String)>,
    Query(q): Query<DeadLetterQuery>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    state.auth.allow(k.as_deref(), &topic, Right::Read)?;
    let limit = match q.limit.as_deref() {
        None => 1000,
        Some(l) => match l.parse::<u32>() {
            Ok(n @ 1..=10_000) => n,
            _ => {
                return Err(ApiError::invalid(
                    "limit",
                    format!("{l:?}: a number from 1 to 10000"),
                ));
            }
        },
    };
    let rows = state
        .store()?
        .dead_letters(&crate::group::subscription_id(&topic, &name), limit)
        .await?;
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "message_id": r.message_id, "partition": r.partition, "sequence": r.sequence,
                "deliveries": r.deliveries, "reason": r.reason, "created_at": r.created_at,
                "event": serde_json::from_str::<serde_json::Value>(&r.event).unwrap_or(serde_json::Value::Null),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "subscription_id": crate::group::subscription_id(&topic, &name),
        "count": items.len(),
        "dead_letters": items,
    }))
    .into_response())
}

async fn pause(
    State(state): S,
    headers: HeaderMap,
    Path((topic, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    set_paused(state, headers, topic, name, true).await
}

async fn resume(
    State(state): S,
    headers: HeaderMap,
    Path((topic, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    set_paused(state, headers, topic, name, false).await
}

async fn list_rules(State(state): S, headers: HeaderMap) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    let rules: Vec<_> = crate::admin::list_rules(&state)
        .await?
        .into_iter()
        .filter(|r| {
            state
                .auth
                .allow(k.as_deref(), &r.target_topic, Right::Admin)
                .is_ok()
        })
        .collect();
    Ok(Json(serde_json::json!({ "rules": rules })).into_response())
}

async fn create_rule(
    State(state): S,
    headers: HeaderMap,
    body: Result<Json<crate::RoutingRule>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    let rule = json_body(body)?;
    state
        .auth
        .allow(k.as_deref(), &rule.target_topic, Right::Admin)?;
    let r = crate::admin::put_rule(&state, rule, false, |_| Ok(())).await?;
    Ok((StatusCode::CREATED, Json(r)).into_response())
}

async fn replace_rule(
    State(state): S,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Json<crate::RoutingRule>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    let rule = json_body(body)?;
    if rule.rule_name != name {
        return Err(ApiError::invalid(
            "rule_name",
            format!(
                "{} differs from the path's {}",
                quoted(&rule.rule_name),
                quoted(&name)
            ),
        ));
    }
    state
        .auth
        .allow(k.as_deref(), &rule.target_topic, Right::Admin)?;
    let r = crate::admin::put_rule(&state, rule, true, |old| {
        state
            .auth
            .allow(k.as_deref(), &old.target_topic, Right::Admin)
    })
    .await?;
    Ok(Json(r).into_response())
}

async fn delete_rule(
    State(state): S,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    crate::admin::delete_rule(&state, &name, |old| {
        state
            .auth
            .allow(k.as_deref(), &old.target_topic, Right::Admin)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    start_time: Option<String>,
    end_time: Option<String>,
    interval: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    exchange: Option<String>,
    currency: Option<String>,
    topic: Option<String>,
}

/// A time parameter: RFC 3339 (`2026-12-02T09:30:00Z`) or UTC ns since 1970.
fn time_param(field: &str, v: &str) -> Result<u64, ApiError> {
    crate::bars::parse_time(v).map_err(|why| ApiError::invalid(field, why))
}

/// The checked parameters of a history request.
fn history_params(q: &HistoryQuery, now_ns: u64) -> Result<crate::bars::BarQuery, ApiError> {
    use crate::bars::{DEFAULT_BARS, MAX_BARS, max_range_ns};
    use tickwire_proto::bars::Interval;
    let interval = match q.interval.as_deref() {
        None => Interval::M1,
        Some(i) => Interval::parse(i).ok_or_else(|| {
            ApiError::invalid(
                "interval",
                format!("{} is not an interval (1m, 5m, 1h, 1d)", quoted(i)),
            )
        })?,
    };
    let limit = match q.limit.as_deref() {
        None => DEFAULT_BARS,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_BARS).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(
                    "limit",
                    format!("{l:?}: a number of bars from 1 to {MAX_BARS}"),
                ));
            }
        },
    };
    let end = match q.end_time.as_deref() {
        None => now_ns,
        Some(v) => time_param("end_time", v)?,
    };
    let start = match q.start_time.as_deref() {
        // The last `limit` bars.
        None => end.saturating_sub((limit as u64).saturating_mul(interval.ns())),
        Some(v) => time_param("start_time", v)?,
    };
    if start >= end {
        return Err(ApiError::invalid(
            "start_time",
            format!("{} is not before end_time {}", rfc3339(start), rfc3339(end)),
        ));
    }
    let most = max_range_ns(interval);
    if end - start > most {
        return Err(ApiError::invalid(
            "end_time",
            format!(
                "the range {} .. {} is longer than one request may cover with {} bars ({}); ask for a shorter range or a longer interval",
                rfc3339(start),
                rfc3339(end),
                interval.name(),
                humantime::format_duration(std::time::Duration::from_nanos(most))
            ),
        ));
    }
    // A cursor (from a page's `next_cursor`) continues the same range.
    let from = match q.cursor.as_deref() {
        None => start,
        Some(c) => match c.parse::<u64>() {
            Ok(n) if (start..end).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(
                    "cursor",
                    format!(
                        "{} is not a cursor of this range (a page's next_cursor)",
                        quoted(c)
                    ),
                ));
            }
        },
    };
    Ok(crate::bars::BarQuery {
        interval,
        from_ns: from,
        to_ns: end,
        limit,
    })
}

/// `GET /api/v1/market-data/{symbol}/history`: the spec's
/// `HistoricalDataResponse`, bars of one instrument.
async fn history(
    State(state): S,
    headers: HeaderMap,
    Path(symbol): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let k = key(&state, &headers)?;
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    instrument_params(&symbol, &q.exchange, &q.currency)?;
    let bq = history_params(&q, tickwire_proto::futex::realtime_ns())?;
    let topic = q
        .topic
        .clone()
        .unwrap_or_else(|| state.default_topic.clone());
    state.auth.allow(k.as_deref(), &topic, Right::Read)?;
    if !state.engine.topics().iter().any(|t| t.name == topic) {
        return Err(ApiError::NotFound {
            what: "topic",
            name: topic,
        });
    }
    let Some(dir) = state.engine.bars_dir() else {
        return Err(ApiError::Unavailable(
            "this node keeps no history (history.enabled or journal.enabled is false)".into(),
        ));
    };
    let sym = state.hub.symbology()?;
    let found =
        crate::bars::instruments(&sym, &symbol, q.exchange.as_deref(), q.currency.as_deref());
    let (id, entry) = match found.as_slice() {
        [] => {
            return Err(ApiError::NotFound {
                what: "symbol",
                name: symbol,
            });
        }
        [one] => *one,
        many => {
            let mut venues: Vec<String> = many
                .iter()
                .map(|(_, e)| format!("{} {}", e.exchange(), e.currency()))
                .collect();
            venues.sort();
            venues.dedup();
            return Err(ApiError::invalid(
                "exchange",
                format!(
                    "{symbol} is quoted on several venues ({}): name one with exchange= (and currency=)",
                    venues.join(", ")
                ),
            ));
        }
    };
    let (exchange, currency, decimals) = (
        entry.exchange().to_string(),
        entry.currency().to_string(),
        entry.size_decimals(),
    );
    let resampler = state.engine.resampler();
    let open = state.engine.open_bars();
    let t2 = topic.clone();
    let (page, complete) = tokio::task::spawn_blocking(move || {
        crate::bars::query(&dir, &t2, id, &bq, resampler.as_deref(), open.as_deref())
            .map(|p| (p, crate::bars::complete_through(&dir, &t2)))
    })
    .await
    .map_err(ApiError::internal)??;
    // Written by hand: a page is up to 10,000 bars.
    let q = |v: &str| serde_json::to_string(v).unwrap_or_default();
    let mut body = String::with_capacity(256 + page.bars.len() * 240);
    let _ = write!(
        body,
        "{{\"symbol\":{},\"exchange\":{},\"currency\":{},\"topic\":{},\"interval\":\"{}\",\"start_time\":\"{}\",\"end_time\":\"{}\",\"count\":{},\"has_more\":{},\"next_cursor\":{},\"complete_through\":{},\"data\":[",
        q(&symbol),
        q(&exchange),
        q(&currency),
        q(&topic),
        bq.interval.name(),
        rfc3339(bq.from_ns),
        rfc3339(bq.to_ns),
        page.bars.len(),
        page.next_ns.is_some(),
        page.next_ns
            .map_or("null".to_string(), |n| format!("\"{n}\"")),
        complete.map_or("null".to_string(), |c| format!("\"{}\"", rfc3339(c))),
    );
    for (i, b) in page.bars.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        let done = crate::bars::is_complete(b.start_ns, bq.interval, complete);
        crate::bars::write_bar_json(&mut body, b, decimals, done);
    }
    body.push_str("]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[cfg(test)]
mod tests {
    use tickwire_proto::FrameBody;
    use tickwire_proto::symbology::{Instrument, Symbology, SymbologyWriter};

    use super::latest_json;
    use crate::dispatch::Latest;

    #[test]
    fn latest_json_is_the_spec_response_with_exact_decimals_and_null_for_an_absent_price() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = SymbologyWriter::open(dir.path(), 16).expect("open");
        let id = w
            .resolve(&Instrument {
                symbol: "BTC-USD".into(),
                exchange: "COINBASE".into(),
                currency: "USD".into(),
                size_decimals: 8,
            })
            .expect("interned");
        let sym = Symbology::open(dir.path()).expect("reader");
        let e = sym.get(id).expect("entry");
        let venues = ["COINBASE", "KRAKEN"];
        let latest = |body: FrameBody| Latest {
            partition: 2,
            epoch: 3,
            seq: 44,
            words: body.to_words(),
        };
        let quote = latest(FrameBody::quote(
            id,
            1_000_000_123,
            (tickwire_proto::frame::UNDEF_PRICE, 0),
            (65_000_500_000_000, 150_000_000),
        ));
        let text = serde_json::to_string(&latest_json("crypto/spot", e, &quote, &venues))
            .expect("serializes");
        assert_eq!(
            text,
            concat!(
                r#"{"data":{"ask_price":65000.5,"ask_size":1.5,"bid_price":null,"bid_size":0,"#,
                r#""currency":"USD","exchange":"COINBASE","kind":"quote","symbol":"BTC-USD","#,
                r#""timestamp":"1970-01-01T00:00:01.000000123Z","timestamp_ns":1000000123},"#,
                r#""message_id":"2:3:44","partition":2,"sequence":44,"source":"COINBASE","#,
                r#""symbol":"BTC-USD","timestamp":"1970-01-01T00:00:01.000000123Z","#,
                r#""topic":"crypto/spot","venues":["COINBASE","KRAKEN"]}"#
            )
        );
        let trade = latest(FrameBody::trade(id, 0, 12_340_000_000, 1));
        let text = serde_json::to_string(&latest_json("crypto/spot", e, &trade, &venues[..1]))
            .expect("serializes");
        // The decimals' own digits, never a float's `1e-8`.
        assert!(
            text.contains(r#""kind":"trade","price":12.34,"#)
                && text.contains(r#""volume":0.00000001}"#),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert!(v["data"].get("bid_price").is_none(), "{v}");
        assert_eq!(v["venues"], serde_json::json!(["COINBASE"]));
    }
}

//! The spec's cache: latest prices, topic stats, subscriptions, routing
//! rules and backpressure under the spec's keys and TTLs, in Redis when
//! `edge.cache_url` is a `redis://` URL, in process otherwise.
//!
//! | key | value | TTL |
//! | --- | --- | --- |
//! | `latest:{symbol}` | `LatestDataResponse` (the most recent venue) | 1 min |
//! | `topic_stats:{topic}` | the topic's stats | 30 s |
//! | `subscription:{id}` | a subscription's stats | 5 min |
//! | `routing:{pattern}` | the routing rules of a source pattern | 15 min |
//! | `backpressure:{topic}:{partition}` | published, dispatched, backlog | 10 s |
//!
//! A writer task builds the values once per interval (1 s) from what the
//! edge already has, off the hot path, and writes only the keys whose value
//! changed (or whose TTL is half gone) in one pipelined round trip. The
//! in-process copy is always written too: it answers when Redis is not
//! configured or not reachable. A Redis that goes away is logged once,
//! the node serves from its own copy, and the writer reconnects each
//! interval; when it is back, everything current is written again. Ingest
//! never waits for any of it.
//!
//! Reads: REST latest for a symbol this node does not hold (another node
//! owns its partition) is answered from `latest:{symbol}` in Redis.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

/// `latest:{symbol}`.
pub const LATEST_TTL: Duration = Duration::from_secs(60);
/// `topic_stats:{topic}`.
pub const TOPIC_STATS_TTL: Duration = Duration::from_secs(30);
/// `subscription:{id}`.
pub const SUBSCRIPTION_TTL: Duration = Duration::from_secs(300);
/// `routing:{pattern}`.
pub const ROUTING_TTL: Duration = Duration::from_secs(900);
/// `backpressure:{topic}:{partition}`.
pub const BACKPRESSURE_TTL: Duration = Duration::from_secs(10);
/// How long a Redis call may take before the cache counts it as down.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
struct Entry {
    value: String,
    ttl: Duration,
    written: Instant,
}

impl Entry {
    fn expires(&self) -> Instant {
        self.written + self.ttl
    }
}

/// Where a cached value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This node's own copy.
    Local,
    /// Redis (written by this node or another).
    Redis,
}

/// The cache's counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Keys written to Redis.
    pub redis_writes: AtomicU64,
    /// Redis calls that failed or timed out.
    pub redis_errors: AtomicU64,
    /// Reads answered from Redis.
    pub redis_hits: AtomicU64,
}

struct RedisSide {
    client: redis::Client,
    /// Shown in logs: the URL without its password.
    shown: String,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    up: AtomicBool,
}

/// The cache (one per edge).
pub struct Cache {
    local: Mutex<HashMap<String, Entry>>,
    redis: Option<RedisSide>,
    counters: CacheCounters,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("redis", &self.redis.as_ref().map(|r| &r.shown))
            .finish()
    }
}

/// A URL with its password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let auth = &url[s + 3..at];
            match auth.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl Cache {
    /// A cache in Redis at `url` (`redis://` or `rediss://`; nothing is
    /// connected yet), or in process when `url` is empty.
    ///
    /// # Errors
    /// A URL that is not a Redis URL.
    pub fn new(url: &str) -> Result<Cache, String> {
        let redis = if url.is_empty() {
            None
        } else {
            let client = redis::Client::open(url).map_err(|e| {
                format!(
                    "edge.cache_url {:?} is not a Redis URL (redis://host:port/db): {e}",
                    redact(url)
                )
            })?;
            Some(RedisSide {
                client,
                shown: redact(url),
                conn: tokio::sync::Mutex::new(None),
                up: AtomicBool::new(false),
            })
        };
        Ok(Cache {
            local: Mutex::new(HashMap::new()),
            redis,
            counters: CacheCounters::default(),
        })
    }

    /// `redis`, `redis_down` (serving from the node's own copy) or `in_process`.
    pub fn mode(&self) -> &'static str {
        match &self.redis {
            None => "in_process",
            Some(r) if r.up.load(Ordering::Relaxed) => "redis",
            Some(_) => "redis_down",
        }
    }

    /// Counters.
    pub fn counters(&self) -> &CacheCounters {
        &self.counters
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node's own value of `key` and the time it has left.
    pub fn get_local(&self, key: &str) -> Option<(String, Duration)> {
        let now = Instant::now();
        self.locked()
            .get(key)
            .filter(|e| e.expires() > now)
            .map(|e| (e.value.clone(), e.expires() - now))
    }

    /// `key`: the node's own copy, else Redis (when configured and up).
    pub async fn get(&self, key: &str) -> Option<(String, Source)> {
        if let Some((v, _)) = self.get_local(key) {
            return Some((v, Source::Local));
        }
        let r = self.redis.as_ref()?;
        if !r.up.load(Ordering::Relaxed) {
            return None;
        }
        let mut conn = r.conn.lock().await.clone()?;
        let got: Result<Result<Option<String>, _>, _> = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("GET").arg(key).query_async(&mut conn),
        )
        .await;
        match got {
            Ok(Ok(v)) => {
                if v.is_some() {
                    self.counters.redis_hits.fetch_add(1, Ordering::Relaxed);
                }
                v.map(|v| (v, Source::Redis))
            }
            _ => {
                self.counters.redis_errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Writes values: the node's copy at once; of these, the keys whose
    /// value changed or whose TTL is half gone go to Redis in one
    /// pipeline. Returns how many went to Redis.
    pub async fn put(&self, items: Vec<(String, String, Duration)>) -> usize {
        let now = Instant::now();
        let mut changed = Vec::new();
        {
            let mut local = self.locked();
            for (key, value, ttl) in items {
                let fresh = local
                    .get(&key)
                    .is_some_and(|e| e.value == value && now < e.written + e.ttl / 2);
                if fresh {
                    continue;
                }
                local.insert(
                    key.clone(),
                    Entry {
                        value: value.clone(),
                        ttl,
                        written: now,
                    },
                );
                changed.push((key, value, ttl));
            }
            local.retain(|_, e| e.expires() > now);
        }
        let Some(r) = &self.redis else {
            return 0;
        };
        let was_up = r.up.load(Ordering::Relaxed);
        if !self.connect(r).await {
            return 0;
        }
        if !was_up {
            // Back (or first connected): everything current, not just what changed.
            let local = self.locked();
            changed = local
                .iter()
                .map(|(k, e)| {
                    (
                        k.clone(),
                        e.value.clone(),
                        e.expires().saturating_duration_since(now),
                    )
                })
                .filter(|(_, _, ttl)| !ttl.is_zero())
                .collect();
        }
        if changed.is_empty() {
            return 0;
        }
        let mut pipe = redis::pipe();
        for (k, v, ttl) in &changed {
            pipe.cmd("SET")
                .arg(k)
                .arg(v)
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .ignore();
        }
        let Some(mut conn) = r.conn.lock().await.clone() else {
            return 0;
        };
        let done: Result<Result<(), _>, _> =
            tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut conn)).await;
        match done {
            Ok(Ok(())) => {
                self.counters
                    .redis_writes
                    .fetch_add(changed.len() as u64, Ordering::Relaxed);
                if !was_up {
                    tracing::info!(redis = %r.shown, keys = changed.len(), "cache: Redis is up; wrote every current key");
                }
                r.up.store(true, Ordering::Relaxed);
                changed.len()
            }
            Ok(Err(e)) => {
                self.down(r, &e.to_string());
                0
            }
            Err(_) => {
                self.down(r, "timed out");
                0
            }
        }
    }

    /// Makes sure there is a connection (one try per call while down).
    async fn connect(&self, r: &RedisSide) -> bool {
        let mut conn = r.conn.lock().await;
        if conn.is_some() {
            return true;
        }
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        match tokio::time::timeout(
            REDIS_TIMEOUT * 2,
            ConnectionManager::new_with_config(r.client.clone(), cfg),
        )
        .await
        {
            Ok(Ok(c)) => {
                *conn = Some(c);
                true
            }
            Ok(Err(e)) => {
                drop(conn);
                self.down(r, &e.to_string());
                false
            }
            Err(_) => {
                drop(conn);
                self.down(r, "connect timed out");
                false
            }
        }
    }

    fn down(&self, r: &RedisSide, why: &str) {
        self.counters.redis_errors.fetch_add(1, Ordering::Relaxed);
        if r.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(redis = %r.shown, error = why, "cache: Redis is unreachable; serving from this node's own copy and retrying every second (ingest is not affected)");
        } else {
            tracing::debug!(redis = %r.shown, error = why, "cache: Redis still unreachable");
        }
    }

    /// Whether Redis is configured but was never reached (for the first
    /// warning at start).
    pub fn redis_url(&self) -> Option<&str> {
        self.redis.as_ref().map(|r| r.shown.as_str())
    }
}

/// The cache writer: every `every`, the current values of every key, to
/// [`Cache::put`]. Ends with the edge.
pub(crate) async fn run(state: std::sync::Arc<crate::EdgeState>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if let Some(url) = state.cache.redis_url() {
        tracing::info!(redis = %url, "cache: writing the spec's keys to Redis");
    }
    loop {
        tokio::select! {
            () = state.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let items = values(&state).await;
        state.cache.put(items).await;
    }
}

/// Every key's current value.
async fn values(state: &crate::EdgeState) -> Vec<(String, String, Duration)> {
    let mut out = Vec::new();
    let topics = state.engine.topics();
    // latest:{symbol}: the most recent venue across the node's topics.
    if let Ok(sym) = state.hub.symbology() {
        // Per symbol: the newest event's time, topic and event; only the
        // winner is written out.
        let mut best: HashMap<&str, (u64, &str, u32, crate::dispatch::Latest)> = HashMap::new();
        for t in &topics {
            let Ok(shared) = state.hub.topic(&t.name) else {
                continue;
            };
            let latest: Vec<(u32, crate::dispatch::Latest)> = match shared.latest.lock() {
                Ok(l) => l.iter().map(|(k, v)| (*k, *v)).collect(),
                Err(_) => continue,
            };
            for (id, l) in latest {
                let Some(e) = sym.get(id) else { continue };
                let ts = l.body().ts_event();
                if best.get(e.symbol()).is_none_or(|b| b.0 < ts) {
                    best.insert(e.symbol(), (ts, &t.name, id, l));
                }
            }
        }
        for (symbol, (_, topic, id, l)) in best {
            let Some(e) = sym.get(id) else { continue };
            let venues = [e.exchange()];
            if let Ok(text) =
                serde_json::to_string(&crate::rest::latest_json(topic, e, &l, &venues))
            {
                out.push((format!("latest:{symbol}"), text, LATEST_TTL));
            }
        }
    }
    for t in &topics {
        if let Ok(s) = crate::admin::topic_stats(state, &t.name) {
            out.push((
                format!("topic_stats:{}", t.name),
                crate::rest::stats_json(&s).to_string(),
                TOPIC_STATS_TTL,
            ));
        }
        if let Ok(shared) = state.hub.topic(&t.name) {
            let backlog = shared.backlog.lock().map(|b| b.clone()).unwrap_or_default();
            for (p, published, position) in backlog {
                let v = serde_json::json!({
                    "topic": t.name, "partition": p,
                    "published_sequence": published,
                    "dispatched_sequence": position.saturating_sub(1),
                    "backlog": (published + 1).saturating_sub(position),
                });
                out.push((
                    format!("backpressure:{}:{p}", t.name),
                    v.to_string(),
                    BACKPRESSURE_TTL,
                ));
            }
        }
    }
    for s in state.subscriptions.all(&state.groups) {
        out.push((
            format!("subscription:{}", s.subscription_id),
            crate::rest::sub_json(&s).to_string(),
            SUBSCRIPTION_TTL,
        ));
    }
    if let Ok(rules) = crate::admin::list_rules(state).await {
        let mut by: std::collections::BTreeMap<String, Vec<crate::RoutingRule>> =
            std::collections::BTreeMap::new();
        for r in rules {
            by.entry(r.source_pattern.clone()).or_default().push(r);
        }
        for (pattern, rules) in by {
            out.push((
                format!("routing:{pattern}"),
                serde_json::to_string(&rules).unwrap_or_default(),
                ROUTING_TTL,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_shows() {
        assert_eq!(
            redact("redis://user:secret@h:6379/0"),
            "redis://user:***@h:6379/0"
        );
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
        assert!(Cache::new("http://nope").is_err());
        assert!(Cache::new("").is_ok());
    }

    #[tokio::test]
    async fn in_process_values_expire_and_unchanged_ones_are_not_rewritten() {
        let c = Cache::new("").expect("cache");
        let item = |v: &str| vec![("k".to_string(), v.to_string(), Duration::from_millis(200))];
        c.put(item("a")).await;
        let (v, left) = c.get_local("k").expect("there");
        assert_eq!(v, "a");
        assert!(left <= Duration::from_millis(200));
        let w0 = c.locked()["k"].written;
        c.put(item("a")).await;
        assert_eq!(c.locked()["k"].written, w0, "unchanged: not written again");
        c.put(item("b")).await;
        assert_eq!(c.get("k").await, Some(("b".into(), Source::Local)));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(c.get_local("k"), None, "expired");
        assert_eq!(c.mode(), "in_process");
    }
}

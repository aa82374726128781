//! tickwire's remote edge: gRPC (`MarketDataStream`, `TopicManager`,
//! `SubscriptionManager`, reflection, health), REST and WebSocket, all
//! reading the same rings through one fan-out [`dispatch`]er per topic.
//!
//! The edge depends on `proto` and `shm-client`, never on the broker: what
//! it needs from the engine is the small [`Engine`] trait.
//!
//! ```no_run
//! # async fn f(engine: std::sync::Arc<dyn tickwire_api::Engine>) -> Result<(), Box<dyn std::error::Error>> {
//! let cancel = tokio_util::sync::CancellationToken::new();
//! let edge = tickwire_api::Edge::start(tickwire_api::EdgeConfig::default(), engine, cancel.clone()).await?;
//! println!("gRPC on {}, HTTP on {}", edge.grpc_addr, edge.http_addr);
//! cancel.cancel();
//! edge.join().await;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod auth;
pub mod bars;
pub mod cache;
pub mod dispatch;
pub mod error;
pub mod group;
pub mod history;
pub mod rest;
pub mod spec;
pub mod store;
pub mod stream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;

/// A topic as the engine has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDesc {
    /// Name.
    pub name: String,
    /// Partitions.
    pub partitions: u32,
    /// Slots per partition ring.
    pub capacity: u64,
    /// Created at run time through the admin API (else: configured).
    pub runtime: bool,
    /// How long its journal keeps events (`None`: no journal; events live
    /// as long as their ring slots).
    pub retention: Option<std::time::Duration>,
}

impl TopicDesc {
    /// The spec's `retention_policy`: a duration such as `7days`, or
    /// `ring` when there is no journal.
    pub fn retention_policy(&self) -> String {
        self.retention.map_or_else(
            || "ring".to_string(),
            |d| humantime::format_duration(d).to_string(),
        )
    }
}

/// What the edge needs from the engine (the broker implements it).
pub trait Engine: Send + Sync + 'static {
    /// The node directory holding the rings.
    fn node_dir(&self) -> PathBuf;
    /// The topics the node serves.
    fn topics(&self) -> Vec<TopicDesc>;
    /// The topic a request without one means.
    fn default_topic(&self) -> String;
    /// The bar store (`None`: this node builds no bars, so it serves no
    /// history).
    fn bars_dir(&self) -> Option<PathBuf> {
        None
    }
    /// What computes 5m/1h/1d bars from 1m bars (`None`: 1m bars only).
    fn resampler(&self) -> Option<Arc<dyn bars::Resampler>> {
        None
    }
    /// The bar builder's open minutes (`None`: only closed minutes are
    /// served).
    fn open_bars(&self) -> Option<Arc<dyn bars::OpenBars>> {
        None
    }
    /// Checks `rules` (the whole set, in any order) and, unless `dry_run`,
    /// makes them the routing of new events at once.
    ///
    /// # Errors
    /// The first bad rule, as (`rules[i].<field>`, why).
    fn set_routing_rules(
        &self,
        rules: &[RoutingRule],
        dry_run: bool,
    ) -> Result<(), (String, String)> {
        let _ = (rules, dry_run);
        Err(("rules".into(), "this engine has no router".into()))
    }
    /// Creates a topic with `partitions` partitions of `capacity` slots
    /// (`None`: the node default) whose journal keeps `retention` (`None`:
    /// the journal's default); its rings are written from the next event
    /// routed to it. Blocking (creates files, waits for the shards).
    ///
    /// # Errors
    /// [`ApiError::Invalid`] naming the field, [`ApiError::AlreadyExists`],
    /// [`ApiError::Unavailable`] (no room, stopping).
    fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        capacity: Option<u64>,
        retention: Option<std::time::Duration>,
    ) -> Result<TopicDesc, ApiError> {
        let _ = (partitions, capacity, retention);
        Err(ApiError::Unimplemented(format!(
            "this engine cannot create topic {name:?} at run time"
        )))
    }
    /// Grows a topic to `partitions` (never fewer). Blocking.
    ///
    /// # Errors
    /// As [`create_topic`](Self::create_topic); [`ApiError::NotFound`].
    fn grow_topic(&self, name: &str, partitions: u32) -> Result<TopicDesc, ApiError> {
        let _ = partitions;
        Err(ApiError::Unimplemented(format!(
            "this engine cannot grow topic {name:?} at run time"
        )))
    }
    /// Publishes `events` (frame bodies whose instrument ids are this
    /// node's) to `topic`, in order, as a source of its own: each is routed
    /// by the topic's routing key and committed under a new sequence; its
    /// event time, source id and source sequence stay what they were.
    /// Blocking (waits while the shards push back, a few seconds at most).
    ///
    /// # Errors
    /// [`ApiError::NotFound`] (no such topic); [`ApiError::Invalid`] (an
    /// instrument the node does not know); [`ApiError::Unavailable`] (the
    /// shards took nothing for seconds). The events before it were
    /// published.
    fn publish(
        &self,
        topic: &str,
        events: &[[u64; tickwire_proto::frame::BODY_WORDS]],
    ) -> Result<(), ApiError> {
        let _ = events;
        Err(ApiError::Unimplemented(format!(
            "this engine cannot publish to topic {topic:?}"
        )))
    }
    /// Node-wide counters for `/metrics` beyond the edge's own (the
    /// journal's, say): (name, help, value), all counters.
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }
    /// Deletes a topic: its readers are told, its rings removed. Blocking.
    ///
    /// # Errors
    /// [`ApiError::NotFound`]; [`ApiError::Conflict`] for a topic of the
    /// configuration file.
    fn delete_topic(&self, name: &str) -> Result<(), ApiError> {
        Err(ApiError::Unimplemented(format!(
            "this engine cannot delete topic {name:?} at run time"
        )))
    }
}

/// A routing rule (the spec's `routing_rules` row), as REST reads and
/// writes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingRule {
    /// Unique name.
    pub rule_name: String,
    /// Glob over source names (`*`, `?`): a Pulsar topic, or `synthetic`.
    pub source_pattern: String,
    /// A topic of this node.
    pub target_topic: String,
    /// `{symbol}`, `{exchange}`, `{currency}`, `{kind}`; absent keeps the
    /// target topic's own.
    #[serde(default)]
    pub routing_key_template: Option<String>,
    /// What an event must have to match.
    #[serde(default)]
    pub conditions: RuleConditions,
    /// Higher first (default 1).
    #[serde(default = "default_priority")]
    pub priority: i64,
    /// Applied or kept aside (default true).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// RFC 3339, set by the edge.
    #[serde(default, skip_deserializing)]
    pub created_at: String,
}

fn default_priority() -> i64 {
    1
}

fn default_enabled() -> bool {
    true
}

/// A rule's conditions: every list given must contain the event's value
/// (ASCII case ignored); empty or absent lists match anything.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleConditions {
    /// Symbols.
    pub symbols: Vec<String>,
    /// Exchanges.
    pub exchanges: Vec<String>,
    /// Currencies.
    pub currencies: Vec<String>,
    /// `trade`, `quote`.
    pub kinds: Vec<String>,
}

/// `[edge]` configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Serve the edge at all.
    pub enabled: bool,
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP (REST and WebSocket) listen address.
    pub http_addr: SocketAddr,
    /// Connections the kernel queues on each listener until they are
    /// accepted (capped by `net.core.somaxconn`). The standard library's
    /// 128 let a burst of subscribers (every client reconnecting after a
    /// failover) overflow the queue and be reset.
    pub listen_backlog: u32,
    /// Events queued per subscriber before its slow-consumer policy acts.
    pub queue_events: usize,
    /// Bytes queued per subscriber before its slow-consumer policy acts.
    pub queue_bytes: usize,
    /// Bytes queued for all subscribers together: past it, a subscriber
    /// holding 64 KiB or more is full too (one that keeps up holds less and
    /// still gets every frame), so stalled subscribers cannot take the
    /// edge's memory whatever their number.
    pub queue_bytes_total: usize,
    /// Events per batch message.
    pub max_batch: u32,
    /// Open gRPC streams at most.
    pub max_streams: usize,
    /// WebSocket connections at most.
    pub max_ws_connections: usize,
    /// Subscriptions per WebSocket connection.
    pub max_subscriptions_per_connection: usize,
    /// Symbols per subscription.
    pub max_symbols: usize,
    /// Largest request or WebSocket message, bytes.
    pub max_request_bytes: usize,
    /// API keys.
    pub auth: auth::AuthConfig,
    /// The command-side store (topics, subscriptions, distribution stats):
    /// `sqlite://<path>` or `postgres://user:password@host/db`; empty means
    /// `sqlite://<node dir>/command.db` (`tickwire serve` fills it in: a
    /// file on disk when the node directory is a tmpfs).
    pub store_url: String,
    /// Seconds between `distribution_stats` rows (per topic); 0 writes none.
    pub stats_interval_secs: u64,
    /// The spec's cache (`latest:{symbol}`, `topic_stats:{topic}`, ...):
    /// `redis://host:port/db`, or empty for the in-process cache.
    pub cache_url: String,
    /// How often the cache's keys are written (ms): at most once per
    /// interval per changed key.
    pub cache_interval_ms: u64,
    /// Seconds between `distribution_metrics_ts` rows (per topic and
    /// partition); 0 writes none.
    pub metrics_interval_secs: u64,
    /// How long the query side (`distribution_metrics_ts`,
    /// `message_delivery_log`) keeps rows, e.g. `7d`.
    pub metrics_retention: String,
    /// `message_delivery_log` keeps every failed delivery (each gap a
    /// subscriber is told of) and one delivered frame in this many (0:
    /// none): logging each of millions of deliveries a second is not
    /// sensible.
    pub delivery_log_sample: u64,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            enabled: true,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 7070)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7080)),
            listen_backlog: 4096,
            queue_events: 65_536,
            queue_bytes: 16 << 20,
            queue_bytes_total: 1 << 30,
            max_batch: 256,
            max_streams: 4096,
            max_ws_connections: 4096,
            max_subscriptions_per_connection: 64,
            max_symbols: 1024,
            max_request_bytes: 64 * 1024,
            auth: auth::AuthConfig::default(),
            store_url: String::new(),
            stats_interval_secs: 60,
            cache_url: String::new(),
            cache_interval_ms: 1000,
            metrics_interval_secs: 10,
            metrics_retention: "7d".into(),
            delivery_log_sample: 10_000,
        }
    }
}

impl EdgeConfig {
    /// Checks the configuration once.
    ///
    /// # Errors
    /// The key and why.
    pub fn validate(&self) -> Result<(), String> {
        if !self.cache_url.is_empty() {
            cache::Cache::new(&self.cache_url)?;
        }
        if let Err(e) = humantime::parse_duration(&self.metrics_retention) {
            return Err(format!(
                "edge.metrics_retention: {:?} is not a duration such as 7d: {e}",
                self.metrics_retention
            ));
        }
        if self.cache_interval_ms == 0 {
            return Err("edge.cache_interval_ms: must be at least 1".into());
        }
        let loopback = self.grpc_addr.ip().is_loopback() && self.http_addr.ip().is_loopback();
        if !self.auth.enabled && !loopback && !self.auth.allow_unauthenticated_remote {
            return Err(format!(
                "edge: serving {} / {} (not loopback) with auth off is refused: set edge.auth.enabled = true with keys, or edge.auth.allow_unauthenticated_remote = true",
                self.grpc_addr, self.http_addr
            ));
        }
        if self.auth.enabled && self.auth.keys.is_empty() {
            return Err("edge.auth: enabled with no keys: nobody could connect".into());
        }
        for (k, v) in [
            ("listen_backlog", self.listen_backlog as usize),
            ("queue_events", self.queue_events),
            ("queue_bytes", self.queue_bytes),
            ("queue_bytes_total", self.queue_bytes_total),
            ("max_batch", self.max_batch as usize),
            ("max_streams", self.max_streams),
            ("max_ws_connections", self.max_ws_connections),
            (
                "max_subscriptions_per_connection",
                self.max_subscriptions_per_connection,
            ),
            ("max_symbols", self.max_symbols),
            ("max_request_bytes", self.max_request_bytes),
        ] {
            if v == 0 {
                return Err(format!("edge.{k}: must be at least 1"));
            }
        }
        auth::Auth::new(&self.auth)?;
        Ok(())
    }
}

/// Everything the handlers share.
pub struct EdgeState {
    /// Configuration.
    pub config: EdgeConfig,
    /// The engine.
    pub engine: Arc<dyn Engine>,
    /// Dispatchers.
    pub hub: dispatch::Hub,
    /// Keys.
    pub auth: auth::Auth,
    /// Request limits.
    pub limits: spec::RequestLimits,
    /// The default topic.
    pub default_topic: String,
    /// Named subscriptions.
    pub subscriptions: admin::Subscriptions,
    /// Subscription groups running on this node.
    pub groups: group::Groups,
    /// gRPC stream permits.
    pub streams: Arc<Semaphore>,
    /// WebSocket connection permits.
    pub ws_connections: Arc<Semaphore>,
    /// For rates in stats.
    pub rates: Mutex<HashMap<String, (std::time::Instant, u64)>>,
    /// Start time.
    pub started: std::time::Instant,
    /// Shutdown.
    pub cancel: CancellationToken,
    /// One routing-rule change at a time (check, store, apply).
    pub rules_lock: tokio::sync::Mutex<()>,
    /// The command-side store, once [`Edge::start`] has opened it.
    store: std::sync::OnceLock<Arc<store::Store>>,
    /// The spec's cache (Redis or in process).
    pub cache: cache::Cache,
}

impl EdgeState {
    /// The command-side store.
    ///
    /// # Errors
    /// [`ApiError::Unavailable`] before it is open.
    pub fn store(&self) -> Result<&Arc<store::Store>, ApiError> {
        self.store
            .get()
            .ok_or_else(|| ApiError::Unavailable("the command store is not open".into()))
    }

    /// State for a validated configuration.
    ///
    /// # Errors
    /// An invalid configuration.
    pub fn new(
        config: EdgeConfig,
        engine: Arc<dyn Engine>,
        cancel: CancellationToken,
    ) -> Result<Arc<EdgeState>, ApiError> {
        config.validate().map_err(ApiError::Unavailable)?;
        let auth = auth::Auth::new(&config.auth).map_err(ApiError::Unavailable)?;
        let cache = cache::Cache::new(&config.cache_url).map_err(ApiError::Unavailable)?;
        let hub = dispatch::Hub::new(
            engine.node_dir(),
            dispatch::QueueLimits {
                max_events: config.queue_events,
                max_bytes: config.queue_bytes,
                max_bytes_total: config.queue_bytes_total,
                max_batch: config.max_batch,
                delivery_sample: config.delivery_log_sample,
            },
            cancel.clone(),
        );
        Ok(Arc::new(EdgeState {
            limits: spec::RequestLimits {
                max_symbols: config.max_symbols,
            },
            default_topic: engine.default_topic(),
            streams: Arc::new(Semaphore::new(config.max_streams)),
            ws_connections: Arc::new(Semaphore::new(config.max_ws_connections)),
            config,
            engine,
            hub,
            auth,
            subscriptions: admin::Subscriptions::default(),
            groups: group::Groups::default(),
            rates: Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
            cancel,
            rules_lock: tokio::sync::Mutex::new(()),
            store: std::sync::OnceLock::new(),
            cache,
        }))
    }
}

impl EdgeState {
    /// The topic a request names, or the default one when it names none.
    pub fn topic_or_default(&self, topic: &str) -> String {
        if topic.is_empty() {
            self.default_topic.clone()
        } else {
            topic.to_string()
        }
    }
}

/// Errors starting the edge.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// A listen address cannot be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// gRPC or HTTP.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The command-side store cannot be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// A running edge.
pub struct Edge {
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where HTTP listens.
    pub http_addr: SocketAddr,
    /// The shared state.
    pub state: Arc<EdgeState>,
    /// The command-side store.
    pub store: Arc<store::Store>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Subscription groups over shared memory (`<node dir>/control.sock`).
    groups_shm: Option<group::shm::Coordinator>,
}

/// The gRPC server's routes: the three services, reflection and health.
///
/// # Errors
/// A reflection descriptor that does not parse (a build bug).
pub fn grpc_routes(state: Arc<EdgeState>) -> Result<tonic::service::Routes, String> {
    use tickwire_proto::pb;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| e.to_string())?;
    let (health, health_service) = tonic_health::server::health_reporter();
    let max = state.config.max_request_bytes;
    tokio::spawn(async move {
        health.set_serving::<pb::raw::market_data_stream_server::MarketDataStreamServer<stream::grpc::StreamService>>().await;
        health.set_serving::<pb::topic_manager_server::TopicManagerServer<stream::grpc::TopicService>>().await;
        health
            .set_serving::<pb::subscription_manager_server::SubscriptionManagerServer<
                stream::grpc::SubscriptionService,
            >>()
            .await;
    });
    let mut routes = tonic::service::RoutesBuilder::default();
    routes
        .add_service(
            pb::raw::market_data_stream_server::MarketDataStreamServer::new(
                stream::grpc::StreamService::new(state.clone()),
            )
            .max_decoding_message_size(max),
        )
        .add_service(
            pb::topic_manager_server::TopicManagerServer::new(stream::grpc::TopicService::new(
                state.clone(),
            ))
            .max_decoding_message_size(max),
        )
        .add_service(
            pb::subscription_manager_server::SubscriptionManagerServer::new(
                stream::grpc::SubscriptionService::new(state),
            )
            .max_decoding_message_size(max),
        )
        .add_service(reflection)
        .add_service(health_service);
    Ok(routes.routes())
}

/// A listener on `addr` (address reuse on, as tokio's `bind`) whose accept
/// queue holds `backlog` connections (tokio's `bind` asks for 1024: a
/// thousand clients connecting at once overflow it).
///
/// # Errors
/// The socket cannot be created, bound or listened on.
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

impl Edge {
    /// Binds both listeners and serves until `cancel` fires.
    ///
    /// # Errors
    /// An invalid configuration; an address in use.
    pub async fn start(
        config: EdgeConfig,
        engine: Arc<dyn Engine>,
        cancel: CancellationToken,
    ) -> Result<Edge, StartError> {
        let state = EdgeState::new(config.clone(), engine, cancel.clone())
            .map_err(|e| StartError::Config(e.to_string()))?;
        let grpc =
            listen(config.grpc_addr, config.listen_backlog).map_err(|source| StartError::Bind {
                addr: config.grpc_addr,
                what: "gRPC",
                source,
            })?;
        let http =
            listen(config.http_addr, config.listen_backlog).map_err(|source| StartError::Bind {
                addr: config.http_addr,
                what: "HTTP",
                source,
            })?;
        let grpc_addr = grpc.local_addr().map_err(|source| StartError::Bind {
            addr: config.grpc_addr,
            what: "gRPC",
            source,
        })?;
        let http_addr = http.local_addr().map_err(|source| StartError::Bind {
            addr: config.http_addr,
            what: "HTTP",
            source,
        })?;
        let url = if config.store_url.is_empty() {
            format!(
                "sqlite://{}",
                state.engine.node_dir().join("command.db").display()
            )
        } else {
            config.store_url.clone()
        };
        let store = Arc::new(store::Store::open(&url).await?);
        merge_topics(&state, &store).await?;
        let loaded = state.subscriptions.load(&store).await?;
        let _ = state.store.set(store.clone());
        let rules = store.rules().await?;
        if !rules.is_empty() {
            let applied = admin::apply_rules(&state, rules);
            tracing::info!(rules = applied, "routing rules applied");
        }
        tracing::info!(
            store = store.location(),
            subscriptions = loaded,
            "command store open"
        );
        // Start the dispatchers now, so the latest-value table is filled
        // before the first request.
        for t in state.engine.topics() {
            if let Err(e) = state.hub.topic(&t.name) {
                tracing::warn!(topic = %t.name, error = %e, "no dispatcher for topic yet");
            }
        }
        let routes = grpc_routes(state.clone()).map_err(StartError::Config)?;
        let c = cancel.clone();
        let grpc_task = tokio::spawn(async move {
            // The server's own `tcp_nodelay` applies only to listeners it
            // binds itself: set it on each accepted connection.
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(grpc),
                |conn| {
                    conn.inspect(|tcp| {
                        if let Err(e) = tcp.set_nodelay(true) {
                            tracing::debug!(error = %e, "TCP_NODELAY not set on a gRPC connection");
                        }
                    })
                },
            );
            let r = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, c.cancelled_owned())
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        let app = rest::router(state.clone());
        let c = cancel.clone();
        let http_task = tokio::spawn(async move {
            // Nagle off, as on the gRPC listener: a WebSocket frame or a
            // response goes out when written, not after the last one's ACK.
            let http = axum::serve::ListenerExt::tap_io(http, |tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY not set on an HTTP connection");
                }
            });
            let r = axum::serve(http, app)
                .with_graceful_shutdown(c.cancelled_owned())
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        if !config.auth.enabled {
            tracing::warn!(grpc = %grpc_addr, http = %http_addr, "edge auth is OFF (loopback only): anyone on this machine can read and administer; set edge.auth for keys");
        }
        tracing::info!(grpc = %grpc_addr, http = %http_addr, "edge serving: gRPC (reflection, health), REST /api/v1, WebSocket /api/v1/market-data/stream, /metrics, /health");
        let mut tasks = vec![grpc_task, http_task];
        if config.stats_interval_secs > 0 {
            tasks.push(tokio::spawn(record_stats(
                state.clone(),
                store.clone(),
                std::time::Duration::from_secs(config.stats_interval_secs),
            )));
        }
        if config.metrics_interval_secs > 0 {
            tasks.push(tokio::spawn(record_metrics(
                state.clone(),
                store.clone(),
                std::time::Duration::from_secs(config.metrics_interval_secs),
                humantime::parse_duration(&config.metrics_retention)
                    .unwrap_or(std::time::Duration::from_secs(7 * 86_400)),
            )));
        }
        tasks.push(tokio::spawn(cache::run(
            state.clone(),
            std::time::Duration::from_millis(config.cache_interval_ms),
        )));
        // Without it, shared-memory readers still read; only groups wait.
        let groups_shm = match group::shm::Coordinator::start(
            state.clone(),
            store.clone(),
            tokio::runtime::Handle::current(),
        ) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "shm subscription groups are off");
                None
            }
        };
        Ok(Edge {
            grpc_addr,
            http_addr,
            state,
            store,
            tasks,
            groups_shm,
        })
    }

    /// Waits for the servers and dispatchers to end (after cancel).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        // Groups write their cursors as they stop: before the store closes.
        let state = self.state.clone();
        let _ = tokio::task::spawn_blocking(move || state.groups.join()).await;
        if let Some(c) = self.groups_shm {
            let _ = tokio::task::spawn_blocking(move || c.join()).await;
        }
        self.store.close().await;
        let state = self.state.clone();
        let _ = tokio::task::spawn_blocking(move || state.hub.join()).await;
    }
}

/// Merges the topics of the store with the engine's at start: a run-time
/// topic (created through the API) that the engine does not have is
/// created again, resuming its rings (all those on disk: the engine counts
/// them). Then the rows record the engine's topics. A topic that cannot be
/// made again is logged and left out of this run; its row stays.
async fn merge_topics(state: &EdgeState, store: &store::Store) -> Result<(), store::StoreError> {
    let have = state.engine.topics();
    for row in store
        .topics()
        .await?
        .into_iter()
        .filter(|r| r.enabled && r.runtime && !have.iter().any(|t| t.name == r.topic_name))
    {
        let engine = state.engine.clone();
        let name = row.topic_name.clone();
        let partitions = u32::try_from(row.partitions).unwrap_or(1);
        let capacity = row.capacity.and_then(|c| u64::try_from(c).ok());
        let retention = humantime::parse_duration(&row.retention_policy).ok();
        match tokio::task::spawn_blocking(move || {
            engine.create_topic(&name, partitions, capacity, retention)
        })
        .await
        {
            Ok(Ok(t)) => {
                tracing::info!(topic = %t.name, partitions = t.partitions, "topic restored from the command store")
            }
            Ok(Err(e)) => {
                tracing::error!(topic = %row.topic_name, error = %e, "a topic of the command store could not be restored; it is missing from this run")
            }
            Err(e) => {
                tracing::error!(topic = %row.topic_name, error = %e, "restoring a topic failed")
            }
        }
    }
    store.sync_topics(&state.engine.topics()).await
}

/// Writes a `distribution_stats` row per running topic every `every`: what
/// the edge delivered and dropped in the interval and the bytes it sent, the mean
/// ingest-to-dispatch latency of the interval, and live subscribers. A
/// store that cannot be written is logged (once per outage) and retried at
/// the next interval; it never stops the edge.
async fn record_stats(state: Arc<EdgeState>, store: Arc<store::Store>, every: std::time::Duration) {
    struct Last {
        delivered: u64,
        dropped: u64,
        bytes: u64,
        hist: Option<hdrhistogram::Histogram<u64>>,
    }
    let mut last: HashMap<String, Last> = HashMap::new();
    let mut failing = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.cancel.cancelled() => return,
        }
        let now = tickwire_proto::json::rfc3339(tickwire_proto::futex::realtime_ns());
        for t in state.hub.running() {
            let delivered = t.delivered.load(std::sync::atomic::Ordering::Relaxed);
            let dropped = t.dropped.load(std::sync::atomic::Ordering::Relaxed);
            let bytes = t.wire_bytes.load(std::sync::atomic::Ordering::Relaxed);
            let hist = t.dispatch_latency.lock().ok().map(|h| h.clone());
            let prev = last.remove(&t.topic).unwrap_or(Last {
                delivered: 0,
                dropped: 0,
                bytes: 0,
                hist: None,
            });
            let avg_latency_ms = hist.as_ref().and_then(|h| {
                let mut d = h.clone();
                if let Some(p) = &prev.hist {
                    d.subtract(p).ok()?;
                }
                (!d.is_empty()).then(|| d.mean() / 1e6)
            });
            let row = store::StatsRow {
                timestamp: now.clone(),
                topic_name: t.topic.clone(),
                messages_distributed: delivered.saturating_sub(prev.delivered) as i64,
                bytes_distributed: bytes.saturating_sub(prev.bytes) as i64,
                avg_latency_ms,
                error_count: dropped.saturating_sub(prev.dropped) as i64,
                active_subscriptions: t.subscribers.load(std::sync::atomic::Ordering::Relaxed)
                    as i64,
            };
            match store.record_stats(&row).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(store = store.location(), "distribution stats written again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "distribution stats not written; retrying each interval");
                }
                Err(_) => {}
            }
            last.insert(
                t.topic.clone(),
                Last {
                    delivered,
                    dropped,
                    bytes,
                    hist,
                },
            );
        }
    }
}

/// Writes `distribution_metrics_ts` every interval: per topic and
/// partition, the publish rate, the topic's ingest-to-dispatch p50/p99 in
/// the interval, the share of events remote subscribers did not get, the
/// dispatcher's backlog, subscribers and whether the partition's writer
/// published. Keeps the tables' time partitions (and drops those past
/// `retention`) at start and every five minutes. A store that cannot be
/// written is logged once per outage; the edge goes on.
async fn record_metrics(
    state: Arc<EdgeState>,
    store: Arc<store::Store>,
    every: std::time::Duration,
    retention: std::time::Duration,
) {
    use std::sync::atomic::Ordering::Relaxed;
    type Prev = (
        u64,
        u64,
        Option<hdrhistogram::Histogram<u64>>,
        HashMap<u32, u64>,
    );
    let mut last: HashMap<String, Prev> = HashMap::new();
    let mut failing = false;
    let mut maintained: Option<std::time::Instant> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if maintained.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(300)) {
            match store
                .maintain_query_side(tickwire_proto::futex::realtime_ns(), retention)
                .await
            {
                Ok(n) if n > 0 => {
                    tracing::info!(
                        dropped = n,
                        "query side: partitions past the retention dropped"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "query side: partitions not maintained"),
            }
            maintained = Some(std::time::Instant::now());
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.cancel.cancelled() => return,
        }
        let now = tickwire_proto::futex::realtime_ns();
        let secs = every.as_secs_f64();
        let mut rows = Vec::new();
        for t in state.hub.running() {
            let delivered = t.delivered.load(Relaxed);
            let dropped = t.dropped.load(Relaxed);
            let hist = t.dispatch_latency.lock().ok().map(|h| h.clone());
            let backlog = t.backlog.lock().map(|b| b.clone()).unwrap_or_default();
            let Some((d0, x0, h0, p0)) = last.get(&t.topic) else {
                // The first look: the base of the next interval.
                let pubs = backlog.iter().map(|&(p, s, _)| (p, s)).collect();
                last.insert(t.topic.clone(), (delivered, dropped, hist, pubs));
                continue;
            };
            let q = |h: &Option<hdrhistogram::Histogram<u64>>, q: f64| {
                let mut d = h.clone()?;
                if let Some(p) = h0 {
                    d.subtract(p).ok()?;
                }
                (!d.is_empty()).then(|| d.value_at_quantile(q) as f64 / 1e6)
            };
            let (dd, dx) = (delivered.saturating_sub(*d0), dropped.saturating_sub(*x0));
            for &(p, published, position) in &backlog {
                let rate = published.saturating_sub(p0.get(&p).copied().unwrap_or(published));
                rows.push(store::MetricsRow {
                    ts_ns: now as i64,
                    topic_name: t.topic.clone(),
                    partition_id: i64::from(p),
                    throughput_per_second: rate as f64 / secs,
                    latency_p50_ms: q(&hist, 0.5),
                    latency_p99_ms: q(&hist, 0.99),
                    error_rate: dx as f64 / (dd + dx).max(1) as f64,
                    backlog_size: (published + 1).saturating_sub(position) as i64,
                    consumer_count: t.subscribers.load(Relaxed) as i64,
                    producer_count: i64::from(rate > 0),
                });
            }
            let pubs = backlog.iter().map(|&(p, s, _)| (p, s)).collect();
            last.insert(t.topic.clone(), (delivered, dropped, hist, pubs));
        }
        let deliveries = state.hub.delivery_log.drain();
        if !deliveries.is_empty()
            && let Err(e) = store.record_deliveries(&deliveries).await
        {
            tracing::warn!(error = %e, records = deliveries.len(), "message_delivery_log rows not written");
        }
        if rows.is_empty() {
            continue;
        }
        match store.record_metrics(&rows).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(
                    store = store.location(),
                    "distribution metrics written again"
                );
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "distribution metrics not written; retrying each interval");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of connections larger than the standard library's backlog
    /// (128) waits in the kernel's queue until the edge accepts it; with
    /// 128 the rest were dropped and the clients reset.
    #[tokio::test]
    async fn a_listener_queues_a_burst_of_connections_nobody_accepted_yet() {
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        let burst = 600.min(somaxconn.saturating_sub(1));
        let backlog = EdgeConfig::default().listen_backlog;
        assert!(backlog as usize > burst, "the default holds the burst");
        let l = listen("127.0.0.1:0".parse().expect("addr"), backlog).expect("listen");
        let addr = l.local_addr().expect("addr");
        let connected = tokio::task::spawn_blocking(move || {
            let mut open = Vec::new();
            for _ in 0..burst {
                match std::net::TcpStream::connect_timeout(
                    &addr,
                    std::time::Duration::from_millis(300),
                ) {
                    Ok(s) => open.push(s),
                    Err(_) => break,
                }
            }
            open.len()
        })
        .await
        .expect("connects");
        assert_eq!(connected, burst, "connections queued before an accept");
        drop(l);
    }
}

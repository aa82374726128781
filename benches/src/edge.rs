//! `tickwire-bench edge`: the remote edge (gRPC and WebSocket streams, REST
//! latest) beside NATS and the bare servers, in one run.
//!
//! Layout on this 2-core machine (printed in every row):
//!
//! ```text
//!  core 0  server side: tickwire's shard, dispatcher and edge runtime
//!          | nats-server | the bare tonic / axum server
//!  core 1  the publisher thread (tickwire Ingest::try_send | async-nats publish)
//!          and the client process (every stream on one tokio thread)
//! ```
//!
//! Events are trades on `symbols` instruments (`SYM000`.. on `XBEN`), one
//! partition. A tickwire client counts the events in each batch and checks
//! sequence contiguity when it subscribes to everything; gap notices count
//! the skipped range otherwise. NATS gets one 64-byte message per event on
//! `md.<symbol>.XBEN.trade` carrying a per-subject sequence (loss = jumps),
//! the publish time and the subject's index. Clients of every system read
//! only those fields off the wire (`wire_scan`), so that the client core
//! is not what is measured. Latency is receive time minus ingest time (tickwire:
//! the broker's `ingest_time_ns`; NATS: the publish time), CLOCK_REALTIME on
//! one machine. The bare servers send one pre-encoded 64-event batch over
//! and over: the machine's ceiling for the wire alone (no latency or loss
//! is measured there). It is the edge's own encoding of the same events as
//! the publisher's (instrument, stamps, source), so a client does the same
//! work per event from either. A publisher ahead of its pace sleeps, and
//! gives the clients their core.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tickwire_proto::futex::realtime_ns;

use crate::wire_scan::{self, Notice};
use crate::{ReaderProc, pin};

const TOPIC: &str = "bench/edge";
const EXCHANGE: &str = "XBEN";
/// Events per batch of the bare servers.
const PLAIN_BATCH: usize = 64;

/// `tickwire-bench edge` settings.
#[derive(clap::Args, Debug, Clone)]
pub struct EdgeBench {
    /// Seconds measured per case and system (after a 1 s settle).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Cases (comma-separated; default all): grpc_1, grpc_8, ws_1, ws_8,
    /// fanout_1000, slow_1, rest_latest.
    #[arg(long, value_delimiter = ',')]
    pub cases: Vec<String>,
    /// Offered rate for the 1- and 8-subscriber cases, events/s (the
    /// publisher's pace; what is delivered and lost is measured).
    #[arg(long, default_value_t = 2_000_000)]
    pub rate: u64,
    /// Offered rate for slow_1 (8 streams taking everything), events/s.
    #[arg(long, default_value_t = 100_000)]
    pub slow_rate: u64,
    /// Offered rate for fanout_1000, events/s.
    #[arg(long, default_value_t = 200_000)]
    pub fanout_rate: u64,
    /// Instruments published.
    #[arg(long, default_value_t = 100)]
    pub symbols: usize,
    /// Symbols each fanout_1000 subscriber takes.
    #[arg(long, default_value_t = 10)]
    pub symbols_per_subscriber: usize,
    /// Subscribers in the fan-out case.
    #[arg(long, default_value_t = 1000)]
    pub fanout: usize,
    /// Connection layouts of the fan-out case, each run for every system:
    /// 0 gives each subscriber its own connection; N > 0 spreads the
    /// subscribers over N connections (gRPC streams multiplexed on HTTP/2
    /// channels, several subscriptions on one WebSocket, several
    /// subscribers on one NATS connection). Every other case gives each
    /// subscriber its own connection, NATS's included.
    #[arg(long, value_delimiter = ',', default_values_t = [0, 16])]
    pub fanout_connections: Vec<usize>,
    /// Batch intervals of the bare fan-out beside fanout_1000 (in each
    /// connection layout), microseconds: each subscriber gets
    /// the events due over the interval in one message, so a short one is
    /// many small messages (low latency, if the machine carries them), a
    /// long one few large ones.
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 5000, 20000])]
    pub plain_fanout_intervals_us: Vec<u64>,
    /// Server core.
    #[arg(long, default_value_t = 0)]
    pub server_core: usize,
    /// Publisher and client core.
    #[arg(long, default_value_t = 1)]
    pub client_core: usize,
    /// Port for the nats-server this bench starts.
    #[arg(long, default_value_t = 14222)]
    pub nats_port: u16,
    /// Systems (comma-separated; default all): tickwire, nats, plain (the
    /// bare servers). Leaving the baselines out is for profiling only: a
    /// figure is reported beside its baselines.
    #[arg(long, value_delimiter = ',')]
    pub systems: Vec<String>,
    /// Also find each system's highest clean rate in the grpc/ws/fanout
    /// cases: from this offered rate (events/s; 0: off) step down until a
    /// run of `--seconds` keeps up and loses nothing (rows with
    /// `"mode":"highest_clean_rate"` and every try under `search`).
    #[arg(long, default_value_t = 0)]
    pub clean_from: u64,
    /// Tries of the clean-rate search at most.
    #[arg(long, default_value_t = 8)]
    pub search_tries: usize,
}

impl EdgeBench {
    fn wants(&self, case: &str) -> bool {
        self.cases.is_empty() || self.cases.iter().any(|c| c == case)
    }

    fn runs(&self, system: &str) -> bool {
        self.systems.is_empty() || self.systems.iter().any(|c| c == system)
    }

    fn layout(&self) -> Value {
        json!({"server": self.server_core, "publisher": self.client_core, "clients": self.client_core})
    }
}

/// One case as the client process runs it.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// tickwire | plain_grpc | plain_ws | nats
    #[arg(long)]
    pub system: String,
    /// grpc | ws | mixed (alternating) | nats
    #[arg(long)]
    pub transport: String,
    /// gRPC address.
    #[arg(long, default_value = "")]
    pub grpc: String,
    /// HTTP address (WebSocket).
    #[arg(long, default_value = "")]
    pub http: String,
    /// NATS URL.
    #[arg(long, default_value = "")]
    pub nats: String,
    /// Streams (subscribers).
    #[arg(long)]
    pub streams: usize,
    /// Connections the streams share round-robin (0: one per stream).
    #[arg(long, default_value_t = 0)]
    pub connections: usize,
    /// Symbols per stream (0: everything).
    #[arg(long, default_value_t = 0)]
    pub per_stream: usize,
    /// One more gRPC stream that reads nothing while the others are
    /// measured, then reads what it was told (slow_1).
    #[arg(long)]
    pub slow: bool,
    /// Instruments published.
    #[arg(long)]
    pub symbols: usize,
    /// Seconds measured.
    #[arg(long)]
    pub seconds: f64,
    /// Core.
    #[arg(long)]
    pub core: usize,
}

/// This process's resident set (the server side of the bench), KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The symbol name of instrument `i`.
fn symbol(i: usize) -> String {
    format!("SYM{i:03}")
}

/// The symbols stream `k` takes (empty: everything).
fn symbols_of(k: usize, per: usize, total: usize) -> Vec<String> {
    (0..per).map(|j| symbol((k * per + j) % total)).collect()
}

/// Runs the chosen cases; prints one JSON line per case and system.
///
/// # Errors
/// A server or client that fails to start.
pub fn run(b: &EdgeBench) -> Result<(), String> {
    // Every server thread started from here inherits core 0.
    pin(b.server_core);
    let tw = TwServer::start(b)?;
    let nats = NatsServer::start(b)?;
    let plain = PlainServer::start()?;
    let cases: [(&str, &str, usize, usize, u64); 5] = [
        ("grpc_1", "grpc", 1, 0, b.rate),
        ("grpc_8", "grpc", 8, 0, b.rate),
        ("ws_1", "ws", 1, 0, b.rate),
        ("ws_8", "ws", 8, 0, b.rate),
        (
            "fanout_1000",
            "mixed",
            b.fanout,
            b.symbols_per_subscriber,
            b.fanout_rate,
        ),
    ];
    for (case, transport, streams, per, rate) in cases {
        if !b.wants(case) {
            continue;
        }
        let client = |system: &str, transport: &str| ClientArgs {
            system: system.into(),
            transport: transport.into(),
            grpc: tw.grpc.to_string(),
            http: tw.http.to_string(),
            nats: nats.url(),
            streams,
            connections: 0,
            per_stream: per,
            symbols: b.symbols,
            seconds: b.seconds,
            core: b.client_core,
            slow: false,
        };
        // Deliveries per published event.
        let fan = if per == 0 {
            streams as f64
        } else {
            streams as f64 * per.min(b.symbols) as f64 / b.symbols as f64
        };
        // Each connection layout (the fan-out case may have several).
        let layouts = if per > 0 {
            b.fanout_connections.clone()
        } else {
            vec![0]
        };
        for connections in layouts {
            // tickwire, then NATS (same subjects, same publisher pace and core).
            for system in ["tickwire", "nats"] {
                if !b.runs(system) {
                    continue;
                }
                let (publisher, transport) = if system == "tickwire" {
                    (Publisher::Tickwire(&tw), transport)
                } else {
                    (Publisher::Nats(&nats), "nats")
                };
                let run = |rate: u64, seconds: f64| {
                    let mut a = client(system, transport);
                    a.seconds = seconds;
                    a.connections = connections;
                    with_publisher(b, rate, publisher, || spawn_client(&a))
                };
                // A client that fails (at a rate far past what a system takes)
                // is a row saying so, not the end of the bench.
                let r = run(rate, b.seconds).unwrap_or_else(|e| json!({ "error": e }));
                emit(case, system, b, rate, &r);
                if b.clean_from > 0 {
                    let (mut r, tries, clean) =
                        highest_clean_rate(b, fan, |rate| run(rate, b.seconds));
                    let offered = tries
                        .last()
                        .and_then(|t| t["offered_per_sec"].as_u64())
                        .unwrap_or(0);
                    if let Some(o) = r.as_object_mut() {
                        o.insert("mode".into(), json!("highest_clean_rate"));
                        // False when every try lost or fell behind: the row is
                        // then the last try.
                        o.insert("clean".into(), json!(clean));
                        o.insert("search".into(), json!(tries));
                    }
                    emit(case, system, b, offered, &r);
                }
            }
            // The bare fan-out beside them, on the same connection layout:
            // the same events per subscriber, in batches every interval,
            // with no ring, matching or queue.
            if per > 0 && b.runs("plain") {
                let per_sub = rate as f64 * per.min(b.symbols) as f64 / b.symbols as f64;
                for &us in &b.plain_fanout_intervals_us {
                    let interval = Duration::from_micros(us.max(1));
                    let events = ((per_sub * interval.as_secs_f64()).round() as usize).max(1);
                    let _pace = plain.pace(interval, events);
                    let mut a = client("plain", transport);
                    a.connections = connections;
                    a.grpc = plain.grpc.to_string();
                    a.http = plain.http.to_string();
                    let mut r = spawn_client(&a).unwrap_or_else(|e| json!({ "error": e }));
                    if let Some(o) = r.as_object_mut() {
                        o.insert("batch_interval_us".into(), json!(us));
                        o.insert("events_per_batch".into(), json!(events));
                    }
                    emit(case, "plain", b, rate, &r);
                }
            }
        }
        // The bare server: the wire's ceiling (1 and 8 subscribers).
        if per == 0 && b.runs("plain") {
            let (system, addr_kind) = if transport == "ws" {
                ("plain_ws", "ws")
            } else {
                ("plain_grpc", "grpc")
            };
            let mut a = client(system, addr_kind);
            a.grpc = plain.grpc.to_string();
            a.http = plain.http.to_string();
            let mut r = spawn_client(&a)?;
            // Its batch's stamps are fixed: the client records them as it
            // does ours (the same work per event), but they are no latency.
            if let Some(o) = r.as_object_mut() {
                o.insert("latency".into(), Value::Null);
                o.insert("latency_ingest_to_edge".into(), Value::Null);
            }
            emit(case, system, b, 0, &r);
        }
    }
    if b.wants("slow_1") {
        // 8 gRPC streams taking everything at `slow_rate`, without and then
        // with a 9th that stops reading for the measured window.
        for slow in [false, true] {
            let a = ClientArgs {
                system: "tickwire".into(),
                transport: "grpc".into(),
                grpc: tw.grpc.to_string(),
                http: tw.http.to_string(),
                nats: nats.url(),
                streams: 8,
                connections: 0,
                per_stream: 0,
                symbols: b.symbols,
                seconds: b.seconds,
                core: b.client_core,
                slow,
            };
            let rss0 = rss_kib();
            let mut r = with_publisher(b, b.slow_rate, Publisher::Tickwire(&tw), || {
                spawn_client(&a)
            })?;
            if let Some(o) = r.as_object_mut() {
                o.insert("with_slow_client".into(), json!(slow));
                o.insert(
                    "edge_rss_growth_kib".into(),
                    json!(rss_kib().saturating_sub(rss0)),
                );
                o.insert(
                    "queue_limits".into(),
                    json!({"events": 65_536, "bytes": 16 << 20}),
                );
            }
            emit("slow_1", "tickwire", b, b.slow_rate, &r);
        }
    }
    if b.wants("rest_latest") {
        rest_latest(b, &tw, &plain)?;
    }
    tw.stop();
    Ok(())
}

/// Steps the offered rate down from `--clean-from` until a run keeps up
/// and loses nothing: no sequence jump, no gap notice, the publisher held
/// the offered rate, the clients got every delivery it made (`fan` per
/// published event) and the median latency stayed under 50 ms (a backlog
/// being worked off is not keeping up). Each next try is 85% of the last,
/// or 95% of what was delivered when that is lower. Each try comes after
/// 2 s without publishing, so that a backlog of the run before it is not
/// counted in it. Returns the first clean run (or the last try), every
/// try, and whether the run returned was clean.
fn highest_clean_rate(
    b: &EdgeBench,
    fan: f64,
    mut run: impl FnMut(u64) -> Result<Value, String>,
) -> (Value, Vec<Value>, bool) {
    let mut rate = b.clean_from;
    let mut tries = Vec::new();
    let mut last = Value::Null;
    for _ in 0..b.search_tries {
        std::thread::sleep(Duration::from_secs(2));
        let r = run(rate).unwrap_or_else(|e| json!({ "error": e }));
        let n = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        let (lost, gaps) = (n("lost"), n("gap_notices"));
        let (published, delivered) = (n("published_per_sec"), n("events_per_sec"));
        let p50 = r["latency"]["p50_ns"].as_f64().unwrap_or(f64::MAX);
        let kept_up =
            published >= 0.97 * rate as f64 && delivered >= 0.97 * published * fan && p50 < 50e6;
        tries.push(
            json!({"offered_per_sec": rate, "published_per_sec": published,
            "events_per_sec": delivered, "lost": lost, "gap_notices": gaps, "kept_up": kept_up}),
        );
        if lost == 0.0 && gaps == 0.0 && kept_up {
            return (r, tries, true);
        }
        last = r;
        let next = rate * 85 / 100;
        let kept = (delivered.min(published * fan) / fan * 0.95) as u64;
        // A failed try (no figures) steps down by 15% only.
        rate = if kept > 0 { next.min(kept) } else { next };
    }
    (last, tries, false)
}

fn emit(case: &str, system: &str, b: &EdgeBench, offered: u64, r: &Value) {
    let mut v = json!({
        "bench": "edge",
        "case": case,
        "system": system,
        "offered_per_sec": offered,
        "mode": "offered",
        "cores": b.layout(),
    });
    if let (Some(o), Some(more)) = (v.as_object_mut(), r.as_object()) {
        for (k, x) in more {
            o.insert(k.clone(), x.clone());
        }
    }
    println!("{v}");
}

// ------------------------------------------------------------------ servers

/// tickwire: a broker with one partition and the edge on loopback.
struct TwServer {
    broker: tickwire_broker::engine::Broker,
    grpc: SocketAddr,
    http: SocketAddr,
    rt: tokio::runtime::Runtime,
    cancel: tokio_util::sync::CancellationToken,
    /// Its rings: removed when it is.
    dir: crate::tw::NodeDir,
}

impl TwServer {
    fn start(b: &EdgeBench) -> Result<TwServer, String> {
        // The shard shares core 0 with the dispatcher and the edge. NATS
        // core keeps nothing on disk: neither does this run (the journal
        // has its own benchmark, `tickwire-bench history`).
        let dir = crate::tw::NodeDir(crate::tw::fresh_dir("edge"));
        let mut cfg = crate::tw::shared_core_config(dir.0.clone(), b.server_core, TOPIC, 1 << 21);
        cfg.edge.grpc_addr = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
        cfg.edge.http_addr = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
        let broker =
            tickwire_broker::engine::Broker::start(&cfg).map_err(|e| format!("broker: {e}"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-edge")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let cancel = tokio_util::sync::CancellationToken::new();
        let edge = crate::tw::start_edge(&rt, &cfg, &broker, &cancel)?;
        Ok(TwServer {
            grpc: edge.grpc_addr,
            http: edge.http_addr,
            broker,
            rt,
            cancel,
            dir,
        })
    }

    fn stop(self) {
        self.cancel.cancel();
        self.rt.shutdown_timeout(Duration::from_secs(2));
        self.broker.shutdown();
        // The rings go with the node (dropping `dir`).
        drop(self.dir);
    }
}

/// Debian's nats-server on core 0.
struct NatsServer {
    child: Child,
    port: u16,
}

impl NatsServer {
    fn start(b: &EdgeBench) -> Result<NatsServer, String> {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .ok_or("nats-server is not installed (apt-get install nats-server)")?;
        let child = Command::new("taskset")
            .args(["-c", &b.server_core.to_string(), bin])
            .args(["-a", "127.0.0.1", "-p", &b.nats_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("nats-server: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", b.nats_port)).is_err() {
            if Instant::now() > deadline {
                return Err("nats-server did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(NatsServer {
            child,
            port: b.nats_port,
        })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bare servers: a tonic `MarketDataStream` and an axum WebSocket route
/// that send one pre-encoded 64-event batch over and over to a subscriber
/// taking everything, and the paced fan-out ([`PlainServer::pace`]) to a
/// subscriber of a handful of symbols; and a REST route with a fixed body
/// the size of tickwire's latest answer.
struct PlainServer {
    grpc: SocketAddr,
    http: SocketAddr,
    fanout: Arc<tokio::sync::watch::Sender<Option<Arc<FanoutBatch>>>>,
    rt: tokio::runtime::Runtime,
}

/// The bare servers' batch: 64 events as the edge writes them for the
/// bench's publisher (a trade per symbol in turn, stamped at ingest and
/// when sent, with its source and sequences), encoded by the edge's own
/// encoders: the same events on the wire, so a client does the same work
/// for each whichever server sent it. Its stamps are fixed, so the bare
/// rows report no latency.
struct PlainBatch {
    grpc: tickwire_proto::grpc::Encoded,
    ws: String,
}

fn plain_batch() -> PlainBatch {
    const T0: u64 = 1_795_786_108_123_456_789;
    plain_events(PLAIN_BATCH, |i| T0 + i as u64 * 1_000 + 2_500, T0 + 100_000)
}

/// `n` events as the edge writes them, event `i` ingested at `ingest(i)`,
/// the batch sent at `send_ns`.
fn plain_events(n: usize, ingest: impl Fn(usize) -> u64, send_ns: u64) -> PlainBatch {
    use tickwire_proto::grpc::{BatchBuf, InstrumentFields, TickEncoder, TickMeta};
    let mut pb = TickEncoder::new();
    let mut batch = BatchBuf::new();
    let mut elements = String::new();
    for i in 0..n {
        let at = ingest(i);
        let mut body = tickwire_proto::FrameBody::trade(
            1 + i as u32,
            at - 2_500,
            (100 + i as i64) * tickwire_proto::frame::PRICE_SCALE,
            100,
        );
        body.set_source_id(0x0001_0001);
        body.source_seq = 1_000_000 + i as u64;
        body.ts_ingest_delta = 2_500;
        let words = body.to_words();
        let b = tickwire_proto::frame::ArchivedFrameBody::from_words(&words);
        let meta = TickMeta {
            topic: TOPIC,
            partition: 0,
            epoch: 1,
            seq: 1_000_000 + i as u64,
            send_time_ns: send_ns,
            snapshot: false,
            conflated: false,
            redeliveries: 0,
        };
        let sym = symbol(i);
        batch.push(pb.encode(
            &meta,
            b,
            Some(&InstrumentFields::of(&sym, EXCHANGE, "USD", 0)),
        ));
        if i > 0 {
            elements.push(',');
        }
        let inst = tickwire_api::dispatch::json::JsonInstrument::of(&sym, EXCHANGE, "USD", 0);
        tickwire_api::dispatch::json::encode_tick(&mut elements, &meta, b, Some(&inst));
    }
    PlainBatch {
        grpc: batch.take(),
        ws: tickwire_api::dispatch::json::data_message("s1", &elements, send_ns),
    }
}

/// The bare fan-out's batches: every `interval`, the `events` that came
/// due over it, stamped as arriving evenly across it (so the wait for the
/// batch is in the latency, as the dispatcher's is in ours), broadcast to
/// every subscriber of a handful of symbols. A subscriber whose connection
/// is behind skips to the newest batch: what it delivers is what the
/// machine carries at that message rate.
type Fanout = tokio::sync::watch::Receiver<Option<Arc<FanoutBatch>>>;

/// A bare fan-out batch, ready to send any number of times without a copy.
struct FanoutBatch {
    grpc: tickwire_proto::grpc::Encoded,
    ws: axum::extract::ws::Utf8Bytes,
}

/// The batch due at `tick_ns`: `events` spread over the `interval_ns` before it.
fn fanout_batch(events: usize, interval_ns: u64, tick_ns: u64) -> PlainBatch {
    let step = interval_ns / events.max(1) as u64;
    let first = tick_ns.saturating_sub(interval_ns);
    plain_events(events, |i| first + step * (i as u64 + 1), tick_ns)
}

/// A subscriber's frames from the bare fan-out.
fn fanout_frames<T: Clone + Send + Sync + 'static>(
    rx: Fanout,
    pick: impl Fn(&FanoutBatch) -> T + Send + 'static,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold((rx, pick), |(mut rx, pick)| async move {
        loop {
            rx.changed().await.ok()?;
            let b = rx.borrow_and_update().clone();
            if let Some(b) = b {
                return Some((pick(&b), (rx, pick)));
            }
        }
    })
}

struct PlainGrpc {
    batch: tickwire_proto::grpc::Encoded,
    fanout: Fanout,
}

type PlainStream = std::pin::Pin<
    Box<
        dyn futures::Stream<Item = Result<tickwire_proto::grpc::Encoded, tonic::Status>>
            + Send
            + 'static,
    >,
>;

#[tonic::async_trait]
impl tickwire_proto::pb::raw::market_data_stream_server::MarketDataStream for PlainGrpc {
    type StreamMarketDataStream = PlainStream;
    type StreamHistoricalDataStream = PlainStream;
    type ConsumeMarketDataStream = PlainStream;

    async fn stream_market_data(
        &self,
        r: tonic::Request<tickwire_proto::pb::StreamRequest>,
    ) -> Result<tonic::Response<PlainStream>, tonic::Status> {
        if !r.get_ref().symbols.is_empty() {
            // A subscriber of a handful of symbols: the paced fan-out.
            return Ok(tonic::Response::new(Box::pin(fanout_frames(
                self.fanout.clone(),
                |b| Ok(b.grpc.clone()),
            ))));
        }
        let batch = self.batch.clone();
        Ok(tonic::Response::new(Box::pin(
            futures::stream::repeat_with(move || Ok(batch.clone())),
        )))
    }

    async fn stream_historical_data(
        &self,
        _r: tonic::Request<tickwire_proto::pb::HistoricalRequest>,
    ) -> Result<tonic::Response<PlainStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("bare server"))
    }

    async fn consume_market_data(
        &self,
        _r: tonic::Request<tonic::Streaming<tickwire_proto::pb::ConsumeRequest>>,
    ) -> Result<tonic::Response<PlainStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("bare server"))
    }

    async fn manage_subscription(
        &self,
        _r: tonic::Request<tickwire_proto::pb::SubscriptionRequest>,
    ) -> Result<tonic::Response<tickwire_proto::pb::SubscriptionResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("bare server"))
    }
}

impl PlainServer {
    fn start() -> Result<PlainServer, String> {
        use tickwire_proto::pb;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-plain")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let PlainBatch {
            grpc: batch,
            ws: ws_batch,
        } = plain_batch();
        let (fanout_tx, fanout) = tokio::sync::watch::channel(None);
        let ws_fanout = fanout.clone();
        let (grpc, http) = rt
            .block_on(async move {
                // The edge's accept queue (edge.listen_backlog), so a
                // thousand clients connecting at once all get in, as they
                // do with the edge.
                let backlog = tickwire_api::EdgeConfig::default().listen_backlog;
                let any: SocketAddr = ([127, 0, 0, 1], 0).into();
                let gl = tickwire_api::listen(any, backlog)?;
                let hl = tickwire_api::listen(any, backlog)?;
                let (ga, ha) = (gl.local_addr()?, hl.local_addr()?);
                let svc =
                    pb::raw::market_data_stream_server::MarketDataStreamServer::new(PlainGrpc {
                        batch,
                        fanout,
                    });
                tokio::spawn(async move {
                    // As the edge does: Nagle off on each accepted connection.
                    let incoming = tokio_stream::StreamExt::map(
                        tokio_stream::wrappers::TcpListenerStream::new(gl),
                        |c| c.inspect(|t| drop(t.set_nodelay(true))),
                    );
                    let _ = tonic::transport::Server::builder()
                        .add_service(svc)
                        .serve_with_incoming(incoming)
                        .await;
                });
                let ws_batch = Arc::new(ws_batch);
                let body = Arc::new(plain_latest_body());
                let app = axum::Router::new()
                    .route(
                        "/api/v1/market-data/stream",
                        axum::routing::get({
                            let ws_batch = ws_batch.clone();
                            move |ws: axum::extract::ws::WebSocketUpgrade| {
                                let ws_batch = ws_batch.clone();
                                let fanout = ws_fanout.clone();
                                async move {
                                    ws.on_upgrade(move |mut socket| async move {
                                        use axum::extract::ws::Message;
                                        use futures::{SinkExt as _, StreamExt as _};
                                        // Wait for the subscribe message, then stream:
                                        // the paced fan-out to a subscriber of a
                                        // handful of symbols, the batch over and over
                                        // to one taking everything.
                                        let sub = socket.recv().await;
                                        let some_symbols = match &sub {
                                            Some(Ok(Message::Text(t))) => serde_json::from_str::<Value>(t.as_str())
                                                .ok()
                                                .and_then(|v| v["payload"]["symbols"].as_array().map(|a| !a.is_empty()))
                                                .unwrap_or(false),
                                            _ => false,
                                        };
                                        if some_symbols {
                                            // Every subscription on the socket gets
                                            // each batch, as the edge's do.
                                            let (mut tx, mut rx) = socket.split();
                                            let mut subs = 1usize;
                                            let mut frames = std::pin::pin!(fanout_frames(
                                                fanout,
                                                |b| b.ws.clone()
                                            ));
                                            loop {
                                                tokio::select! {
                                                    t = frames.next() => {
                                                        let Some(t) = t else { return };
                                                        for _ in 0..subs {
                                                            if tx.feed(Message::Text(t.clone())).await.is_err() {
                                                                return;
                                                            }
                                                        }
                                                        if tx.flush().await.is_err() {
                                                            return;
                                                        }
                                                    }
                                                    m = rx.next() => match m {
                                                        Some(Ok(Message::Text(_))) => subs += 1,
                                                        Some(Ok(_)) => {}
                                                        _ => return,
                                                    },
                                                }
                                            }
                                        }
                                        let text: axum::extract::ws::Utf8Bytes =
                                            ws_batch.as_str().into();
                                        while socket.send(Message::Text(text.clone())).await.is_ok()
                                        {
                                        }
                                    })
                                }
                            }
                        }),
                    )
                    .route(
                        "/api/v1/market-data/{symbol}/latest",
                        axum::routing::get(move || {
                            let body = body.clone();
                            async move {
                                (
                                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                                    body.as_str().to_string(),
                                )
                            }
                        }),
                    );
                tokio::spawn(async move {
                    let hl = axum::serve::ListenerExt::tap_io(hl, |tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    let _ = axum::serve(hl, app).await;
                });
                Ok::<_, std::io::Error>((ga, ha))
            })
            .map_err(|e| format!("bare servers: {e}"))?;
        Ok(PlainServer {
            grpc,
            http,
            fanout: Arc::new(fanout_tx),
            rt,
        })
    }

    /// Broadcasts `events` per `interval` to the fan-out's subscribers
    /// until the returned guard is dropped.
    fn pace(&self, interval: Duration, events: usize) -> PaceGuard {
        let tx = self.fanout.clone();
        let interval_ns = interval.as_nanos() as u64;
        let task = self.rt.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let b = fanout_batch(events, interval_ns, realtime_ns());
                tx.send_replace(Some(Arc::new(FanoutBatch {
                    grpc: b.grpc,
                    ws: b.ws.into(),
                })));
            }
        });
        PaceGuard(task)
    }
}

/// Stops the bare fan-out's ticker when dropped.
struct PaceGuard(tokio::task::JoinHandle<()>);

impl Drop for PaceGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A body the size and shape of tickwire's latest answer.
fn plain_latest_body() -> String {
    json!({"symbol": "SYM001", "exchange": EXCHANGE, "currency": "USD",
        "data": {"symbol": "SYM001", "exchange": EXCHANGE, "currency": "USD", "kind": "trade",
            "timestamp": "2026-11-27T13:28:28.123456789Z", "timestamp_ns": 1_795_786_108_123_456_789u64,
            "price": 150.25, "volume": 100},
        "venues": [EXCHANGE], "timestamp": "2026-11-27T13:28:28.123470000Z"})
    .to_string()
}

// ---------------------------------------------------------------- publisher

#[derive(Clone, Copy)]
enum Publisher<'a> {
    Tickwire(&'a TwServer),
    Nats(&'a NatsServer),
}

/// Runs a paced publisher on the client core while `f` runs the clients;
/// returns `f`'s result with the publisher's achieved rate.
fn with_publisher(
    b: &EdgeBench,
    rate: u64,
    p: Publisher<'_>,
    f: impl FnOnce() -> Result<Value, String>,
) -> Result<Value, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (core, symbols) = (b.client_core, b.symbols);
    let handle: std::thread::JoinHandle<Result<(), String>> = match p {
        Publisher::Tickwire(tw) => {
            let mut ingest = tw.broker.ingest(1);
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                pin(core);
                let topic = ingest.resolver().topic(TOPIC).ok_or("topic")?;
                let routes = (0..symbols)
                    .map(|i| {
                        ingest.resolver().route(
                            topic,
                            &tickwire_proto::symbology::Instrument {
                                symbol: symbol(i),
                                exchange: EXCHANGE.into(),
                                currency: "USD".into(),
                                size_decimals: 0,
                            },
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                paced(rate, &stop, &sent, |n, now| {
                    let r = &routes[n as usize % routes.len()];
                    let body = tickwire_proto::FrameBody::trade(
                        0,
                        now,
                        (100 + (n % 1000) as i64) * tickwire_proto::frame::PRICE_SCALE,
                        100,
                    );
                    ingest.try_send_at(r, &body, None, now).is_ok()
                });
                Ok(())
            })
        }
        Publisher::Nats(nats) => {
            let url = nats.url();
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                pin(core);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async move {
                    let client = async_nats::connect(url)
                        .await
                        .map_err(|e| format!("nats publisher: {e}"))?;
                    let subjects: Vec<async_nats::Subject> = (0..symbols)
                        .map(|i| format!("md.{}.{EXCHANGE}.trade", symbol(i)).into())
                        .collect();
                    let mut seqs = vec![0u64; symbols];
                    let start = Instant::now();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let due = if rate == 0 {
                            u64::MAX
                        } else {
                            (start.elapsed().as_secs_f64() * rate as f64) as u64
                        };
                        if n >= due {
                            // Ahead of the pace: give the clients' core
                            // back (the connection task flushes meanwhile).
                            tokio::time::sleep(AHEAD_NAP).await;
                            continue;
                        }
                        let burst = (due - n).min(256);
                        for _ in 0..burst {
                            let k = n as usize % symbols;
                            seqs[k] += 1;
                            let mut p = [0u8; 64];
                            p[..8].copy_from_slice(&seqs[k].to_le_bytes());
                            p[8..16].copy_from_slice(&realtime_ns().to_le_bytes());
                            // The subject's index: the client's key for
                            // its per-subject sequence check.
                            p[16..24].copy_from_slice(&(k as u64).to_le_bytes());
                            let _ = client
                                .publish(subjects[k].clone(), bytes::Bytes::copy_from_slice(&p))
                                .await;
                            n += 1;
                        }
                        sent.store(n, Ordering::Relaxed);
                    }
                    let _ = client.flush().await;
                    Ok::<(), String>(())
                })
            })
        }
    };
    let t0 = Instant::now();
    let s0 = sent.load(Ordering::Relaxed);
    let r = f();
    let published = sent.load(Ordering::Relaxed) - s0;
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let joined = handle
        .join()
        .map_err(|_| "publisher panicked".to_string())?;
    joined?;
    let mut v = r?;
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "published_per_sec".into(),
            json!((published as f64 / secs).round()),
        );
    }
    Ok(v)
}

/// How long a paced publisher that is ahead of its pace sleeps before it
/// sends what has come due (a burst: each event is stamped when it goes,
/// so the nap is in no latency). It shares its core with the clients:
/// spinning on `sched_yield` there took a quarter of that core from them
/// in `fanout_1000`, and NATS's publisher, polling `yield_now` in its own
/// runtime, did not give the core back at all.
const AHEAD_NAP: Duration = Duration::from_micros(200);

/// Calls `send(n, now)` at `rate` per second (0: as fast as it goes) until
/// `stop`; a refused send is retried (counted once it goes). `now` is the
/// wall clock read once per burst (up to 256 events): the events' own time
/// and tickwire's ingest time, so latency measured from it also counts the
/// wait behind the burst's earlier sends (NATS's publisher, slower per
/// send, reads the clock per event).
fn paced(rate: u64, stop: &AtomicBool, sent: &AtomicU64, mut send: impl FnMut(u64, u64) -> bool) {
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = if rate == 0 {
            n + 64
        } else {
            (start.elapsed().as_secs_f64() * rate as f64) as u64
        };
        if n >= due {
            std::thread::sleep(AHEAD_NAP);
            continue;
        }
        let burst = (due - n).min(256);
        let now = realtime_ns();
        for _ in 0..burst {
            if send(n, now) {
                n += 1;
            } else {
                // The shard's queue is full: give the core back.
                std::thread::yield_now();
                break;
            }
        }
        sent.store(n, Ordering::Relaxed);
    }
}

// ------------------------------------------------------------------ clients

fn spawn_client(a: &ClientArgs) -> Result<Value, String> {
    let args: Vec<String> = vec![
        "--system".into(),
        a.system.clone(),
        "--transport".into(),
        a.transport.clone(),
        "--grpc".into(),
        a.grpc.clone(),
        "--http".into(),
        a.http.clone(),
        "--nats".into(),
        a.nats.clone(),
        "--streams".into(),
        a.streams.to_string(),
        "--connections".into(),
        a.connections.to_string(),
        "--per-stream".into(),
        a.per_stream.to_string(),
        "--symbols".into(),
        a.symbols.to_string(),
        "--seconds".into(),
        a.seconds.to_string(),
        "--core".into(),
        a.core.to_string(),
    ];
    let mut args = args;
    if a.slow {
        args.push("--slow".into());
    }
    ReaderProc::spawn_cmd("__edge_client", &args)?.result()
}

/// What every stream task adds to.
struct Shared {
    measuring: AtomicBool,
    done: AtomicBool,
    connected: AtomicU64,
    events: AtomicU64,
    /// Messages (gRPC responses, WebSocket data messages, NATS messages)
    /// that carried them.
    messages: AtomicU64,
    lost: AtomicU64,
    gap_notices: AtomicU64,
    slow_notices: AtomicU64,
    errors: AtomicU64,
    /// Each distinct stream error (its text without the stream number),
    /// with how many streams ended with it.
    error_kinds: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// The slow stream: events, gap notices (and the events they cover),
    /// slow-consumer notices, end notices it got after its stall.
    slow_events: AtomicU64,
    slow_gaps: AtomicU64,
    slow_gap_events: AtomicU64,
    slow_told: AtomicU64,
    slow_ended: AtomicBool,
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).unwrap_or_else(|_| unreachable!())
}

/// The client process's latency histograms: every stream runs on its one
/// thread and records into the same pair (a pair per stream was 600 MB
/// for 1000 streams, and a cache miss per sample).
struct Latencies {
    /// Ingest (NATS: publish) -> received.
    end_to_end: Histogram<u64>,
    /// tickwire only: ingest -> taken off the ring by the edge's dispatcher.
    to_edge: Histogram<u64>,
}

thread_local! {
    static LATENCIES: std::cell::RefCell<Latencies> = std::cell::RefCell::new(Latencies {
        end_to_end: latency_histogram(),
        to_edge: latency_histogram(),
    });
}

impl Shared {
    /// Counts a message that carried events (while measuring).
    fn message(&self) {
        if self.measuring.load(Ordering::Relaxed) {
            self.messages.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One stream's tally: sequence contiguity (when it takes everything) and
/// latency samples while measuring.
struct Tally {
    /// Last sequence per key (partition or subject index), 0: none yet.
    last: Vec<u64>,
    contiguous: bool,
}

impl Tally {
    fn new(contiguous: bool) -> Tally {
        Tally {
            last: Vec::new(),
            contiguous,
        }
    }

    /// One event read off the tickwire wire.
    fn scanned(&mut self, sh: &Shared, e: wire_scan::EventMeta, now: u64) {
        let partition = u64::from(e.partition);
        self.event(sh, partition, e.sequence, e.ingest_ns, e.send_ns, now);
    }

    /// One event on `key` (partition or subject) with sequence `seq`;
    /// `send_ns` (when the edge took it off the ring) is 0 for NATS.
    fn event(&mut self, sh: &Shared, key: u64, seq: u64, ingest_ns: u64, send_ns: u64, now: u64) {
        let m = sh.measuring.load(Ordering::Relaxed);
        if self.contiguous {
            let k = key as usize;
            if self.last.len() <= k {
                self.last.resize(k + 1, 0);
            }
            let prev = std::mem::replace(&mut self.last[k], seq);
            if m && prev > 0 && seq > prev + 1 {
                sh.lost.fetch_add(seq - prev - 1, Ordering::Relaxed);
            }
        }
        if m {
            sh.events.fetch_add(1, Ordering::Relaxed);
            if ingest_ns > 0 {
                LATENCIES.with_borrow_mut(|l| {
                    let _ = l.end_to_end.record(now.saturating_sub(ingest_ns).max(1));
                    if send_ns > 0 {
                        let _ = l.to_edge.record(send_ns.saturating_sub(ingest_ns).max(1));
                    }
                });
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct WsMsg {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: WsPayload,
}

#[derive(serde::Deserialize, Default)]
struct WsPayload {
    #[serde(default)]
    notice: String,
    #[serde(default)]
    from_sequence: u64,
    #[serde(default)]
    to_sequence: u64,
}

/// The client process: opens the streams on one tokio thread, settles for
/// 1 s, measures for `seconds`, prints one JSON line.
///
/// # Errors
/// When no stream connects.
pub fn client(a: &ClientArgs) -> Result<Value, String> {
    pin(a.core);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    println!("READY");
    let sh = Arc::new(Shared {
        measuring: AtomicBool::new(false),
        done: AtomicBool::new(false),
        connected: AtomicU64::new(0),
        events: AtomicU64::new(0),
        messages: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        gap_notices: AtomicU64::new(0),
        slow_notices: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        error_kinds: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        slow_events: AtomicU64::new(0),
        slow_gaps: AtomicU64::new(0),
        slow_gap_events: AtomicU64::new(0),
        slow_told: AtomicU64::new(0),
        slow_ended: AtomicBool::new(false),
    });
    let a2 = a.clone();
    let sh2 = sh.clone();
    let (hist, to_edge, elapsed, opened) = rt.block_on(async move {
        let a = a2;
        let sh = sh2;
        let links = Links::open(&a).await?;
        let mut tasks = Vec::new();
        let slow = a.slow.then(|| {
            let (a, sh) = (a.clone(), sh.clone());
            tokio::spawn(async move {
                if let Err(e) = slow_stream(&a, &sh).await {
                    eprintln!("edge client: slow stream: {e}");
                }
            })
        });
        // WebSocket subscriptions sharing a connection, by connection.
        let mut ws_shared: std::collections::BTreeMap<usize, Vec<Vec<String>>> =
            std::collections::BTreeMap::new();
        for k in 0..a.streams {
            let syms = if a.per_stream == 0 {
                Vec::new()
            } else {
                symbols_of(k, a.per_stream, a.symbols)
            };
            let transport = match a.transport.as_str() {
                "mixed" if k % 2 == 1 => "ws".to_string(),
                "mixed" => "grpc".to_string(),
                t => t.to_string(),
            };
            if transport == "ws" && a.connections > 0 {
                ws_shared
                    .entry(k % a.connections.min(a.streams))
                    .or_default()
                    .push(syms);
                continue;
            }
            let grpc = links.grpc(k, a.connections.min(a.streams));
            let nats = links.nats(k);
            let subs = vec![syms];
            let contiguous = (a.per_stream == 0 && a.system == "tickwire") || transport == "nats";
            tasks.push(spawn_stream(
                &a, &sh, k, transport, subs, grpc, nats, contiguous,
            ));
        }
        // Connections this process holds open for the streams.
        let opened = if a.connections == 0 {
            a.streams
        } else if a.transport == "nats" {
            links.nats.len()
        } else {
            links.grpc.len() + ws_shared.len()
        };
        for (c, subs) in ws_shared {
            // Several subscriptions on one socket: sequences are checked
            // only when it carries one.
            let contiguous = a.per_stream == 0 && subs.len() == 1;
            tasks.push(spawn_stream(
                &a,
                &sh,
                c,
                "ws".into(),
                subs,
                None,
                None,
                contiguous,
            ));
        }
        // Settle: every stream connected (or 10 s), then 1 s more.
        let deadline = Instant::now() + Duration::from_secs(10);
        while (sh.connected.load(Ordering::Relaxed) as usize) < a.streams
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        sh.measuring.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(a.seconds)).await;
        sh.measuring.store(false, Ordering::Relaxed);
        let elapsed = t0.elapsed();
        sh.done.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if let Some(t) = slow {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let (hist, to_edge) = LATENCIES.with_borrow(|l| (l.end_to_end.clone(), l.to_edge.clone()));
        Ok::<_, String>((hist, to_edge, elapsed, opened))
    })?;
    let events = sh.events.load(Ordering::Relaxed);
    let messages = sh.messages.load(Ordering::Relaxed);
    let per_message =
        (messages > 0).then(|| (events as f64 / messages as f64 * 10.0).round() / 10.0);
    let connected = sh.connected.load(Ordering::Relaxed);
    if connected == 0 {
        return Err(format!("{} {}: no stream connected", a.system, a.transport));
    }
    let quantiles = |h: &Histogram<u64>| {
        (!h.is_empty()).then(|| {
            json!({"p50_ns": h.value_at_quantile(0.5), "p99_ns": h.value_at_quantile(0.99),
                "p999_ns": h.value_at_quantile(0.999), "max_ns": h.max(), "samples": h.len()})
        })
    };
    let lat = quantiles(&hist);
    let lat_to_edge = quantiles(&to_edge);
    Ok(json!({
        "subscribers": a.streams,
        "connected": connected,
        "connections": opened,
        "transport": a.transport,
        "events": events,
        "events_per_message": per_message,
        "events_per_sec": (events as f64 / elapsed.as_secs_f64()).round(),
        "lost": sh.lost.load(Ordering::Relaxed),
        "gap_notices": sh.gap_notices.load(Ordering::Relaxed),
        "slow_consumer_notices": sh.slow_notices.load(Ordering::Relaxed),
        "stream_errors": sh.errors.load(Ordering::Relaxed),
        "stream_error_kinds": sh.error_kinds.lock().map(|k| json!(*k)).unwrap_or(Value::Null),
        "slow_client": a.slow.then(|| json!({
            "events_after_stall": sh.slow_events.load(Ordering::Relaxed),
            "gap_notices": sh.slow_gaps.load(Ordering::Relaxed),
            "events_in_gaps": sh.slow_gap_events.load(Ordering::Relaxed),
            "slow_consumer_notices": sh.slow_told.load(Ordering::Relaxed),
            "ended": sh.slow_ended.load(Ordering::Relaxed),
        })),
        "latency": lat,
        "latency_ingest_to_edge": lat_to_edge,
    }))
}

/// The connections a client process opens ahead of its streams: NATS
/// connections (shared round-robin by the streams when `connections` is
/// set, one per stream otherwise) and, when `connections` is set, the gRPC
/// channel of each connection index a gRPC stream uses (a gRPC or
/// WebSocket stream without a shared connection opens its own).
struct Links {
    grpc: std::collections::HashMap<usize, tonic::client::Grpc<tonic::transport::Channel>>,
    nats: Vec<async_nats::Client>,
}

impl Links {
    async fn open(a: &ClientArgs) -> Result<Links, String> {
        let shared = a.connections.min(a.streams);
        let mut links = Links {
            grpc: std::collections::HashMap::new(),
            nats: Vec::new(),
        };
        if a.transport == "nats" {
            let n = if shared > 0 { shared } else { a.streams };
            for _ in 0..n {
                let c = async_nats::ConnectOptions::new()
                    .subscription_capacity(1 << 16)
                    .connect(a.nats.clone())
                    .await
                    .map_err(|e| format!("nats client: {e}"))?;
                links.nats.push(c);
            }
        } else if shared > 0 {
            for k in 0..a.streams {
                let grpc = a.transport == "grpc" || (a.transport == "mixed" && k % 2 == 0);
                if grpc && !links.grpc.contains_key(&(k % shared)) {
                    let channel = wire_scan::raw_client(format!("http://{}", a.grpc)).await?;
                    links.grpc.insert(k % shared, channel);
                }
            }
        }
        Ok(links)
    }

    /// The shared channel of stream `k`, if channels are shared.
    fn grpc(
        &self,
        k: usize,
        connections: usize,
    ) -> Option<tonic::client::Grpc<tonic::transport::Channel>> {
        let c = k.checked_rem(connections)?;
        self.grpc.get(&c).cloned()
    }

    /// The NATS connection of stream `k`.
    fn nats(&self, k: usize) -> Option<async_nats::Client> {
        (!self.nats.is_empty()).then(|| self.nats[k % self.nats.len()].clone())
    }
}

/// One task reading a stream (or, over WebSocket, every subscription in
/// `subs` on one connection) into one tally; its error is counted.
#[allow(clippy::too_many_arguments)]
fn spawn_stream(
    a: &ClientArgs,
    sh: &Arc<Shared>,
    k: usize,
    transport: String,
    subs: Vec<Vec<String>>,
    grpc: Option<tonic::client::Grpc<tonic::transport::Channel>>,
    nats: Option<async_nats::Client>,
    contiguous: bool,
) -> tokio::task::JoinHandle<()> {
    let (a, sh) = (a.clone(), sh.clone());
    tokio::spawn(async move {
        let mut t = Tally::new(contiguous);
        let syms = subs.first().cloned().unwrap_or_default();
        let r = match transport.as_str() {
            "grpc" => grpc_stream(&a, grpc, &syms, &sh, &mut t).await,
            "ws" => ws_stream(&a, &subs, &sh, &mut t).await,
            _ => match nats {
                Some(c) => nats_stream(&c, &syms, &sh, &mut t).await,
                None => Err("no nats client".into()),
            },
        };
        if let Err(e) = r {
            if sh.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("edge client: stream {k}: {e}");
            }
            if let Ok(mut kinds) = sh.error_kinds.lock() {
                *kinds.entry(e).or_default() += 1;
            }
        }
    })
}

/// Opens a gRPC stream on `shared` (an HTTP/2 channel other streams use
/// too) or on its own connection, decoding the lite view.
async fn open_grpc(
    a: &ClientArgs,
    shared: Option<tonic::client::Grpc<tonic::transport::Channel>>,
    syms: &[String],
    name: &str,
) -> Result<tonic::Streaming<bytes::Bytes>, String> {
    use tickwire_proto::pb;
    let mut grpc = match shared {
        Some(mut g) => {
            g.ready().await.map_err(|e| e.to_string())?;
            g
        }
        None => wire_scan::raw_client(format!("http://{}", a.grpc)).await?,
    };
    let req = pb::StreamRequest {
        symbols: syms.to_vec(),
        topic: TOPIC.into(),
        subscription_name: name.into(),
        ..Default::default()
    };
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/tickwire.v1.MarketDataStream/StreamMarketData",
    );
    Ok(grpc
        .server_streaming(
            tonic::Request::new(req),
            path,
            wire_scan::RawCodec::default(),
        )
        .await
        .map_err(|e| format!("subscribe: {e}"))?
        .into_inner())
}

async fn grpc_stream(
    a: &ClientArgs,
    shared: Option<tonic::client::Grpc<tonic::transport::Channel>>,
    syms: &[String],
    sh: &Shared,
    t: &mut Tally,
) -> Result<(), String> {
    let mut stream = open_grpc(a, shared, syms, "bench").await?;
    sh.connected.fetch_add(1, Ordering::Relaxed);
    while !sh.done.load(Ordering::Relaxed) {
        let Some(m) = stream.message().await.map_err(|e| e.to_string())? else {
            break;
        };
        let now = realtime_ns();
        let read = wire_scan::grpc_response(&m, |e| t.scanned(sh, e, now));
        sh.message();
        match read {
            Some(Notice::None) => {}
            Some(Notice::Gap { from, to }) => count_gap(sh, t, from, to),
            Some(Notice::Slow) => {
                sh.slow_notices.fetch_add(1, Ordering::Relaxed);
            }
            None => return Err(format!("not a StreamResponse ({} bytes)", m.len())),
        }
    }
    Ok(())
}

/// The slow_1 stream: subscribes to everything, reads nothing while the
/// others are measured, then reads for 2 s and counts what it was told.
async fn slow_stream(a: &ClientArgs, sh: &Shared) -> Result<(), String> {
    let mut stream = open_grpc(a, None, &[], "slow").await?;
    while !sh.done.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let end = Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(Some(m))) = tokio::time::timeout_at(end.into(), stream.message()).await {
        let mut events = 0;
        match wire_scan::grpc_response(&m, |_| events += 1) {
            Some(Notice::Gap { from, to }) => {
                sh.slow_gaps.fetch_add(1, Ordering::Relaxed);
                sh.slow_gap_events
                    .fetch_add(to.saturating_sub(from) + 1, Ordering::Relaxed);
            }
            Some(Notice::Slow) => {
                sh.slow_told.fetch_add(1, Ordering::Relaxed);
            }
            Some(Notice::None) | None => {}
        }
        sh.slow_events.fetch_add(events, Ordering::Relaxed);
    }
    sh.slow_ended.store(true, Ordering::Relaxed);
    Ok(())
}

/// A gap notice: its range is the loss when sequences are not checked
/// (a filtered stream), and it resets the contiguity check otherwise.
fn count_gap(sh: &Shared, t: &mut Tally, from: u64, to: u64) {
    sh.gap_notices.fetch_add(1, Ordering::Relaxed);
    if !t.contiguous && sh.measuring.load(Ordering::Relaxed) {
        sh.lost
            .fetch_add(to.saturating_sub(from) + 1, Ordering::Relaxed);
    }
}

/// One WebSocket connection carrying a subscription per entry of `subs`.
async fn ws_stream(
    a: &ClientArgs,
    subs: &[Vec<String>],
    sh: &Shared,
    t: &mut Tally,
) -> Result<(), String> {
    use tokio_tungstenite::tungstenite::Message;
    let url = format!("ws://{}/api/v1/market-data/stream", a.http);
    let mut cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
    cfg.max_message_size = Some(64 << 20);
    cfg.max_frame_size = Some(64 << 20);
    // tungstenite zero-fills this much of its buffer on every read.
    cfg.read_buffer_size = 16 << 10;
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(cfg), true)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    for syms in subs {
        let sub = if syms.is_empty() {
            json!({"type": "subscribe", "payload": {"topic": TOPIC}})
        } else {
            json!({"type": "subscribe", "payload": {"topic": TOPIC, "symbols": syms}})
        };
        ws.send(Message::Text(sub.to_string().into()))
            .await
            .map_err(|e| e.to_string())?;
    }
    sh.connected.fetch_add(subs.len() as u64, Ordering::Relaxed);
    let keys = wire_scan::JsonKeys::default();
    while !sh.done.load(Ordering::Relaxed) {
        let Some(m) = ws.next().await else { break };
        let text = match m.map_err(|e| e.to_string())? {
            Message::Text(t) => t,
            Message::Close(_) => break,
            _ => continue,
        };
        let now = realtime_ns();
        if keys
            .data(text.as_bytes(), |e| t.scanned(sh, e, now))
            .is_some()
        {
            sh.message();
            continue;
        }
        let Ok(msg) = serde_json::from_str::<WsMsg>(text.as_str()) else {
            return Err(format!("not a WebSocketMessage: {}", text.as_str()));
        };
        match msg.kind.as_str() {
            "data" => {
                return Err(format!(
                    "a data message that does not scan: {}",
                    text.as_str()
                ));
            }
            "gap" => count_gap(sh, t, msg.payload.from_sequence, msg.payload.to_sequence),
            "slow_consumer" => {
                sh.slow_notices.fetch_add(1, Ordering::Relaxed);
            }
            "error" => return Err(format!("error from the edge: {text}")),
            _ if msg.payload.notice == "gap" => {
                count_gap(sh, t, msg.payload.from_sequence, msg.payload.to_sequence)
            }
            _ => {}
        }
    }
    Ok(())
}

async fn nats_stream(
    c: &async_nats::Client,
    syms: &[String],
    sh: &Shared,
    t: &mut Tally,
) -> Result<(), String> {
    let subjects: Vec<String> = if syms.is_empty() {
        vec!["md.>".into()]
    } else {
        syms.iter()
            .map(|s| format!("md.{s}.{EXCHANGE}.trade"))
            .collect()
    };
    let mut subs = Vec::new();
    for s in subjects {
        subs.push(c.subscribe(s).await.map_err(|e| e.to_string())?);
    }
    c.flush().await.map_err(|e| e.to_string())?;
    sh.connected.fetch_add(1, Ordering::Relaxed);
    let mut all = futures::stream::select_all(subs);
    while !sh.done.load(Ordering::Relaxed) {
        let Some(m) = all.next().await else { break };
        let now = realtime_ns();
        let p = &m.payload;
        let word = |i: usize| {
            p.get(i * 8..i * 8 + 8)
                .and_then(|w| w.try_into().ok())
                .map(u64::from_le_bytes)
        };
        if let (Some(seq), Some(ts), Some(key)) = (word(0), word(1), word(2)) {
            t.event(sh, key, seq, ts, 0, now);
            sh.message();
        }
    }
    Ok(())
}

// --------------------------------------------------------------- REST latest

/// `rest_latest`: wrk against tickwire's latest endpoint and the bare axum
/// handler with a body of the same size, one after the other.
fn rest_latest(b: &EdgeBench, tw: &TwServer, plain: &PlainServer) -> Result<(), String> {
    // Something to answer: a few events on every symbol.
    let _ = with_publisher(b, 100_000, Publisher::Tickwire(tw), || {
        std::thread::sleep(Duration::from_millis(500));
        Ok(json!({}))
    })?;
    for (system, addr) in [("tickwire", tw.http), ("plain_axum", plain.http)] {
        let url = format!("http://{addr}/api/v1/market-data/SYM001/latest");
        let out = Command::new("taskset")
            .args(["-c", &b.client_core.to_string(), "wrk", "-t1", "-c32"])
            .arg(format!("-d{}s", b.seconds.ceil() as u64))
            .args(["--latency", &url])
            .output()
            .map_err(|e| format!("wrk (apt-get install wrk): {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let rps = text
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse::<f64>().ok());
        let pct = |p: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(p))
                .map(|v| v.trim().to_string())
        };
        let non2xx = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
            .map(|v| v.trim().to_string());
        // Half of that saturation rate, paced, timed per request.
        let half = rps.map(|r| r / 2.0).unwrap_or(0.0);
        let paced = (half > 0.0)
            .then(|| {
                paced_http(
                    addr,
                    "/api/v1/market-data/SYM001/latest",
                    half,
                    32,
                    b.seconds,
                    b.client_core,
                )
            })
            .transpose()?;
        let half_row = paced.map(|(done, h, bad)| {
            json!({"offered_per_sec": half.round(), "requests_per_sec": done.round(),
                "p50_ms": h.value_at_quantile(0.5) as f64 / 1e6,
                "p99_ms": h.value_at_quantile(0.99) as f64 / 1e6,
                "p999_ms": h.value_at_quantile(0.999) as f64 / 1e6,
                "max_ms": h.max() as f64 / 1e6, "non_200": bad,
                "tool": "bench: 32 keep-alive connections, paced, timed send to last byte"})
        });
        println!(
            "{}",
            json!({"bench": "edge", "case": "rest_latest", "system": system,
                "requests_per_sec": rps, "p50": pct("50%"), "p99": pct("99%"),
                "non_2xx": non2xx, "connections": 32, "tool": "wrk -t1 -c32",
                "at_half_saturation": half_row, "cores": b.layout()})
        );
    }
    Ok(())
}

/// GETs `path` from `addr` at `rate` requests per second in total over
/// `conns` keep-alive HTTP/1.1 connections for `secs`, on `core`. Each
/// request is timed from its send to the last byte of its answer. Returns
/// (answered per second, latency histogram in ns, answers other than 200).
fn paced_http(
    addr: SocketAddr,
    path: &str,
    rate: f64,
    conns: usize,
    secs: f64,
    core: usize,
) -> Result<(f64, Histogram<u64>, u64), String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    let thread = std::thread::spawn(move || {
        pin(core);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let start = tokio::time::Instant::now() + Duration::from_millis(100);
            let end = start + Duration::from_secs_f64(secs);
            let every = Duration::from_secs_f64(conns as f64 / rate);
            let mut tasks = Vec::new();
            for c in 0..conns {
                let request = request.clone();
                tasks.push(tokio::spawn(async move {
                    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
                        .map_err(|e| e.to_string())?;
                    let (mut done, mut bad) = (0u64, 0u64);
                    let tcp = tokio::net::TcpStream::connect(addr)
                        .await
                        .map_err(|e| e.to_string())?;
                    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
                    let mut io = tokio::io::BufReader::new(tcp);
                    let mut due = start + every.mul_f64(c as f64 / conns as f64);
                    let mut line = String::new();
                    while due < end {
                        tokio::time::sleep_until(due).await;
                        due += every;
                        let t0 = Instant::now();
                        io.get_mut()
                            .write_all(request.as_bytes())
                            .await
                            .map_err(|e| e.to_string())?;
                        let (mut status, mut len) = (0u16, 0usize);
                        loop {
                            line.clear();
                            if io.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
                                return Err("the server closed the connection".to_string());
                            }
                            let l = line.trim_end();
                            if l.is_empty() {
                                break;
                            }
                            if status == 0 {
                                status = l
                                    .split(' ')
                                    .nth(1)
                                    .and_then(|c| c.parse().ok())
                                    .unwrap_or(0);
                            } else if let Some((k, v)) = l.split_once(':')
                                && k.eq_ignore_ascii_case("content-length")
                            {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0u8; len];
                        io.read_exact(&mut body).await.map_err(|e| e.to_string())?;
                        let _ = h.record(t0.elapsed().as_nanos().max(1) as u64);
                        done += 1;
                        if status != 200 {
                            bad += 1;
                        }
                    }
                    Ok::<_, String>((h, done, bad))
                }));
            }
            let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
                .map_err(|e| e.to_string())?;
            let (mut done, mut bad) = (0u64, 0u64);
            for t in tasks {
                let (h, d, x) = t.await.map_err(|e| e.to_string())??;
                let _ = all.add(&h);
                done += d;
                bad += x;
            }
            Ok::<_, String>((done as f64 / secs, all, bad))
        })
    });
    thread
        .join()
        .map_err(|_| "paced HTTP client panicked".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    /// The bare servers send what the edge sends: full events, with their
    /// instrument, stamps and source, that the clients read as ours.
    #[test]
    fn the_plain_batch_is_the_edges_encoding_of_full_events() {
        let PlainBatch { grpc, ws } = plain_batch();
        let resp = tickwire_proto::pb::StreamResponse::decode(grpc.0.clone()).expect("decodes");
        let Some(tickwire_proto::pb::stream_response::Kind::Batch(batch)) = resp.kind else {
            panic!("not a batch");
        };
        assert_eq!(batch.messages.len(), PLAIN_BATCH);
        for (i, m) in batch.messages.iter().enumerate() {
            let d = m.data.as_ref().expect("data");
            let md = m.metadata.as_ref().expect("metadata");
            assert_eq!(
                (d.symbol.as_str(), d.exchange.as_str()),
                (symbol(i).as_str(), EXCHANGE)
            );
            assert_eq!(md.sequence, 1_000_000 + i as u64);
            assert!(md.ingest_time_ns > 0 && md.send_time_ns > md.ingest_time_ns);
            assert_eq!(md.source_seq, 1_000_000 + i as u64);
        }
        let mut scanned = Vec::new();
        wire_scan::grpc_response(&grpc.0, |e| scanned.push(e)).expect("scans");
        let mut from_json = Vec::new();
        wire_scan::JsonKeys::default()
            .data(ws.as_bytes(), |e| from_json.push(e))
            .expect("scans");
        assert_eq!(scanned.len(), PLAIN_BATCH);
        assert_eq!(from_json.len(), PLAIN_BATCH);
        for (g, j) in scanned.iter().zip(&from_json) {
            assert_eq!(
                (g.sequence, g.ingest_ns, g.send_ns),
                (j.sequence, j.ingest_ns, j.send_ns)
            );
        }
    }

    /// The bare fan-out's batch holds the events due over its interval,
    /// stamped evenly across it up to the tick, in both encodings: the
    /// wait for the batch is in the latency its clients measure.
    #[test]
    fn a_paced_batch_spreads_its_events_over_the_interval_before_the_tick() {
        let tick = 1_800_000_000_000_000_000u64;
        let b = fanout_batch(4, 2_000_000, tick);
        let mut g = Vec::new();
        wire_scan::grpc_response(&b.grpc.0, |e| g.push(e)).expect("scans");
        let mut j = Vec::new();
        wire_scan::JsonKeys::default()
            .data(b.ws.as_bytes(), |e| j.push(e))
            .expect("scans");
        let ingest: Vec<u64> = g.iter().map(|e| e.ingest_ns).collect();
        assert_eq!(
            ingest,
            [tick - 1_500_000, tick - 1_000_000, tick - 500_000, tick]
        );
        assert_eq!(ingest, j.iter().map(|e| e.ingest_ns).collect::<Vec<_>>());
        assert!(g.iter().chain(&j).all(|e| e.send_ns == tick));
    }

    /// Subscribers spread over shared connections (gRPC streams on shared
    /// HTTP/2 channels, several subscriptions per WebSocket) all subscribe
    /// and receive, losing nothing, over the connections reported.
    #[test]
    fn subscribers_spread_over_shared_connections_all_receive() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            b: EdgeBench,
        }
        let b = <Cli as clap::Parser>::parse_from(["edge", "--seconds", "1"]).b;
        let tw = TwServer::start(&b).expect("tickwire starts");
        let a = ClientArgs {
            system: "tickwire".into(),
            transport: "mixed".into(),
            grpc: tw.grpc.to_string(),
            http: tw.http.to_string(),
            nats: String::new(),
            streams: 20,
            connections: 4,
            per_stream: 10,
            symbols: b.symbols,
            seconds: 1.0,
            core: b.client_core,
            slow: false,
        };
        let r = with_publisher(&b, 5_000, Publisher::Tickwire(&tw), || client(&a))
            .expect("the client runs");
        tw.stop();
        assert_eq!(r["stream_errors"], 0, "{r}");
        assert_eq!(r["connected"], 20, "every subscription made: {r}");
        // Even streams are gRPC (channels 0 and 2), odd ones WebSocket
        // (connections 1 and 3).
        assert_eq!(r["connections"], 4, "{r}");
        assert_eq!(
            (r["lost"].as_u64(), r["gap_notices"].as_u64()),
            (Some(0), Some(0)),
            "{r}"
        );
        assert!(
            r["events"].as_u64().unwrap_or(0) > 0,
            "nothing received: {r}"
        );
    }
}

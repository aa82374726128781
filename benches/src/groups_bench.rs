//! `tickwire-bench groups`: subscription groups of 4 at-least-once
//! consumers (Shared, Key_Shared) beside Apache Pulsar's own subscriptions
//! of the same type, on the same number of events, in the same run.
//!
//! - `drain`: a preloaded backlog, drained by a new group of 4; delivered
//!   events/s = events / (last receive - first receive), over the group.
//!   The shm groups drain a longer backlog (`--shm-messages`), held in the
//!   rings unless `--shm-from-journal`: at their rate, the remote cases'
//!   backlog is gone in a few milliseconds, less than a scheduler slice of
//!   the four members sharing two cores.
//! - `paced`: events sent at `rate`/s to a group of 4 already attached;
//!   latency = receive time - the event's own timestamp (set when it was
//!   sent), every member's merged.
//!
//! tickwire: broker and edge in this process (4 partitions); the members
//! are gRPC `ConsumeMarketData` streams on their own runtime thread,
//! acknowledging each batch as it arrives. tickwire_shm: the same group
//! over shared memory, 4 member threads in this process
//! (`shm_client::group`), each reading the rings and acknowledging every
//! event it was given; beside it in the same run, one ungrouped tethered
//! shm reader of the same events (`shm_tethered`), the bar the issue sets
//! (a group within 2x of it). Pulsar: the services' Pulsar,
//! a topic of the same events, the members are 4 processes of Apache's
//! Python client (`benches/python/pulsar_consume.py`), acknowledging each
//! message. Key_Shared messages carry their key and are produced
//! unbatched: a batch of mixed keys would go to one member whole, which is
//! not Key_Shared. Nothing is pinned: on 2 cores the broker, the edge, the
//! group thread and the members (or Pulsar's JVM and the Python
//! processes) share both.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tickwire_api::{Edge, EdgeConfig};
use tickwire_broker::config::{Config, TopicConfig};
use tickwire_broker::edge::BrokerEngine;
use tickwire_broker::engine::{Broker, Ingest};
use tickwire_proto::FrameBody;
use tickwire_proto::futex::realtime_ns;
use tickwire_proto::pb;
use tickwire_proto::symbology::Instrument;
use tokio_util::sync::CancellationToken;

use crate::pulsar_bench::{ensure_python_client, producer, script, unique};
use crate::wire_scan;

const TOPIC: &str = "bench/groups";
const MEMBERS: usize = 4;
const QUEUE: u32 = 1000;

/// `tickwire-bench groups` settings.
#[derive(clap::Args)]
pub struct GroupsBench {
    /// Pulsar service URL.
    #[arg(long, default_value = "pulsar://127.0.0.1:6650")]
    pub url: String,
    /// Events in the drained backlog.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Events in the backlog the shm groups drain (and the tethered reader
    /// beside them): enough for a window of a good part of a second at
    /// tens of millions of events/s, and held whole in the rings (sized
    /// for it), so a drain reads shared memory as a live group does.
    #[arg(long, default_value_t = 4_000_000)]
    pub shm_messages: u64,
    /// Keep the rings at 65,536 events per partition instead, so that the
    /// shm groups and the tethered reader drain the backlog from the
    /// journal (every Key_Shared member reads all of it there).
    #[arg(long)]
    pub shm_from_journal: bool,
    /// Paced rate, events/s.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Seconds of paced sending.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Cases: shared_4, key_shared_4.
    #[arg(long, default_value = "shared_4,key_shared_4")]
    pub cases: String,
    /// Systems: tickwire, tickwire_shm, pulsar_client.
    #[arg(long, default_value = "tickwire,tickwire_shm,pulsar_client")]
    pub systems: String,
    /// Instruments (keys) the events go round. Key_Shared spreads keys,
    /// not events: with few keys the busiest member's share sets the pace.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,
}

/// What a group of members saw.
#[derive(Debug, Default)]
struct Outcome {
    events: u64,
    unique: u64,
    redelivered: u64,
    elapsed_ns: u64,
    lat: Option<Histogram<u64>>,
    /// Events the busiest member got (0: not known per member).
    busiest: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).unwrap_or_else(|_| unreachable!())
}

struct Node {
    _dir: tempfile::TempDir,
    broker: Option<Broker>,
    edge: Option<Edge>,
    cancel: CancellationToken,
    rt: tokio::runtime::Runtime,
}

impl Node {
    /// A node whose rings hold `backlog` events (4 partitions).
    fn start(backlog: u64) -> Result<Node, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut c = Config::default();
        c.node.dir = Some(dir.path().join("node"));
        c.journal.dir = Some(dir.path().join("journal"));
        c.synthetic.enabled = false;
        c.stats.log_interval_secs = 0;
        c.topics = vec![TopicConfig {
            name: TOPIC.into(),
            partitions: 4,
            capacity: (backlog.div_ceil(4) + 4096)
                .next_power_of_two()
                .max(1 << 16),
            ..TopicConfig::default()
        }];
        let broker = Broker::start(&c).map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let cancel = CancellationToken::new();
        let engine = Arc::new(BrokerEngine::new(&broker));
        let cfg = EdgeConfig {
            grpc_addr: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
            http_addr: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
            store_url: format!("sqlite://{}", dir.path().join("store.db").display()),
            ..EdgeConfig::default()
        };
        let edge = rt
            .block_on(Edge::start(cfg, engine, cancel.clone()))
            .map_err(|e| e.to_string())?;
        Ok(Node {
            _dir: dir,
            broker: Some(broker),
            edge: Some(edge),
            cancel,
            rt,
        })
    }

    fn node_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("node")
    }

    fn ingest(&self) -> Result<Ingest, String> {
        Ok(self.broker.as_ref().ok_or("stopped")?.ingest(1))
    }

    fn grpc(&self) -> String {
        self.edge
            .as_ref()
            .map(|e| format!("http://{}", e.grpc_addr))
            .unwrap_or_default()
    }

    fn stop(mut self) {
        self.cancel.cancel();
        if let Some(e) = self.edge.take() {
            self.rt.block_on(e.join());
        }
        if let Some(b) = self.broker.take() {
            b.shutdown();
        }
    }
}

/// Sends events `from..to` over `keys` instruments, paced at `rate`
/// (0: as fast as the rings take them); each carries its send time.
fn send(ingest: &mut Ingest, keys: u64, from: u64, to: u64, rate: u64) -> Result<(), String> {
    let t = ingest.resolver().topic(TOPIC).ok_or("topic not routable")?;
    let mut routes = Vec::new();
    for k in 0..keys {
        routes.push(
            ingest
                .resolver()
                .route(
                    t,
                    &Instrument {
                        symbol: format!("S{k}"),
                        exchange: "NASDAQ".into(),
                        currency: "USD".into(),
                        size_decimals: 0,
                    },
                )
                .map_err(|e| format!("route: {e}"))?,
        );
    }
    let started = Instant::now();
    for i in from..to {
        let mut body = FrameBody::trade(0, realtime_ns(), 100_000_000_000, 100);
        body.source_seq = i + 1;
        while ingest
            .try_send(&routes[(i % keys) as usize], &body, None)
            .is_err()
        {
            std::thread::yield_now();
        }
        if rate > 0 {
            let due = started + Duration::from_secs_f64((i - from) as f64 / rate as f64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
    }
    Ok(())
}

struct Shared {
    events: AtomicU64,
    redelivered: AtomicU64,
    seen: Mutex<Seen>,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    lat: Mutex<Histogram<u64>>,
}

/// Which events arrived, by their source sequence (the sender numbers
/// them 1, 2, ...): one bit each, marked a batch at a time.
#[derive(Default)]
struct Seen {
    words: Vec<u64>,
    distinct: u64,
}

impl Seen {
    fn insert(&mut self, source_seq: u64) {
        let (w, bit) = ((source_seq / 64) as usize, 1u64 << (source_seq % 64));
        if w >= self.words.len() {
            self.words.resize(w + 1 + w / 4, 0);
        }
        if self.words[w] & bit == 0 {
            self.words[w] |= bit;
            self.distinct += 1;
        }
    }
}

/// One tickwire member: receive, record, acknowledge each batch.
///
/// As the edge bench's clients do (`wire_scan`), it reads only what it
/// uses off the wire (each event's id, source sequence, redelivery count
/// and time) and leaves the market data in its bytes, as Pulsar's client
/// leaves a message's payload: building every `MarketDataMessage` with
/// prost cost the shared cores more than the broker's whole group did.
async fn member(
    url: String,
    kind: pb::SubscriptionType,
    sub: String,
    name: String,
    start: pb::MessagePosition,
    s: Arc<Shared>,
    stop: CancellationToken,
) -> Result<(), String> {
    let mut grpc = wire_scan::raw_client(url).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tx.send(pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Subscribe(pb::StreamRequest {
            topic: TOPIC.into(),
            subscription_name: sub,
            subscription_type: kind as i32,
            delivery_mode: pb::DeliveryMode::AtLeastOnce as i32,
            consumer_name: name,
            receiver_queue_size: QUEUE,
            start_position: start as i32,
            ..Default::default()
        })),
    })
    .await
    .map_err(|e| e.to_string())?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/tickwire.v1.MarketDataStream/ConsumeMarketData",
    );
    let mut stream = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            path,
            wire_scan::RawCodec::<pb::ConsumeRequest>::default(),
        )
        .await
        .map_err(|e| format!("consume: {e}"))?
        .into_inner();
    loop {
        let m = tokio::select! {
            m = stream.message() => m,
            _ = stop.cancelled() => return Ok(()),
        };
        let Some(m) = m.map_err(|e| e.to_string())? else {
            return Ok(());
        };
        let now = realtime_ns();
        let at = Instant::now();
        let mut ids = Vec::new();
        {
            let mut seen = s.seen.lock().map_err(|_| "lock")?;
            let mut lat = s.lat.lock().map_err(|_| "lock")?;
            let mut redelivered = 0;
            wire_scan::grpc_response(&m, |e| {
                seen.insert(e.source_seq);
                if e.redeliveries > 0 {
                    redelivered += 1;
                }
                let _ = lat.record(now.saturating_sub(e.event_ns).max(1));
                ids.push(pb::MessageId {
                    partition: e.partition,
                    epoch: e.epoch,
                    sequence: e.sequence,
                });
            })
            .ok_or("a response that is not a StreamResponse")?;
            s.redelivered.fetch_add(redelivered, Ordering::Relaxed);
        }
        if ids.is_empty() {
            continue;
        }
        s.events.fetch_add(ids.len() as u64, Ordering::Relaxed);
        if let Ok(mut f) = s.first.lock() {
            f.get_or_insert(at);
        }
        if let Ok(mut l) = s.last.lock() {
            *l = Some(at);
        }
        let ack = pb::ConsumeRequest {
            kind: Some(pb::consume_request::Kind::Ack(pb::AckRequest {
                message_ids: ids,
                cumulative: false,
            })),
        };
        if tx.send(ack).await.is_err() {
            return Ok(());
        }
    }
}

/// A group of 4 tickwire members until `want` distinct events arrived.
fn tw_group(
    node: &Node,
    kind: pb::SubscriptionType,
    sub: &str,
    start: pb::MessagePosition,
    want: u64,
    during: impl FnOnce() -> Result<(), String>,
) -> Result<Outcome, String> {
    let s = Arc::new(Shared {
        events: AtomicU64::new(0),
        redelivered: AtomicU64::new(0),
        seen: Mutex::new(Seen::default()),
        first: Mutex::new(None),
        last: Mutex::new(None),
        lat: Mutex::new(histogram()),
    });
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..MEMBERS {
        tasks.push(node.rt.spawn(member(
            node.grpc(),
            kind,
            sub.to_string(),
            format!("m{i}"),
            start,
            s.clone(),
            stop.clone(),
        )));
    }
    // Every member in before anything is sent.
    let state = node.edge.as_ref().ok_or("stopped")?.state.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while state
        .groups
        .get(TOPIC, sub)
        .is_none_or(|g| g.snapshot.lock().map_or(0, |x| x.members.len()) < MEMBERS)
    {
        if Instant::now() > deadline {
            return Err("tickwire group: members did not join in 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    during()?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n = s.seen.lock().map_err(|_| "lock")?.distinct;
        if n >= want {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("tickwire group: {n} of {want} events in 300 s"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.cancel();
    for t in tasks {
        node.rt
            .block_on(t)
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("member: {e}"))?;
    }
    let first = s.first.lock().map_err(|_| "lock")?.ok_or("nothing")?;
    let last = s.last.lock().map_err(|_| "lock")?.ok_or("nothing")?;
    let lat = s.lat.lock().map_err(|_| "lock")?.clone();
    Ok(Outcome {
        events: s.events.load(Ordering::Relaxed),
        unique: s.seen.lock().map_err(|_| "lock")?.distinct,
        redelivered: s.redelivered.load(Ordering::Relaxed),
        elapsed_ns: last.duration_since(first).as_nanos() as u64,
        lat: Some(lat),
        busiest: 0,
    })
}

/// What one shm reader thread saw.
#[derive(Default)]
struct Local {
    seen: Vec<u64>,
    events: u64,
    redelivered: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    lat: Option<Histogram<u64>>,
}

impl Local {
    fn record(&mut self, source_seq: u64, ts: u64, redeliveries: u32, now: u64, at: Instant) {
        self.seen.push(source_seq);
        self.events += 1;
        if redeliveries > 0 {
            self.redelivered += 1;
        }
        if let Some(h) = self.lat.as_mut() {
            let _ = h.record(now.saturating_sub(ts).max(1));
        }
        self.first.get_or_insert(at);
        self.last = Some(at);
    }
}

/// Merges what the reader threads saw.
fn merge(locals: Vec<Local>) -> Outcome {
    let mut seen = HashSet::new();
    let mut out = Outcome {
        lat: Some(histogram()),
        ..Outcome::default()
    };
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    for l in locals {
        out.busiest = out.busiest.max(l.events);
        out.events += l.events;
        out.redelivered += l.redelivered;
        seen.extend(l.seen);
        if let (Some(h), Some(x)) = (out.lat.as_mut(), l.lat.as_ref()) {
            let _ = h.add(x);
        }
        first = match (first, l.first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        last = match (last, l.last) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    out.unique = seen.len() as u64;
    out.elapsed_ns = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_nanos() as u64,
        _ => 1,
    };
    out
}

/// A group of 4 shared-memory members (threads) until `want` first
/// deliveries arrived; each acknowledges every event after each poll.
fn shm_group(
    node: &Node,
    kind: shm_client::group::SubscriptionType,
    sub: &str,
    start: shm_client::Start,
    want: u64,
    during: impl FnOnce() -> Result<(), String>,
) -> Result<Outcome, String> {
    let firsts = Arc::new(AtomicU64::new(0));
    let joined = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..MEMBERS {
        let (dir, sub, firsts, joined, stop) = (
            node.node_dir(),
            sub.to_string(),
            firsts.clone(),
            joined.clone(),
            stop.clone(),
        );
        threads.push(std::thread::spawn(move || -> Result<Local, String> {
            let mut m = shm_client::Subscriber::builder(TOPIC)
                .node_dir(dir)
                .start(start)
                .subscription(sub, kind)
                .consumer_name(format!("m{i}"))
                .open()
                .map_err(|e| e.to_string())?;
            joined.fetch_add(1, Ordering::Relaxed);
            let mut l = Local {
                lat: Some(histogram()),
                ..Local::default()
            };
            let mut acks: Vec<(u32, u64)> = Vec::with_capacity(256);
            while !stop.load(Ordering::Relaxed) {
                acks.clear();
                let now = realtime_ns();
                let at = Instant::now();
                let mut fresh = 0;
                let n = m.poll(256, |e| {
                    if let shm_client::Event::Tick(t) = e {
                        l.record(
                            t.body.source_seq(),
                            t.body.ts_event(),
                            t.redeliveries,
                            now,
                            at,
                        );
                        if t.redeliveries == 0 {
                            fresh += 1;
                        }
                        acks.push((t.partition, t.seq));
                    }
                });
                firsts.fetch_add(fresh, Ordering::Relaxed);
                for &(p, s) in &acks {
                    m.ack(p, s).map_err(|e| e.to_string())?;
                }
                if let Some(r) = m.removed() {
                    return Err(r.to_string());
                }
                if n == 0 {
                    m.wait_for_data(Duration::from_millis(1));
                }
            }
            Ok(l)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while joined.load(Ordering::Relaxed) < MEMBERS as u64 {
        if Instant::now() > deadline || threads.iter().any(|t| t.is_finished()) {
            stop.store(true, Ordering::Relaxed);
            let errs: Vec<String> = threads
                .into_iter()
                .filter_map(|t| t.join().ok().and_then(Result::err))
                .collect();
            return Err(format!(
                "tickwire_shm group: members did not join: {errs:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    during()?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while firsts.load(Ordering::Relaxed) < want {
        if Instant::now() > deadline || threads.iter().any(|t| t.is_finished()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    let mut locals = Vec::new();
    for t in threads {
        locals.push(t.join().map_err(|_| "member thread panicked")??);
    }
    Ok(merge(locals))
}

/// One ungrouped tethered shm reader of the same events until `want`.
fn shm_single(
    node: &Node,
    start: shm_client::Start,
    want: u64,
    during: impl FnOnce() -> Result<(), String>,
) -> Result<Outcome, String> {
    let mut r = shm_client::Subscriber::builder(TOPIC)
        .node_dir(node.node_dir())
        .start(start)
        .tethered(Duration::from_millis(1))
        .open()
        .map_err(|e| e.to_string())?;
    let t = std::thread::spawn(move || -> Local {
        let mut l = Local {
            lat: Some(histogram()),
            ..Local::default()
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        while l.events < want && Instant::now() < deadline {
            let now = realtime_ns();
            let at = Instant::now();
            let n = r.poll(256, |e| {
                if let shm_client::Event::Tick(t) = e {
                    l.record(t.body.source_seq(), t.body.ts_event(), 0, now, at);
                }
            });
            if n == 0 {
                r.wait_for_data(Duration::from_millis(1));
            }
        }
        l
    });
    during()?;
    let l = t.join().map_err(|_| "reader thread panicked")?;
    Ok(merge(vec![l]))
}

fn pulsar_message(i: u64, keys: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({"symbol": format!("S{}", i % keys), "exchange": "NASDAQ", "currency": "USD", "timestamp_ns": realtime_ns(), "price": 100.0, "volume": 100, "seq": i})).unwrap_or_default()
}

/// Produces `from..to` (keyed; batched unless Key_Shared), paced at `rate` (0: flat out).
fn pulsar_send(
    url: &str,
    topic: &str,
    keys: u64,
    from: u64,
    to: u64,
    rate: u64,
    batching: bool,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut p = producer(url, topic, batching).await?;
        let started = Instant::now();
        let mut receipts = Vec::new();
        for i in from..to {
            let r = p
                .create_message()
                .with_content(pulsar_message(i, keys))
                .with_key(format!("S{}", i % keys))
                .send_non_blocking()
                .await
                .map_err(|e| e.to_string())?;
            receipts.push(r);
            if receipts.len() >= 5_000 {
                if batching {
                    p.send_batch().await.map_err(|e| e.to_string())?;
                }
                for r in receipts.drain(..) {
                    r.await.map_err(|e| e.to_string())?;
                }
            }
            if rate > 0 {
                let due = started + Duration::from_secs_f64((i - from) as f64 / rate as f64);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(d).await;
                }
            }
        }
        if batching {
            p.send_batch().await.map_err(|e| e.to_string())?;
        }
        for r in receipts {
            r.await.map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

/// A group of 4 Python members on `topic` until each is idle for 3 s.
fn pulsar_group(
    url: &str,
    topic: &str,
    kind: &str,
    sub: &str,
    latency: bool,
    during: impl FnOnce() -> Result<(), String>,
) -> Result<Outcome, String> {
    use std::io::BufRead;
    let mut members = Vec::new();
    for _ in 0..MEMBERS {
        let mut child = std::process::Command::new("python3")
            .arg(script())
            .args([
                url,
                topic,
                sub,
                kind,
                &QUEUE.to_string(),
                "100000000",
                if latency { "2" } else { "0" },
                "3000",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("python3: {e}"))?;
        let mut lines = std::io::BufReader::new(child.stdout.take().ok_or("stdout")?).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l == "READY" => break,
                Some(Ok(_)) => continue,
                _ => return Err("python consumer exited before READY".into()),
            }
        }
        members.push((child, lines));
    }
    during()?;
    let mut out = Outcome {
        lat: latency.then(histogram),
        ..Outcome::default()
    };
    let (mut first, mut last) = (u64::MAX, 0u64);
    for (mut child, mut lines) in members {
        let line = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.starts_with("{\"events\""))
            .ok_or("python consumer printed no result")?;
        let _ = child.wait();
        let v: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
        let n = v["events"].as_u64().unwrap_or(0);
        out.events += n;
        out.redelivered += v["redelivered"].as_u64().unwrap_or(0);
        if n > 0 {
            first = first.min(v["first_mono_ns"].as_u64().unwrap_or(u64::MAX));
            last = last.max(v["last_mono_ns"].as_u64().unwrap_or(0));
        }
        if let (Some(h), Some(l)) = (out.lat.as_mut(), v["latencies_ns"].as_array()) {
            for x in l {
                let _ = h.record(x.as_u64().unwrap_or(0).max(1));
            }
        }
    }
    // Pulsar gives no source sequence to the script: redeliveries aside,
    // a member's receive is an event.
    out.unique = out.events.saturating_sub(out.redelivered);
    out.elapsed_ns = last.saturating_sub(first).max(1);
    Ok(out)
}

fn line(
    (case, keys): (&str, u64),
    phase: &str,
    system: &str,
    o: &Outcome,
    want: u64,
    extra: Value,
) -> Value {
    let q = |p: f64| o.lat.as_ref().map(|h| h.value_at_quantile(p));
    let mut v = json!({
        "case": case, "phase": phase, "system": system, "members": MEMBERS,
        "delivery": "at_least_once", "receiver_queue_size": QUEUE,
        "events": want, "received": o.events,
        "events_per_sec": (o.events as f64 * 1e9 / o.elapsed_ns.max(1) as f64).round(),
        "p50_ns": q(0.5), "p99_ns": q(0.99), "p999_ns": q(0.999), "max_ns": o.lat.as_ref().map(|h| h.max()),
        "redelivered": o.redelivered, "lost": want.saturating_sub(o.unique),
        "cores": "unpinned: broker, edge, group thread and members (or Pulsar's JVM and the Python members) share both",
        "keys": keys,
    });
    if o.busiest > 0 {
        v["busiest_member_share"] =
            json!((o.busiest as f64 / o.events.max(1) as f64 * 1000.0).round() / 1000.0);
    }
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    v
}

/// Runs the cases; prints one JSON line per case, phase and system.
///
/// # Errors
/// Pulsar unreachable, the Python client missing and not installable, or a
/// group that does not receive everything in time.
pub fn run(b: &GroupsBench) -> Result<(), String> {
    let systems: Vec<&str> = b.systems.split(',').map(str::trim).collect();
    if systems.contains(&"pulsar_client") {
        ensure_python_client()?;
    }
    let paced_n = (b.rate as f64 * b.seconds) as u64;
    let keys = b.keys;
    for case in b.cases.split(',').map(str::trim) {
        let (kind, pkind) = match case {
            "shared_4" => (pb::SubscriptionType::Shared, "shared"),
            "key_shared_4" => (pb::SubscriptionType::KeyShared, "key_shared"),
            other => return Err(format!("unknown case {other:?} (shared_4, key_shared_4)")),
        };
        let mut tw_eps = None;
        if systems.contains(&"tickwire") {
            let node = Node::start(0)?;
            let mut ingest = node.ingest()?;
            send(&mut ingest, keys, 0, b.messages, 0)?;
            // Let the journal take the backlog: the group reads it from there.
            std::thread::sleep(Duration::from_millis(500));
            let mut d = tw_group(
                &node,
                kind,
                "drain",
                pb::MessagePosition::Earliest,
                b.messages,
                || Ok(()),
            )?;
            // A backlog's age is not a latency: the paced phase measures it.
            d.lat = None;
            let v = line(
                (case, keys),
                "drain",
                "tickwire",
                &d,
                b.messages,
                json!({"transport": "grpc ConsumeMarketData"}),
            );
            tw_eps = v["events_per_sec"].as_f64();
            println!("{v}");
            let (from, to, rate) = (b.messages, b.messages + paced_n, b.rate);
            let p = tw_group(
                &node,
                kind,
                "paced",
                pb::MessagePosition::Latest,
                paced_n,
                move || send(&mut ingest, keys, from, to, rate),
            )?;
            println!(
                "{}",
                line(
                    (case, keys),
                    "paced",
                    "tickwire",
                    &p,
                    paced_n,
                    json!({"rate": b.rate, "latency": "receive - event timestamp (set at send)"})
                )
            );
            node.stop();
        }
        if systems.contains(&"tickwire_shm") {
            let skind = match kind {
                pb::SubscriptionType::KeyShared => shm_client::group::SubscriptionType::KeyShared,
                _ => shm_client::group::SubscriptionType::Shared,
            };
            let backlog = b.shm_messages;
            let node = Node::start(if b.shm_from_journal { 0 } else { backlog })?;
            let mut ingest = node.ingest()?;
            send(&mut ingest, keys, 0, backlog, 0)?;
            std::thread::sleep(Duration::from_millis(500));
            let single = shm_single(&node, shm_client::Start::Earliest, backlog, || Ok(()))?;
            let mut d = shm_group(
                &node,
                skind,
                "drain",
                shm_client::Start::Earliest,
                backlog,
                || Ok(()),
            )?;
            d.lat = None;
            let single_eps = single.events as f64 * 1e9 / single.elapsed_ns.max(1) as f64;
            let mut v = line(
                (case, keys),
                "drain",
                "tickwire_shm",
                &d,
                backlog,
                json!({"transport": "shared memory (shm_client::group), 4 member threads",
                    "backlog": if b.shm_from_journal { "in the journal" } else { "in the rings" }}),
            );
            if let Some(g) = v["events_per_sec"].as_f64() {
                v["shm_tethered_events_per_sec"] = json!(single_eps.round());
                v["ratio_to_tethered"] = json!(((g / single_eps.max(1.0)) * 100.0).round() / 100.0);
            }
            println!("{v}");
            let (from, to, rate) = (backlog, backlog + paced_n, b.rate);
            let mut ingest2 = node.ingest()?;
            let single = shm_single(&node, shm_client::Start::Latest, paced_n, move || {
                send(&mut ingest2, keys, from, to, rate)
            })?;
            println!(
                "{}",
                line(
                    (case, keys),
                    "paced",
                    "shm_tethered",
                    &single,
                    paced_n,
                    json!({"rate": b.rate, "latency": "receive - event timestamp (set at send)", "members": 1, "delivery": "ungrouped tethered reader"})
                )
            );
            let (from, to) = (to, to + paced_n);
            let p = shm_group(
                &node,
                skind,
                "paced",
                shm_client::Start::Latest,
                paced_n,
                move || send(&mut ingest, keys, from, to, rate),
            )?;
            println!(
                "{}",
                line(
                    (case, keys),
                    "paced",
                    "tickwire_shm",
                    &p,
                    paced_n,
                    json!({"rate": b.rate, "latency": "receive - event timestamp (set at send)"})
                )
            );
            node.stop();
        }
        if systems.contains(&"pulsar_client") {
            let topic = unique(&format!("groups-{pkind}"));
            let batching = kind == pb::SubscriptionType::Shared;
            pulsar_send(&b.url, &topic, keys, 0, b.messages, 0, batching)?;
            let d = pulsar_group(&b.url, &topic, pkind, "drain", false, || Ok(()))?;
            let mut v = line(
                (case, keys),
                "drain",
                "pulsar_client",
                &d,
                b.messages,
                json!({"producer_batching": batching}),
            );
            if let (Some(t), Some(p)) = (tw_eps, v["events_per_sec"].as_f64()) {
                v["tickwire_ratio"] = json!(((t / p.max(1.0)) * 100.0).round() / 100.0);
            }
            println!("{v}");
            let topic = unique(&format!("groups-paced-{pkind}"));
            let (url, t2) = (b.url.clone(), topic.clone());
            let (n, rate) = (paced_n, b.rate);
            let p = pulsar_group(&b.url, &topic, pkind, "paced", true, move || {
                pulsar_send(&url, &t2, keys, 0, n, rate, batching)
            })?;
            println!(
                "{}",
                line(
                    (case, keys),
                    "paced",
                    "pulsar_client",
                    &p,
                    paced_n,
                    json!({"rate": b.rate, "producer_batching": batching, "latency": "receive - producer timestamp in the payload"})
                )
            );
        }
    }
    Ok(())
}

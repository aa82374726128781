//! `tickwire-bench pulsar`: the bridge beside Pulsar's own consumer
//! (Apache's C++-based Python client, `benches/python/pulsar_consume.py`),
//! against the Pulsar that `scripts/services.sh up` starts.
//!
//! - `drain`: a preloaded backlog drained on separate subscriptions of the
//!   same type and receiver queue size; interleaved trials, medians.
//! - `paced`: a producer paced at `rate` msg/s; both subscriptions read the
//!   same stream at the same time; latency = receive (Python) or
//!   committed-and-read from the ring (tickwire) minus the producer's
//!   timestamp in the payload.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use shm_client::{Event, Start, Subscriber};
use tickwire_bridge::pulsar::{ProducerOptions, Pulsar, TokioExecutor};
use tickwire_bridge::{BridgeConfig, Format, InitialPosition, SubscriptionType};
use tickwire_broker::config::{Config, TopicConfig};
use tickwire_broker::engine::Broker;
use tickwire_broker::pulsar::BridgeHandle;
use tickwire_proto::futex::realtime_ns;

const TARGET: &str = "bench/pulsar";
const RECEIVER_QUEUE: u32 = 1000;

/// `tickwire-bench pulsar` settings.
#[derive(clap::Args)]
pub struct PulsarBench {
    /// Pulsar service URL.
    #[arg(long, default_value = "pulsar://127.0.0.1:6650")]
    pub url: String,
    /// Messages in the drained backlog.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Paced rate, msg/s.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Seconds of paced sending.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Drain trials (interleaved; medians reported).
    #[arg(long, default_value_t = 3)]
    pub trials: usize,
}

pub(crate) fn unique(name: &str) -> String {
    format!(
        "persistent://public/default/bench-{name}-{}-{}",
        std::process::id(),
        realtime_ns()
    )
}

pub(crate) fn script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pulsar_consume.py")
}

/// Installs Apache's Python client from PyPI if it is missing.
pub(crate) fn ensure_python_client() -> Result<(), String> {
    let has = Command::new("python3")
        .args(["-c", "import pulsar"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if has {
        return Ok(());
    }
    eprintln!("tickwire-bench: installing pulsar-client (Apache's Python client) from PyPI");
    let ok = Command::new("python3")
        .args(["-m", "pip", "install", "-q", "pulsar-client==3.13.0"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err("cannot install pulsar-client with pip".into())
    }
}

fn message(i: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({"symbol": format!("S{}", i % 64), "exchange": "NASDAQ", "currency": "USD", "timestamp_ns": realtime_ns(), "price": 100.0 + (i % 1000) as f64 * 0.01, "volume": 100})).unwrap_or_default()
}

pub(crate) async fn producer(
    url: &str,
    topic: &str,
    batching: bool,
) -> Result<tickwire_bridge::pulsar::Producer<TokioExecutor>, String> {
    let pulsar: Pulsar<TokioExecutor> = Pulsar::builder(url.to_string(), TokioExecutor)
        .build()
        .await
        .map_err(|e| format!("pulsar at {url}: {e} (run scripts/services.sh up)"))?;
    // Batches close after 1 ms (as Apache's clients do by default, at
    // 10 ms): unbatched, this Pulsar persists each message as its own entry
    // and at 10k msg/s its publish latency alone reaches ~40 ms at p50.
    let opts = ProducerOptions {
        batch_size: batching.then_some(1000),
        batch_timeout: batching.then_some(Duration::from_millis(1)),
        block_queue_if_full: true,
        ..ProducerOptions::default()
    };
    pulsar
        .producer()
        .with_topic(topic)
        .with_options(opts)
        .build()
        .await
        .map_err(|e| e.to_string())
}

/// Sends `n` messages as fast as the client allows (batched).
fn preload(url: &str, topic: &str, n: u64) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut p = producer(url, topic, true).await?;
        let mut receipts = Vec::new();
        for i in 0..n {
            receipts.push(
                p.send_non_blocking(message(i))
                    .await
                    .map_err(|e| e.to_string())?,
            );
            if receipts.len() >= 10_000 {
                p.send_batch().await.map_err(|e| e.to_string())?;
                for r in receipts.drain(..) {
                    r.await.map_err(|e| e.to_string())?;
                }
            }
        }
        p.send_batch().await.map_err(|e| e.to_string())?;
        for r in receipts {
            r.await.map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

struct PyConsumer {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl PyConsumer {
    fn start(
        url: &str,
        topic: &str,
        sub: &str,
        count: u64,
        latency: bool,
    ) -> Result<PyConsumer, String> {
        let mut child = Command::new("python3")
            .arg(script())
            .args([
                url,
                topic,
                sub,
                "failover",
                &RECEIVER_QUEUE.to_string(),
                &count.to_string(),
                if latency { "1" } else { "0" },
            ])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("python3: {e}"))?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("stdout")?).lines();
        // The client logs to stdout too: skip to our READY line.
        for l in lines.by_ref() {
            match l {
                Ok(l) if l == "READY" => return Ok(PyConsumer { child, lines }),
                Ok(_) => continue,
                Err(e) => return Err(format!("python consumer: {e}")),
            }
        }
        Err("python consumer exited before READY".into())
    }
    fn result(mut self) -> Result<Value, String> {
        let line = self
            .lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.starts_with("{\"events\""))
            .ok_or("python consumer printed no result")?;
        let _ = self.child.wait();
        serde_json::from_str(&line).map_err(|e| e.to_string())
    }
}

struct TwNode {
    _dir: tempfile::TempDir,
    broker: Broker,
    bridge: BridgeHandle,
}

fn tw_node(url: &str, topic: &str, sub: &str) -> Result<TwNode, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut c = Config::default();
    c.node.dir = Some(dir.path().to_path_buf());
    c.synthetic.enabled = false;
    c.stats.log_interval_secs = 0;
    c.topics = vec![TopicConfig {
        name: TARGET.into(),
        partitions: 4,
        capacity: 1 << 18,
        ..TopicConfig::default()
    }];
    c.bridge = BridgeConfig {
        enabled: true,
        url: url.into(),
        topics: vec![topic.into()],
        subscription: sub.into(),
        subscription_type: SubscriptionType::Failover,
        format: Format::Json,
        target_topic: TARGET.into(),
        dead_letter_topic: format!("{topic}-dlq"),
        receiver_queue_size: RECEIVER_QUEUE,
        // Like the Python consumer: consume, commit, acknowledge; no side output.
        output_topic: String::new(),
        // Messages may be produced before the subscription exists.
        initial_position: InitialPosition::Earliest,
        ..BridgeConfig::default()
    };
    let broker = Broker::start(&c).map_err(|e| e.to_string())?;
    let bridge = BridgeHandle::start(&broker, c.bridge.clone()).map_err(|e| e.to_string())?;
    Ok(TwNode {
        _dir: dir,
        broker,
        bridge,
    })
}

fn tw_drain(url: &str, topic: &str, n: u64) -> Result<Value, String> {
    let node = tw_node(url, topic, &format!("tw-{}", realtime_ns()))?;
    let stats = node.bridge.stats.clone();
    let deadline = Instant::now() + Duration::from_secs(600);
    while stats.received.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    let start = Instant::now();
    while stats.acked.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
    }
    let elapsed = start.elapsed();
    let acked = stats.acked.load(Ordering::Relaxed);
    node.bridge.stop().map_err(|e| e.to_string())?;
    node.broker.shutdown();
    Ok(json!({"events": acked, "elapsed_ns": elapsed.as_nanos() as u64}))
}

fn eps(v: &Value) -> f64 {
    v["events"].as_f64().unwrap_or(0.0) * 1e9 / v["elapsed_ns"].as_f64().unwrap_or(1.0).max(1.0)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// Runs both cases; prints one JSON line per system and case.
///
/// # Errors
/// Pulsar unreachable, the Python client missing and not installable.
pub fn run(b: &PulsarBench) -> Result<(), String> {
    ensure_python_client()?;
    // drain: one backlog, a fresh subscription per trial and system.
    let topic = unique("drain");
    preload(&b.url, &topic, b.messages)?;
    let (mut tw, mut py) = (Vec::new(), Vec::new());
    for _ in 0..b.trials {
        tw.push(tw_drain(&b.url, &topic, b.messages)?);
        let c = PyConsumer::start(
            &b.url,
            &topic,
            &format!("py-{}", realtime_ns()),
            b.messages,
            false,
        )?;
        py.push(c.result()?);
    }
    let (tw_eps, py_eps) = (
        median(tw.iter().map(eps).collect()),
        median(py.iter().map(eps).collect()),
    );
    let lost = |v: &[Value]| {
        v.iter()
            .map(|r| b.messages.saturating_sub(r["events"].as_u64().unwrap_or(0)))
            .sum::<u64>()
    };
    let common = json!({"messages": b.messages, "subscription_type": "failover", "receiver_queue_size": RECEIVER_QUEUE, "trials": b.trials, "aggregate": "median of interleaved trials", "cores": "unpinned: Pulsar standalone, the consumer and tickwire share both cores"});
    let line = |system: &str, e: f64, lost: u64, trials: Vec<f64>, extra: &Value| {
        let mut v = json!({"case": "drain", "system": system, "consumers": 1, "events_per_sec": e.round(), "p50_ns": null, "p99_ns": null, "p999_ns": null, "max_ns": null, "lost": lost, "torn": 0, "trial_events_per_sec": trials});
        if let Some(o) = v.as_object_mut() {
            for x in [&common, extra] {
                if let Some(x) = x.as_object() {
                    o.extend(x.clone());
                }
            }
        }
        v
    };
    println!(
        "{}",
        line(
            "tickwire",
            tw_eps,
            lost(&tw),
            tw.iter().map(eps).collect(),
            &json!({"path": "pulsar-rs consumer -> JSON parse + validate -> shard queue -> ring -> ack after commit"})
        )
    );
    println!(
        "{}",
        line(
            "pulsar_client",
            py_eps,
            lost(&py),
            py.iter().map(eps).collect(),
            &json!({"client": "pulsar-client 3.13 (Python over the C++ client): receive + acknowledge"})
        )
    );
    println!(
        "{}",
        json!({"case": "drain", "system": "ratios", "tickwire_vs_pulsar_client": (tw_eps / py_eps.max(1.0) * 1000.0).round() / 1000.0})
    );

    // paced: one stream, both subscriptions at once.
    let topic = unique("paced");
    let total = (b.rate as f64 * b.seconds) as u64;
    let node = tw_node(&b.url, &topic, "tw-paced")?;
    let mut sub = Subscriber::builder(TARGET)
        .node_dir(node._dir.path())
        .start(Start::Sequence(1))
        .open()
        .map_err(|e| e.to_string())?;
    let py = PyConsumer::start(&b.url, &topic, "py-paced", total, true)?;
    std::thread::sleep(Duration::from_millis(500));
    let (url, t2, rate) = (b.url.clone(), topic.clone(), b.rate);
    let producer_thread = std::thread::spawn(move || -> Result<u64, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let mut p = producer(&url, &t2, true).await?;
            let start = Instant::now();
            let mut window = Vec::new();
            let mut ok = 0;
            for i in 0..total {
                let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
                if let Some(w) = due.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(w).await;
                }
                window.push(
                    p.send_non_blocking(message(i))
                        .await
                        .map_err(|e| e.to_string())?,
                );
                if window.len() >= 256 {
                    for r in window.drain(..) {
                        ok += u64::from(r.await.is_ok());
                    }
                }
            }
            for r in window {
                ok += u64::from(r.await.is_ok());
            }
            Ok(ok)
        })
    });
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut got = 0u64;
    let deadline = Instant::now() + Duration::from_secs_f64(b.seconds + 60.0);
    while got < total && Instant::now() < deadline {
        let n = sub.poll(1024, |e| {
            if let Event::Tick(t) = e {
                got += 1;
                let _ = hist.record(realtime_ns().saturating_sub(t.body.ts_event()).max(1));
            }
        });
        if n == 0 {
            sub.wait_for_data(Duration::from_millis(10));
        }
    }
    let sent = producer_thread.join().map_err(|_| "producer panicked")??;
    let pyr = py.result()?;
    node.bridge.stop().map_err(|e| e.to_string())?;
    // tickwire's own part: handed to the ingest API -> committed.
    let own = node.broker.stats().ingest_to_commit.map(|h| {
        json!({"p50_ns": h.value_at_quantile(0.5), "p99_ns": h.value_at_quantile(0.99), "p999_ns": h.value_at_quantile(0.999), "max_ns": h.max()})
    });
    node.broker.shutdown();
    let q = |p: f64| hist.value_at_quantile(p);
    let cores = "unpinned: Pulsar standalone, the consumer and tickwire share both cores";
    println!(
        "{}",
        json!({"case": "paced", "system": "tickwire", "consumers": 1, "rate": b.rate, "events_per_sec": (got as f64 / b.seconds).round(), "p50_ns": q(0.5), "p99_ns": q(0.99), "p999_ns": q(0.999), "max_ns": hist.max(), "lost": sent.saturating_sub(got), "torn": 0, "latency": "producer timestamp -> committed and read from the ring", "producer": "pulsar-rs, batches of up to 1000 closed after 1 ms", "ingest_to_commit": own, "cores": cores})
    );
    println!(
        "{}",
        json!({"case": "paced", "system": "pulsar_client", "consumers": 1, "rate": b.rate, "events_per_sec": (pyr["events"].as_f64().unwrap_or(0.0) / b.seconds).round(), "p50_ns": pyr["p50_ns"], "p99_ns": pyr["p99_ns"], "p999_ns": pyr["p999_ns"], "max_ns": pyr["max_ns"], "lost": sent.saturating_sub(pyr["events"].as_u64().unwrap_or(0)), "torn": 0, "latency": "producer timestamp -> received by the client", "producer": "pulsar-rs, batches of up to 1000 closed after 1 ms", "cores": cores})
    );
    Ok(())
}

//! `tickwire`: the broker binary.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use shm_client::{Event, Filter, Kind, Start, Subscriber, WaitStrategy};
use tickwire_broker::config::Config;
use tickwire_broker::engine::Broker;
use tickwire_broker::{synthetic, tail};

#[derive(Parser)]
#[command(
    name = "tickwire",
    version,
    about = "Market-data distribution broker: shared-memory rings, thread per core"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (embedded defaults: synthetic feed into shared memory).
    Serve {
        /// TOML configuration (see config/tickwire.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override the node directory.
        #[arg(long)]
        node_dir: Option<PathBuf>,
    },
    /// Print a topic's events from shared memory.
    Tail(TailArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, node_dir } => serve(config, node_dir),
        Command::Tail(args) => tail_cmd(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tickwire: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyError = Box<dyn std::error::Error>;

fn serve(config: Option<PathBuf>, node_dir: Option<PathBuf>) -> Result<(), AnyError> {
    let mut cfg = match &config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(d) = node_dir {
        cfg.node.dir = Some(d);
    }
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let broker = Broker::start(&cfg)?;
    tracing::info!(
        node_dir = %broker.node_dir().display(),
        topics = ?cfg.topics.iter().map(|t| format!("{} ({} partitions)", t.name, t.partitions)).collect::<Vec<_>>(),
        config = %config.as_ref().map_or("embedded defaults".to_string(), |p| p.display().to_string()),
        "tickwire serving; read with `tickwire tail <topic>` or the shm-client crate"
    );
    let feed = if cfg.synthetic.enabled {
        let mut ingest = broker.ingest(1);
        let topic = ingest
            .resolver()
            .topic(&cfg.synthetic.topic)
            .ok_or("synthetic topic missing")?;
        let s = cfg.synthetic.clone();
        let stop = stop.clone();
        tracing::info!(topic = %s.topic, rate = s.rate, instruments = synthetic::instruments().len(), "synthetic feed on");
        Some(
            std::thread::Builder::new()
                .name("tickwire-synthetic".into())
                .spawn(move || {
                    synthetic::run(ingest, topic, s.seed, s.quote_ratio, s.rate, stop)
                })?,
        )
    } else {
        None
    };
    let bridge = if cfg.bridge.enabled {
        Some(tickwire_broker::pulsar::BridgeHandle::start(
            &broker,
            cfg.bridge.clone(),
        )?)
    } else {
        None
    };
    let interval = Duration::from_secs(cfg.stats.log_interval_secs);
    let mut last = Instant::now();
    let mut last_events = 0;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if bridge.as_ref().is_some_and(|b| b.is_finished()) {
            break;
        }
        if !interval.is_zero() && last.elapsed() >= interval {
            let s = broker.stats();
            let rate = (s.events - last_events) as f64 / last.elapsed().as_secs_f64();
            let (p50, p99, max) = s.ingest_to_commit.as_ref().map_or((0, 0, 0), |h| {
                (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max())
            });
            tracing::info!(
                events = s.events,
                events_per_sec = rate as u64,
                ingest_to_commit_p50_ns = p50,
                ingest_to_commit_p99_ns = p99,
                ingest_to_commit_max_ns = max,
                queued = s.queued,
                untethered = s.untethered,
                reclaimed = s.reclaimed,
                "stats"
            );
            if let Some(b) = &bridge {
                log_bridge(&b.stats, "pulsar bridge");
            }
            last = Instant::now();
            last_events = s.events;
        }
    }
    tracing::info!("shutting down");
    let mut failure = None;
    if let Some(b) = bridge {
        let stats = b.stats.clone();
        if let Err(e) = b.stop() {
            tracing::error!(error = %e, "pulsar bridge failed");
            failure = Some(e);
        }
        log_bridge(&stats, "pulsar bridge stopped");
    }
    if let Some(f) = feed {
        match f.join() {
            Ok(Ok(sent)) => tracing::info!(sent, "synthetic feed stopped"),
            Ok(Err(e)) => tracing::error!(error = %e, "synthetic feed failed"),
            Err(_) => tracing::error!("synthetic feed panicked"),
        }
    }
    let events = broker.stats().events;
    broker.shutdown();
    tracing::info!(events, "stopped");
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

#[derive(clap::Args)]
struct TailArgs {
    /// Topic, e.g. market-data/normalized/equities.
    topic: String,
    /// Only these symbols (repeatable).
    #[arg(long = "symbol")]
    symbols: Vec<String>,
    /// Only these exchanges (repeatable).
    #[arg(long = "exchange")]
    exchanges: Vec<String>,
    /// Only these currencies (repeatable).
    #[arg(long = "currency")]
    currencies: Vec<String>,
    /// Only this kind: trade or quote (repeatable).
    #[arg(long = "kind")]
    kinds: Vec<String>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Stop after N events.
    #[arg(long)]
    count: Option<u64>,
    /// Start: latest, earliest, or a sequence number.
    #[arg(long, default_value = "latest")]
    start: String,
    /// Node directory (default: $TICKWIRE_NODE_DIR or /dev/shm/tickwire/default).
    #[arg(long)]
    node_dir: Option<PathBuf>,
    /// Exit after this many seconds without an event.
    #[arg(long)]
    idle_timeout: Option<f64>,
    /// At exit, print a JSON summary to stderr: counts, gaps, and the
    /// ingest -> read latency (HDR percentiles).
    #[arg(long)]
    stats: bool,
}

fn tail_cmd(a: TailArgs) -> Result<(), AnyError> {
    let kinds = a
        .kinds
        .iter()
        .map(|k| Kind::parse(k).ok_or_else(|| format!("--kind {k:?}: expected trade or quote")))
        .collect::<Result<Vec<_>, _>>()?;
    let start = match a.start.as_str() {
        "latest" => Start::Latest,
        "earliest" => Start::Earliest,
        s => Start::Sequence(s.parse().map_err(|_| {
            format!("--start {s:?}: expected latest, earliest or a sequence number")
        })?),
    };
    let filter = Filter::default()
        .symbols(a.symbols)
        .exchanges(a.exchanges)
        .currencies(a.currencies)
        .kinds(kinds);
    let mut b = Subscriber::builder(&a.topic)
        .start(start)
        .filter(filter)
        .wait(WaitStrategy::Futex { spins: 100 });
    if let Some(d) = a.node_dir {
        b = b.node_dir(d);
    }
    let mut sub = b.open()?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let mut last_event = Instant::now();
    let idle = a.idle_timeout.map(Duration::from_secs_f64);
    let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| e.to_string())?;
    while !stop.load(Ordering::Relaxed) && a.count.is_none_or(|c| printed < c) {
        let want = a.count.map_or(1024, |c| (c - printed).min(1024) as usize);
        let mut open = true;
        let n = sub.poll(want, |e| {
            if let Event::Tick(t) = &e {
                printed += 1;
                if a.stats {
                    let _ = latency.record(
                        tickwire_proto::futex::realtime_ns()
                            .saturating_sub(t.body.ts_ingest())
                            .max(1),
                    );
                }
            }
            open &= tail::write_event(&mut out, &a.topic, &e, a.json);
        });
        if !open {
            return Ok(());
        }
        if n == 0 {
            if out.flush().is_err() {
                return Ok(());
            }
            if idle.is_some_and(|d| last_event.elapsed() >= d) {
                break;
            }
            sub.wait_for_data(Duration::from_millis(100));
        } else {
            last_event = Instant::now();
        }
    }
    let _ = out.flush();
    if a.stats {
        let s = sub.stats();
        let q = |p: f64| latency.value_at_quantile(p);
        eprintln!(
            "{}",
            serde_json::json!({
                "topic": a.topic, "ticks": s.delivered, "filtered": s.filtered, "gaps": s.gaps, "lost": s.lost, "untethered": s.untethered,
                "ingest_to_read_ns": {"p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": latency.max(), "samples": latency.len()},
            })
        );
    }
    Ok(())
}

/// The bridge's counters as one log line.
fn log_bridge(stats: &tickwire_bridge::BridgeStats, what: &str) {
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    tracing::info!(
        received = n(&stats.received),
        committed = n(&stats.committed),
        acked = n(&stats.acked),
        ack_commands = n(&stats.ack_commands),
        dead_lettered = n(&stats.dead_lettered),
        backpressure = n(&stats.backpressure),
        reconnects = n(&stats.reconnects),
        events_out = n(&stats.events_out),
        events_dropped = n(&stats.events_dropped),
        "{what}"
    );
}

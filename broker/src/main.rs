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
use tokio_util::sync::CancellationToken;

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
        /// The node directory (overrides $TICKWIRE_NODE_DIR and the config's
        /// node.dir; default /dev/shm/tickwire/<node.id>).
        #[arg(long)]
        node_dir: Option<PathBuf>,
    },
    /// Print a topic's events from shared memory.
    Tail(TailArgs),
    /// Consume a subscription group over gRPC (Shared, Key_Shared,
    /// Failover, Exclusive), one JSON line per event, acknowledging what
    /// was printed.
    Consume(ConsumeArgs),
    /// Write a time range of a topic's raw events (from the journal) or
    /// bars (1m, 5m, 1h, 1d) to a Parquet file.
    Export(ExportArgs),
}

/// Which instruments (`tail`, `export`).
#[derive(clap::Args)]
struct InstrumentArgs {
    /// Only these symbols (repeatable).
    #[arg(long = "symbol")]
    symbols: Vec<String>,
    /// Only these exchanges (repeatable).
    #[arg(long = "exchange")]
    exchanges: Vec<String>,
    /// Only these currencies (repeatable).
    #[arg(long = "currency")]
    currencies: Vec<String>,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Topic, e.g. market-data/normalized/equities.
    topic: String,
    /// From: an RFC 3339 time such as 2026-12-02T14:30:00Z, or UTC ns.
    #[arg(long)]
    from: String,
    /// To (not included); default now.
    #[arg(long)]
    to: Option<String>,
    /// raw (events), 1m, 5m, 1h or 1d (bars).
    #[arg(long, default_value = "raw")]
    interval: String,
    /// The Parquet file to write.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    only: InstrumentArgs,
    /// Node directory (default: $TICKWIRE_NODE_DIR, else /dev/shm/tickwire/default).
    #[arg(long)]
    node_dir: Option<PathBuf>,
    /// The journal directory (default: the node directory's `journal` link,
    /// else, after a reboot emptied a tmpfs node directory,
    /// /var/tmp/tickwire/<node id>/journal as `serve` puts it).
    #[arg(long)]
    journal_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log reader that went away (`serve 2>&1 | head -1`) must never
        // take the broker down: tracing's own report of a failed write
        // would panic on the same closed stderr.
        .log_internal_errors(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, node_dir } => serve(config, node_dir),
        Command::Tail(args) => tail_cmd(args),
        Command::Export(args) => export_cmd(args),
        Command::Consume(args) => consume_cmd(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Never panics, even on a closed stderr.
            let _ = writeln!(std::io::stderr(), "tickwire: {e}");
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
    if let Some(d) = node_dir.or_else(tickwire_broker::config::env_node_dir) {
        cfg.node.dir = Some(d);
    }
    let shutdown = Shutdown::on_signals()?;
    let broker = Broker::start(&cfg)?;
    tracing::info!(
        node_dir = %broker.node_dir().display(),
        topics = ?cfg.topics.iter().map(|t| format!("{} ({} partitions)", t.name, t.partitions)).collect::<Vec<_>>(),
        config = %config.as_ref().map_or("embedded defaults".to_string(), |p| p.display().to_string()),
        "tickwire serving; read with `tickwire tail <topic>` or the shm-client crate"
    );
    let mut feed = if cfg.synthetic.enabled {
        let mut ingest = broker.ingest(1);
        let topic = ingest
            .resolver()
            .topic(&cfg.synthetic.topic)
            .ok_or("synthetic topic missing")?;
        let s = cfg.synthetic.clone();
        let stop = shutdown.token.clone();
        let source_id = synthetic::source_id(&cfg.node.id);
        let rules = broker.rules().reader();
        tracing::info!(topic = %s.topic, rate = s.rate, instruments = synthetic::instruments().len(), source_id, "synthetic feed on");
        Some(
            std::thread::Builder::new()
                .name("tickwire-synthetic".into())
                .spawn(move || synthetic::run(ingest, topic, &s, source_id, rules, stop))?,
        )
    } else {
        None
    };
    // The remote edge runs on its own small tokio runtime, off the shard cores.
    let edge = if cfg.edge.enabled {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tickwire-edge")
            .enable_all()
            .build()?;
        let engine = std::sync::Arc::new(tickwire_broker::edge::BrokerEngine::new(&broker));
        let e = rt.block_on(tickwire_api::Edge::start(
            cfg.edge_config()?,
            engine,
            shutdown.token.clone(),
        ))?;
        Some((rt, e))
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
    let mut window = StatsWindow::new(&broker);
    let mut failure: Option<AnyError> = None;
    loop {
        // Woken at once by a signal; otherwise every 250 ms to look at the
        // feed, the bridge and the stats interval.
        if shutdown.wait(Duration::from_millis(250)) {
            break;
        }
        if bridge.as_ref().is_some_and(|b| b.is_finished()) {
            break;
        }
        if feed.as_ref().is_some_and(|f| f.is_finished()) {
            // The feed only ends early on an error: say it now, not at exit.
            if let Some(Err(e)) = feed.take().map(join_feed) {
                tracing::error!(error = %e, "synthetic feed failed; stopping");
                failure = Some(e);
                break;
            }
        }
        if !interval.is_zero() && window.elapsed() >= interval {
            window.log(&broker);
            if let Some(b) = &bridge {
                log_bridge(&b.stats, "pulsar bridge");
            }
        }
    }
    tracing::info!("shutting down");
    // Remote streams are told and closed before the rings stop.
    shutdown.token.cancel();
    if let Some((rt, e)) = edge {
        rt.block_on(async {
            if tokio::time::timeout(Duration::from_secs(5), e.join())
                .await
                .is_err()
            {
                tracing::warn!("edge did not stop within 5 s");
            }
        });
        rt.shutdown_timeout(Duration::from_secs(1));
    }
    if let Some(b) = bridge {
        let stats = b.stats.clone();
        if let Err(e) = b.stop() {
            tracing::error!(error = %e, "pulsar bridge failed");
            failure = Some(e.into());
        }
        log_bridge(&stats, "pulsar bridge stopped");
    }
    if let Some(f) = feed {
        match join_feed(f) {
            Ok(sent) => tracing::info!(sent, "synthetic feed stopped"),
            Err(e) => {
                tracing::error!(error = %e, "synthetic feed failed");
                failure = Some(e);
            }
        }
    }
    let events = broker.stats().events;
    broker.shutdown();
    tracing::info!(events, "stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The feed thread's result.
fn join_feed(
    f: std::thread::JoinHandle<Result<u64, tickwire_proto::Error>>,
) -> Result<u64, AnyError> {
    match f.join() {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err("synthetic feed panicked".into()),
    }
}

/// The process's one shutdown signal: a [`CancellationToken`] cancelled by
/// the first SIGINT or SIGTERM (a second one ends the process at once), and
/// a channel the main loop blocks on, so it wakes the moment it fires.
struct Shutdown {
    token: CancellationToken,
    fired: std::sync::mpsc::Receiver<()>,
}

impl Shutdown {
    fn on_signals() -> Result<Shutdown, AnyError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let seen = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            // Registered first, so it sees the flag as the previous signal left it.
            signal_hook::flag::register_conditional_shutdown(sig, 130, seen.clone())?;
            signal_hook::flag::register(sig, seen.clone())?;
        }
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let token = CancellationToken::new();
        let (tx, fired) = std::sync::mpsc::channel();
        let t = token.clone();
        std::thread::Builder::new()
            .name("tickwire-signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    t.cancel();
                    let _ = tx.send(());
                }
            })?;
        Ok(Shutdown { token, fired })
    }

    /// Waits up to `timeout`; `true` once shutdown was asked for.
    fn wait(&self, timeout: Duration) -> bool {
        self.token.is_cancelled() || self.fired.recv_timeout(timeout).is_ok()
    }
}

/// What the periodic stats line reports: rates and latency over the last
/// interval (not since start), and the readers of each topic.
struct StatsWindow {
    since: Instant,
    events: u64,
    hist: Option<hdrhistogram::Histogram<u64>>,
}

impl StatsWindow {
    fn new(broker: &Broker) -> StatsWindow {
        let s = broker.stats();
        StatsWindow {
            since: Instant::now(),
            events: s.events,
            hist: s.ingest_to_commit,
        }
    }

    fn elapsed(&self) -> Duration {
        self.since.elapsed()
    }

    fn log(&mut self, broker: &Broker) {
        let s = broker.stats();
        let secs = self.since.elapsed().as_secs_f64().max(1e-9);
        let interval_events = s.events.saturating_sub(self.events);
        // The interval's histogram: everything now minus everything then.
        let mut interval = s.ingest_to_commit.clone();
        if let (Some(now), Some(before)) = (interval.as_mut(), self.hist.as_ref()) {
            let _ = now.subtract(before);
        }
        let (p50, p99, max) = interval.as_ref().map_or((0, 0, 0), |h| {
            (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max())
        });
        let readers: Vec<String> = s.readers.iter().map(|(t, r)| format!("{t}={r}")).collect();
        tracing::info!(
            events = s.events,
            interval_secs = format!("{secs:.1}"),
            events_per_sec = (interval_events as f64 / secs) as u64,
            ingest_to_commit_p50_ns = p50,
            ingest_to_commit_p99_ns = p99,
            ingest_to_commit_max_ns = max,
            queued = s.queued,
            readers = %readers.join(" "),
            untethered = s.untethered,
            reclaimed = s.reclaimed,
            "stats (rates and latency over the interval)"
        );
        if let Some(j) = broker.journal_stats() {
            tracing::info!(
                journaled = j.events,
                journal_lag = s.events.saturating_sub(j.events),
                journal_bytes = j.bytes,
                write_errors = j.write_errors,
                sync_errors = j.sync_errors,
                segments_deleted = j.segments_deleted,
                io = j.io,
                "journal"
            );
        }
        if s.lost_completions > 0 {
            tracing::error!(
                lost_completions = s.lost_completions,
                "completions lost (a bug): those messages are not acknowledged upstream"
            );
        }
        self.since = Instant::now();
        self.events = s.events;
        self.hist = s.ingest_to_commit;
    }
}

#[derive(clap::Args)]
struct ConsumeArgs {
    /// Topic; default: the node's default topic.
    #[arg(long, default_value = "")]
    topic: String,
    /// Subscription name (the group).
    #[arg(long)]
    subscription: String,
    /// exclusive, failover, shared or key_shared.
    #[arg(long = "type", default_value = "shared")]
    kind: String,
    /// at-least-once, effectively-once (at-least-once, duplicates
    /// dropped by message id and source sequence) or at-most-once.
    #[arg(long, default_value = "at-least-once")]
    mode: String,
    /// The edge's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    connect: String,
    /// API key (default: $TICKWIRE_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// This consumer's name (Failover order, Key_Shared hashing).
    #[arg(long, default_value = "")]
    consumer: String,
    /// Failover priority: lower is preferred.
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Most unacknowledged messages held.
    #[arg(long, default_value_t = 1000)]
    queue: u32,
    /// Ack timeout, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ack_timeout: Duration,
    /// Dead-letter a message after this many redeliveries (0: never).
    #[arg(long, default_value_t = 0)]
    max_redeliveries: u32,
    /// Where a new group starts: latest or earliest.
    #[arg(long, default_value = "latest")]
    start: String,
    #[command(flatten)]
    only: InstrumentArgs,
    /// Never acknowledge (to see redelivery and timeouts at work).
    #[arg(long)]
    no_ack: bool,
    /// Stop after N events.
    #[arg(long)]
    count: Option<u64>,
    /// Join over shared memory (this machine's broker, through its control
    /// socket) instead of gRPC: events straight from the rings.
    #[arg(long)]
    shm: bool,
    /// Node directory for --shm (default: $TICKWIRE_NODE_DIR, else
    /// /dev/shm/tickwire/default).
    #[arg(long)]
    node_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct TailArgs {
    /// Topic, e.g. market-data/normalized/equities.
    topic: String,
    #[command(flatten)]
    only: InstrumentArgs,
    /// Only this kind: trade or quote (repeatable).
    #[arg(long = "kind")]
    kinds: Vec<String>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Stop after N events.
    #[arg(long)]
    count: Option<u64>,
    /// Start: latest; earliest (the journal's oldest event, else the
    /// ring's); ring (the oldest still in the ring); a sequence number; or
    /// an RFC 3339 time such as 2026-12-02T14:30:00Z (the first event at
    /// or after it). Starts in the past replay from the journal and join live.
    #[arg(long, default_value = "latest")]
    start: String,
    /// Node directory (default: $TICKWIRE_NODE_DIR, else /dev/shm/tickwire/default).
    #[arg(long)]
    node_dir: Option<PathBuf>,
    /// Exit after this many seconds without an event (a finite number, 0 or more).
    #[arg(long, value_parser = parse_idle_timeout)]
    idle_timeout: Option<Duration>,
    /// At exit, print a JSON summary to stderr: counts, gaps, and the
    /// ingest -> read latency (HDR percentiles).
    #[arg(long)]
    stats: bool,
}

/// How `tail` ended when it could not write its output.
#[derive(Debug)]
enum TailError {
    /// The reader of stdout went away (`tail | head`): exit quietly, as a
    /// process killed by SIGPIPE would.
    ClosedPipe,
    /// Any other write error (a full disk, /dev/full): an error.
    Write(std::io::Error),
}

impl std::fmt::Display for TailError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TailError::ClosedPipe => f.write_str("stdout closed"),
            TailError::Write(e) => write!(f, "writing to stdout: {e}"),
        }
    }
}

impl std::error::Error for TailError {}

impl From<std::io::Error> for TailError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            TailError::ClosedPipe
        } else {
            TailError::Write(e)
        }
    }
}

/// `--idle-timeout`: a finite, non-negative number of seconds.
fn parse_idle_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{s:?} must be a finite number of seconds, 0 or more"))
}

#[cfg(feature = "history")]
fn export_cmd(a: ExportArgs) -> Result<(), AnyError> {
    use tickwire_api::bars::parse_time;
    let interval = match a.interval.as_str() {
        "raw" => None,
        i => Some(
            tickwire_proto::bars::Interval::parse(i)
                .ok_or_else(|| format!("--interval {i:?}: expected raw, 1m, 5m, 1h or 1d"))?,
        ),
    };
    let from_ns = parse_time(&a.from).map_err(|e| format!("--from {e}"))?;
    let to_ns = match &a.to {
        Some(t) => parse_time(t).map_err(|e| format!("--to {e}"))?,
        None => tickwire_proto::futex::realtime_ns(),
    };
    if from_ns >= to_ns {
        return Err(format!("--from {:?} is not before --to", a.from).into());
    }
    let node_dir = a.node_dir.unwrap_or_else(shm_client::default_node_dir);
    let spec = tickwire_broker::export::ExportSpec {
        journal_dir: a.journal_dir.unwrap_or_else(|| {
            // The node directory links to its journal; after a reboot
            // emptied a tmpfs node directory, the journal is where `serve`
            // puts it by default.
            let link = node_dir.join("journal");
            if link.exists() {
                link
            } else {
                Config::of_node_dir(&node_dir).journal_dir()
            }
        }),
        node_dir,
        topic: a.topic,
        symbols: a.only.symbols,
        exchanges: a.only.exchanges,
        currencies: a.only.currencies,
        from_ns,
        to_ns,
        interval,
        out: a.out,
    };
    let started = Instant::now();
    let done = tickwire_broker::export::export(&spec)?;
    let _ = writeln!(
        std::io::stderr(),
        "{}",
        serde_json::json!({
            "out": spec.out.display().to_string(),
            "rows": done.rows,
            "missing_sequences": done.missing,
            "interval": a.interval,
            "secs": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

#[cfg(not(feature = "history"))]
fn export_cmd(_: ExportArgs) -> Result<(), AnyError> {
    Err("this tickwire was built without the history feature (Polars): rebuild with default features to export".into())
}

fn consume_cmd(a: ConsumeArgs) -> Result<(), AnyError> {
    use tickwire_proto::pb;
    if a.shm {
        return consume_shm(a);
    }
    let kind = match a.kind.as_str() {
        "exclusive" => pb::SubscriptionType::Exclusive,
        "failover" => pb::SubscriptionType::Failover,
        "shared" => pb::SubscriptionType::Shared,
        "key_shared" => pb::SubscriptionType::KeyShared,
        other => {
            return Err(format!(
                "--type {other:?}: expected exclusive, failover, shared or key_shared"
            )
            .into());
        }
    };
    let (mode, dedup) = match a.mode.as_str() {
        "at-least-once" => (pb::DeliveryMode::AtLeastOnce, false),
        "effectively-once" => (pb::DeliveryMode::ExactlyOnce, true),
        "at-most-once" => (pb::DeliveryMode::AtMostOnce, false),
        other => {
            return Err(format!(
                "--mode {other:?}: expected at-least-once, effectively-once or at-most-once"
            )
            .into());
        }
    };
    let start = match a.start.as_str() {
        "latest" => pb::MessagePosition::Latest,
        "earliest" => pb::MessagePosition::Earliest,
        other => return Err(format!("--start {other:?}: expected latest or earliest").into()),
    };
    let ack_timeout_ms = u32::try_from(a.ack_timeout.as_millis())
        .map_err(|_| format!("--ack-timeout {:?}: too long", a.ack_timeout))?;
    let spec = tickwire_broker::consume::ConsumeSpec {
        connect: a.connect,
        api_key: a
            .api_key
            .or_else(|| std::env::var("TICKWIRE_API_KEY").ok())
            .filter(|k| !k.is_empty()),
        request: pb::StreamRequest {
            symbols: a.only.symbols,
            subscription_name: a.subscription,
            filters: Some(pb::FilterCriteria {
                exchanges: a.only.exchanges,
                currencies: a.only.currencies,
                ..Default::default()
            }),
            topic: a.topic,
            start_position: start as i32,
            subscription_type: kind as i32,
            delivery_mode: mode as i32,
            consumer_name: a.consumer,
            priority_level: a.priority,
            receiver_queue_size: a.queue,
            ack_timeout_ms,
            max_redeliveries: a.max_redeliveries,
            ..Default::default()
        },
        dedup,
        ack: !a.no_ack && mode != pb::DeliveryMode::AtMostOnce,
        cumulative: matches!(
            kind,
            pb::SubscriptionType::Exclusive | pb::SubscriptionType::Failover
        ),
        count: a.count.unwrap_or(0),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let sum = rt.block_on(tickwire_broker::consume::run(spec, &mut out))?;
    let _ = out.flush();
    print_summary(&sum);
    Ok(())
}

/// A consumer's figures, on stderr as one JSON line.
fn print_summary(sum: &tickwire_broker::consume::Summary) {
    let _ = writeln!(
        std::io::stderr(),
        "{}",
        serde_json::json!({"events": sum.events, "redelivered": sum.redelivered, "duplicates": sum.duplicates, "gaps": sum.gaps})
    );
}

/// `tickwire consume --shm`: a group member reading the rings.
fn consume_shm(a: ConsumeArgs) -> Result<(), AnyError> {
    use shm_client::group::SubscriptionType;
    let kind = SubscriptionType::parse(&a.kind).ok_or_else(|| {
        format!(
            "--type {:?}: expected exclusive, failover, shared or key_shared",
            a.kind
        )
    })?;
    let dedup = match a.mode.as_str() {
        "at-least-once" => false,
        "effectively-once" => true,
        other => {
            return Err(format!(
                "--mode {other:?}: a group over shared memory is at-least-once or effectively-once (at most once needs no group: use `tickwire tail`)"
            )
            .into());
        }
    };
    let start = match a.start.as_str() {
        "latest" => Start::Latest,
        "earliest" => Start::Earliest,
        other => return Err(format!("--start {other:?}: expected latest or earliest").into()),
    };
    let node_dir = a
        .node_dir
        .or_else(tickwire_broker::config::env_node_dir)
        .unwrap_or_else(shm_client::default_node_dir);
    let topic = if a.topic.is_empty() {
        tickwire_broker::config::Config::default()
            .topics
            .first()
            .map(|t| t.name.clone())
            .ok_or("--topic: no default topic")?
    } else {
        a.topic
    };
    let spec = tickwire_broker::consume::ShmConsumeSpec {
        node_dir,
        topic,
        subscription: a.subscription,
        kind,
        consumer: a.consumer,
        priority: a.priority,
        ack_timeout: a.ack_timeout,
        max_redeliveries: a.max_redeliveries,
        start,
        filter: Filter::default()
            .symbols(a.only.symbols)
            .exchanges(a.only.exchanges)
            .currencies(a.only.currencies),
        dedup,
        ack: !a.no_ack,
        count: a.count.unwrap_or(0),
    };
    let shutdown = Shutdown::on_signals()?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let sum = tickwire_broker::consume::run_shm(spec, &shutdown.token, &mut out)?;
    let _ = out.flush();
    print_summary(&sum);
    Ok(())
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
        "ring" => Start::RingEarliest,
        s if s.contains('T') => Start::Time(
            tickwire_api::bars::parse_time(s).map_err(|e| format!("--start {e}"))?,
        ),
        s => Start::Sequence(s.parse().map_err(|_| {
            format!(
                "--start {s:?}: expected latest, earliest, ring, a sequence number or an RFC 3339 time"
            )
        })?),
    };
    let filter = Filter::default()
        .symbols(a.only.symbols.clone())
        .exchanges(a.only.exchanges.clone())
        .currencies(a.only.currencies.clone())
        .kinds(kinds);
    let dir = a
        .node_dir
        .clone()
        .unwrap_or_else(shm_client::default_node_dir);
    let open = |start: Start| {
        Subscriber::builder(&a.topic)
            .node_dir(&dir)
            .start(start)
            .filter(filter.clone())
            .wait(WaitStrategy::Futex { spins: 100 })
            .open()
    };
    let mut sub = open(start)?;
    if let Some(e) = sub.symbology_error() {
        // Without symbology, symbols print as null and sizes unscaled.
        return Err(format!("cannot resolve instruments: {e}").into());
    }
    let shutdown = Shutdown::on_signals()?;
    let stop = &shutdown.token;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let mut last_event = Instant::now();
    let idle = a.idle_timeout;
    let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| e.to_string())?;
    say_what_we_wait_for(&mut sub, &a, start, &dir);
    let result: Result<(), TailError> = (|| {
        while !stop.is_cancelled() && a.count.is_none_or(|c| printed < c) {
            let want = a.count.map_or(1024, |c| (c - printed).min(1024) as usize);
            let mut written = Ok(());
            let mut replaced = None;
            let n = sub.poll(want, |e| {
                match &e {
                    Event::Tick(t) => {
                        printed += 1;
                        if a.stats {
                            let _ = latency.record(
                                tickwire_proto::futex::realtime_ns()
                                    .saturating_sub(t.body.ts_ingest())
                                    .max(1),
                            );
                        }
                    }
                    Event::Replaced { removed, .. } => replaced = Some(*removed),
                    _ => {}
                }
                if written.is_ok() {
                    written = tail::write_event(&mut out, &a.topic, &e, a.json);
                }
            });
            written?;
            if let Some(removed) = replaced {
                out.flush()?;
                let what = if removed {
                    "were removed (the topic was deleted); waiting for it to be created again, then following it"
                } else {
                    "were replaced; following the new ones"
                };
                let _ = writeln!(
                    std::io::stderr(),
                    "tickwire tail: the rings of {} in {} {what} from their start",
                    a.topic,
                    dir.display()
                );
                sub = loop {
                    if stop.is_cancelled() {
                        return Ok(());
                    }
                    match open(Start::Earliest) {
                        Ok(s) => break s,
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                };
                continue;
            }
            if n == 0 {
                out.flush()?;
                if idle.is_some_and(|d| last_event.elapsed() >= d) {
                    break;
                }
                sub.wait_for_data(Duration::from_millis(100));
            } else {
                last_event = Instant::now();
            }
        }
        out.flush()?;
        Ok(())
    })();
    match result {
        Ok(()) => {}
        // As a process killed by SIGPIPE: quietly, with its status.
        Err(TailError::ClosedPipe) => std::process::exit(141),
        Err(e) => return Err(e.into()),
    }
    if a.stats {
        let s = sub.stats();
        let q = |p: f64| latency.value_at_quantile(p);
        let _ = writeln!(
            std::io::stderr(),
            "{}",
            serde_json::json!({
                "topic": a.topic, "ticks": s.delivered, "filtered": s.filtered, "gaps": s.gaps, "lost": s.lost, "untethered": s.untethered,
                "ingest_to_read_ns": {"p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": latency.max(), "samples": latency.len()},
            })
        );
    }
    Ok(())
}

/// Says once, on stderr, when `tail` is going to wait for something that
/// is not there yet: no live writer, a start beyond what was published, a
/// filter no known instrument passes.
fn say_what_we_wait_for(sub: &mut Subscriber, a: &TailArgs, start: Start, dir: &std::path::Path) {
    let mut err = std::io::stderr();
    if sub.live_writers() == 0 {
        let _ = writeln!(
            err,
            "tickwire tail: no writer is running for {} in {} (is `tickwire serve` running with this node directory?); waiting for one",
            a.topic,
            dir.display()
        );
    }
    if let Start::Sequence(seq) = start {
        let published = sub.published();
        if published.iter().all(|&(_, p)| seq > p + 1) {
            let highest = published.iter().map(|&(_, p)| p).max().unwrap_or(0);
            let _ = writeln!(
                err,
                "tickwire tail: waiting for sequence {seq}: the partitions have published up to {highest}"
            );
        }
    }
    if sub.matching_instruments() == Some(0) {
        let known = sub.symbology().map_or(0, |s| s.count());
        let _ = writeln!(
            err,
            "tickwire tail: none of the {known} instruments known now matches --symbol {:?} --exchange {:?} --currency {:?} (names match ignoring case); waiting for one to appear",
            a.only.symbols, a.only.exchanges, a.only.currencies
        );
    }
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
        connected = n(&stats.connected),
        connect_failures = n(&stats.connect_failures),
        events_out = n(&stats.events_out),
        events_dropped = n(&stats.events_dropped),
        "{what}"
    );
}

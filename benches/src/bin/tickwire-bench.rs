//! `tickwire-bench shm`: tickwire's shared-memory figures beside the plain
//! ring (the physical floor) and iceoryx2 (the best peer), in one run.
//! Prints one JSON object per line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use benches::{Mode, Run, ice, plain, tw};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

/// PLATFORM.md's plain-ring figure on this kind of machine (events/s).
const PLAIN_RING_REFERENCE: f64 = 135e6;

#[derive(Parser)]
#[command(
    name = "tickwire-bench",
    about = "tickwire benchmarks with their baselines in the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Shared-memory cases: max_1x1, paced_1x1, ingest_1x1, fanout_N.
    Shm(Shm),
    /// The Pulsar bridge beside Pulsar's own consumer (needs scripts/services.sh up).
    Pulsar(benches::pulsar_bench::PulsarBench),
    /// The remote edge (gRPC, WebSocket, REST) beside NATS and the bare servers.
    Edge(benches::edge::EdgeBench),
    /// Subscription groups (Shared, Key_Shared of 4, at least once) beside
    /// Pulsar's own subscriptions (needs scripts/services.sh up).
    Groups(benches::groups_bench::GroupsBench),
    /// The journal (append, replay-merge) beside plain sequential writes and reads.
    History(benches::history_bench::HistoryBench),
    /// Internal: an edge client process.
    #[command(name = "__edge_client", hide = true)]
    EdgeClient(benches::edge::ClientArgs),
    /// Internal: a reader process.
    #[command(name = "__reader", hide = true)]
    Reader {
        #[arg(long)]
        system: String,
        #[arg(long)]
        mode: String,
        #[arg(long)]
        path: String,
        #[arg(long)]
        core: usize,
        #[arg(long, default_value = "spin")]
        wait: String,
        #[arg(long, default_value_t = 0)]
        tether_ms: u64,
        #[arg(long, default_value_t = 1 << 16)]
        capacity: u64,
        #[arg(long, default_value_t = 1)]
        readers: usize,
        #[arg(long)]
        routed: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Reader {
            system,
            mode,
            path,
            core,
            wait,
            tether_ms,
            capacity,
            readers,
            routed,
        } => {
            let Some(mode) = Mode::parse(&mode) else {
                eprintln!("tickwire-bench: unknown mode {mode:?}");
                return ExitCode::FAILURE;
            };
            let res = match system.as_str() {
                "tickwire" => {
                    tw::reader(mode, &PathBuf::from(&path), core, &wait, tether_ms, routed)
                }
                "plain_ring" => plain::reader(mode, &PathBuf::from(&path), core, capacity),
                "iceoryx2" => ice::reader(mode, &path, core, false, readers),
                "iceoryx2_slice64" => ice::reader(mode, &path, core, true, readers),
                other => Err(format!("unknown system {other:?}")),
            };
            res.map(|v| println!("{v}"))
        }
        Cmd::Pulsar(mut b) => {
            b.trials = b.trials.max(1);
            benches::pulsar_bench::run(&b)
        }
        Cmd::Edge(b) => benches::edge::run(&b),
        Cmd::Groups(b) => benches::groups_bench::run(&b),
        Cmd::History(b) => benches::history_bench::run(&b),
        Cmd::EdgeClient(a) => benches::edge::client(&a).map(|v| println!("{v}")),
        Cmd::Shm(mut b) => {
            b.trials = b.trials.max(1);
            shm(b)
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tickwire-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tickwire-bench shm` settings.
#[derive(clap::Args)]
struct Shm {
    /// Seconds per case and system (split over the trials in max_1x1 and paced_1x1).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Fan-out reader counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![4usize, 16])]
    consumers: Vec<usize>,
    /// Writer pace for paced_1x1 and ingest_1x1 (events/s).
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// Writer pace for the fan-out cases (events/s).
    #[arg(long, default_value_t = 1_000_000)]
    fanout_rate: u64,
    /// Cases to run (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Core the writer runs on.
    #[arg(long, default_value_t = 0)]
    writer_core: usize,
    /// Core the reader process(es) and the ingest shard run on.
    #[arg(long, default_value_t = 1)]
    reader_core: usize,
    /// Ring capacity in slots for the 1:1 cases, tickwire and plain ring
    /// alike (16384 x 64 B = 1 MiB, this machine's L2). Fan-out uses at
    /// least 2^20 so that untethered readers on a shared core keep up.
    #[arg(long, default_value_t = 1 << 14)]
    capacity: u64,
    /// Interleaved trials for max_1x1 and paced_1x1 (median reported).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Tether budget of the lossless tickwire readers, ms.
    #[arg(long, default_value_t = 1000)]
    tether_ms: u64,
}

impl Shm {
    fn wants(&self, case: &str) -> bool {
        self.cases.is_empty()
            || self
                .cases
                .iter()
                .any(|c| c == case || (c == "fanout" && case.starts_with("fanout_")))
    }
    fn run(&self, secs: f64, rate: u64, capacity: u64) -> Run {
        Run {
            duration: Duration::from_secs_f64(secs),
            rate,
            writer_core: self.writer_core,
            reader_core: self.reader_core,
            capacity,
        }
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// One output line from reader results.
fn line(case: &str, system: &str, s: &Shm, readers: &[Value], extra: Value) -> Value {
    let events: u64 = readers.iter().map(|r| u(r, "events")).sum();
    let elapsed = readers
        .iter()
        .map(|r| u(r, "elapsed_ns"))
        .max()
        .unwrap_or(1)
        .max(1);
    let worst = |k: &str| readers.iter().map(|r| u(r, k)).max().unwrap_or(0);
    let mut v = json!({
        "case": case,
        "system": system,
        "consumers": readers.len(),
        "events_per_sec": (events as f64 * 1e9 / elapsed as f64).round(),
        "p50_ns": worst("p50_ns"),
        "p99_ns": worst("p99_ns"),
        "p999_ns": worst("p999_ns"),
        "max_ns": worst("max_ns"),
        "lost": readers.iter().map(|r| u(r, "lost")).sum::<u64>(),
        "torn": readers.iter().map(|r| u(r, "torn")).sum::<u64>(),
        "cores": {"writer": s.writer_core, "readers": s.reader_core},
        "latency_samples": readers.iter().map(|r| u(r, "samples")).sum::<u64>(),
    });
    if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in more {
            obj.insert(k.clone(), x.clone());
        }
    }
    v
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    if xs.is_empty() { 0.0 } else { xs[xs.len() / 2] }
}

/// Runs `s.trials` rounds over `systems` (one trial of each per round, so a
/// noisy phase of the machine hits all of them); returns each system's
/// trial lines.
fn interleave(
    case: &str,
    systems: &[&str],
    s: &Shm,
    mut one: impl FnMut(&str) -> Result<Vec<Value>, String>,
) -> Result<Vec<Vec<Value>>, String> {
    let mut trials: Vec<Vec<Value>> = vec![Vec::new(); systems.len()];
    for _ in 0..s.trials {
        for (k, sys) in systems.iter().enumerate() {
            let r = one(sys)?;
            trials[k].push(line(case, sys, s, &r, json!({})));
        }
    }
    Ok(trials)
}

/// The median of interleaved trials of one system, as one output line.
fn summarize(case: &str, system: &str, s: &Shm, t: &[Value], extra: Value) -> Value {
    let med = |key: &str| median(t.iter().map(|v| v[key].as_f64().unwrap_or(0.0)).collect());
    let mut v = json!({
        "case": case, "system": system, "consumers": 1,
        "events_per_sec": med("events_per_sec"), "p50_ns": med("p50_ns"), "p99_ns": med("p99_ns"), "p999_ns": med("p999_ns"), "max_ns": med("max_ns"),
        "lost": t.iter().map(|v| u(v, "lost")).sum::<u64>(), "torn": t.iter().map(|v| u(v, "torn")).sum::<u64>(),
        "cores": {"writer": s.writer_core, "readers": s.reader_core},
        "trials": t.len(), "aggregate": "median of interleaved trials",
        "trial_events_per_sec": t.iter().map(|v| v["events_per_sec"].as_f64().unwrap_or(0.0)).collect::<Vec<_>>(),
        "trial_p50_ns": t.iter().map(|v| u(v, "p50_ns")).collect::<Vec<_>>(),
    });
    if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in more {
            obj.insert(k.clone(), x.clone());
        }
    }
    v
}

fn ratio(a: &Value, b: &Value, k: &str) -> f64 {
    let (x, y) = (a[k].as_f64().unwrap_or(0.0), b[k].as_f64().unwrap_or(0.0));
    if y == 0.0 {
        0.0
    } else {
        (x / y * 1000.0).round() / 1000.0
    }
}

fn shm(s: Shm) -> Result<(), String> {
    let _ = std::fs::create_dir_all("/dev/shm/tickwire-bench");
    if s.wants("max_1x1") {
        let run = s.run(s.seconds / s.trials as f64, 0, s.capacity);
        let systems = ["tickwire", "plain_ring", "iceoryx2", "iceoryx2_slice64"];
        let trials = interleave("max_1x1", &systems, &s, |sys| match sys {
            "tickwire" => tw::run(Mode::Max, &run, 1, "spin", s.tether_ms),
            "plain_ring" => plain::run(Mode::Max, &run),
            "iceoryx2" => ice::run(Mode::Max, &run, 1, false, "max"),
            _ => ice::run(Mode::Max, &run, 1, true, "max-slice"),
        })?;
        let extra = |sys: &str| match sys {
            "tickwire" => {
                json!({"reader": "shm_client::Subscriber, tethered", "tether_budget_ms": s.tether_ms, "capacity": s.capacity, "batch": 256})
            }
            "plain_ring" => json!({"capacity": s.capacity, "index_publish_every": 64}),
            "iceoryx2" => json!({"events_per_sample": 1, "subscriber_buffer": 256}),
            _ => json!({"events_per_sample": 64, "subscriber_buffer": 256}),
        };
        let summary: Vec<Value> = systems
            .iter()
            .zip(&trials)
            .map(|(sys, t)| summarize("max_1x1", sys, &s, t, extra(sys)))
            .collect();
        for (k, mut v) in summary.iter().cloned().enumerate() {
            if systems[k] == "plain_ring"
                && v["events_per_sec"].as_f64().unwrap_or(0.0) < PLAIN_RING_REFERENCE * 0.4
            {
                v["baseline_suspect"] = json!(true);
            }
            println!("{v}");
        }
        println!(
            "{}",
            json!({"case": "max_1x1", "system": "ratios", "tickwire_vs_plain_ring": ratio(&summary[0], &summary[1], "events_per_sec"), "tickwire_vs_iceoryx2": ratio(&summary[0], &summary[2], "events_per_sec"), "tickwire_vs_iceoryx2_slice64": ratio(&summary[0], &summary[3], "events_per_sec")})
        );
    }
    if s.wants("paced_1x1") {
        let per = s.seconds / s.trials as f64;
        let run = s.run(per, s.rate, s.capacity);
        let systems = ["tickwire", "plain_ring", "iceoryx2"];
        let trials = interleave("paced_1x1", &systems, &s, |sys| match sys {
            "tickwire" => tw::run(Mode::Paced, &run, 1, "spin", s.tether_ms),
            "plain_ring" => plain::run(Mode::Paced, &run),
            _ => ice::run(Mode::Paced, &run, 1, false, "paced"),
        })?;
        let extra = json!({"rate": s.rate});
        let summary: Vec<Value> = systems
            .iter()
            .zip(&trials)
            .map(|(sys, t)| summarize("paced_1x1", sys, &s, t, extra.clone()))
            .collect();
        for v in &summary {
            println!("{v}");
        }
        println!(
            "{}",
            json!({"case": "paced_1x1", "system": "ratios", "p50_tickwire_vs_plain_ring": ratio(&summary[0], &summary[1], "p50_ns"), "p50_tickwire_vs_iceoryx2": ratio(&summary[0], &summary[2], "p50_ns")})
        );
    }
    if s.wants("ingest_1x1") {
        let run = s.run(s.seconds, s.rate, s.capacity);
        let r = tw::ingest(&run, s.tether_ms)?;
        println!(
            "{}",
            line(
                "ingest_1x1",
                "tickwire",
                &s,
                &r,
                json!({"rate": s.rate, "shard_spins_before_park": tw::INGEST_SHARD_SPINS, "path": "Ingest::try_send (writer core) -> shard queue -> shard (adaptive idle, reader core) -> ring -> Subscriber (futex wait, reader core)"})
            )
        );
    }
    for &n in &s.consumers {
        let case = format!("fanout_{n}");
        if !s.wants(&case) {
            continue;
        }
        let run = s.run(s.seconds, s.fanout_rate, s.capacity.max(1 << 20));
        let wait = if n <= 4 { "yield" } else { "futex" };
        let r = tw::run(Mode::Fanout, &run, n, wait, 0)?;
        println!(
            "{}",
            line(
                &case,
                "tickwire",
                &s,
                &r,
                json!({"rate": s.fanout_rate, "wait": wait, "tethered": false, "capacity": run.capacity})
            )
        );
        let r = ice::run(Mode::Fanout, &run, n, false, &case)?;
        println!(
            "{}",
            line(
                &case,
                "iceoryx2",
                &s,
                &r,
                json!({"rate": s.fanout_rate, "wait": "yield", "events_per_sample": 1})
            )
        );
    }
    Ok(())
}

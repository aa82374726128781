//! tickwire itself: the broker's `PartitionWriter` (the code a shard runs)
//! and readers through the public `shm_client::Subscriber`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use shm_client::{Event, Start, Subscriber, WaitStrategy};
use tickwire_proto::file::{PartitionWriter, RingParams};
use tickwire_proto::frame::SLOT_SIZE;

use crate::{Mode, Op, ReaderProc, Run, Tally, drive, payload, pin};

/// Topic the benchmark writes.
pub const TOPIC: &str = "bench/ticks";

/// Where runs keep their rings: shared memory, so what is left there is
/// memory the machine no longer has.
const SHM_ROOT: &str = "/dev/shm/tickwire-bench";

/// A fresh node directory for one run. The first call also removes what
/// runs that are gone left behind (a bench killed mid-run): directories
/// are named after their process id.
pub fn fresh_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if n == 0 {
        remove_orphans(Path::new(SHM_ROOT));
    }
    Path::new(SHM_ROOT).join(format!("{}-{tag}-{n}", std::process::id()))
}

/// Removes the node directories under `root` whose process is gone.
fn remove_orphans(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A node directory removed when dropped.
pub struct NodeDir(pub PathBuf);

impl Drop for NodeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[inline(always)]
fn body(i: u64, ts: u64) -> [u64; 7] {
    let w = payload(i, ts);
    [w[0], w[1], w[2], w[3], w[4], w[5], w[6]]
}

/// Runs the writer with `readers` reader processes; returns their results.
///
/// `wait` is the readers' strategy (`spin`, `yield`, `futex`); `tether_ms`
/// tethers them (lossless) with that budget, 0 leaves them untethered.
///
/// # Errors
/// Ring or process failures.
pub fn run(
    mode: Mode,
    run: &Run,
    readers: usize,
    wait: &str,
    tether_ms: u64,
) -> Result<Vec<serde_json::Value>, String> {
    let dir = fresh_dir(mode.name());
    let mut w = PartitionWriter::open(
        &dir,
        &RingParams {
            topic: TOPIC.into(),
            partition: 0,
            partitions: 1,
            capacity: run.capacity,
            slot_size: SLOT_SIZE as u32,
            modes: Default::default(),
        },
    )
    .map_err(|e| e.to_string())?;
    let mut procs = Vec::new();
    for _ in 0..readers {
        let args = vec![
            "--system".into(),
            "tickwire".into(),
            "--mode".into(),
            mode.name().into(),
            "--path".into(),
            dir.display().to_string(),
            "--core".into(),
            run.reader_core.to_string(),
            "--wait".into(),
            wait.into(),
            "--tether-ms".into(),
            tether_ms.to_string(),
        ];
        match ReaderProc::spawn(&args) {
            Ok(p) => procs.push(p),
            Err(e) => {
                procs.into_iter().for_each(ReaderProc::kill);
                return Err(e);
            }
        }
    }
    pin(run.writer_core);
    w.flush(); // notice the tethered readers before the first event
    drive(mode, run, |op| match op {
        Op::Publish(i, ts) => {
            w.publish(&body(i, ts));
        }
        Op::BatchEnd => {
            w.flush();
        }
    });
    let out = crate::results(procs);
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// The reader process.
///
/// # Errors
/// If the ring cannot be opened.
pub fn reader(
    mode: Mode,
    dir: &Path,
    core: usize,
    wait: &str,
    tether_ms: u64,
    routed: bool,
) -> Result<serde_json::Value, String> {
    pin(core);
    let strategy = match wait {
        "yield" => WaitStrategy::SpinThenYield { spins: 200 },
        "futex" => WaitStrategy::Futex { spins: 200 },
        _ => WaitStrategy::BusySpin,
    };
    let mut b = Subscriber::builder(TOPIC)
        .node_dir(dir)
        .start(Start::Sequence(1))
        .wait(strategy);
    if tether_ms > 0 {
        b = b.tethered(Duration::from_millis(tether_ms));
    }
    let mut sub = b.open().map_err(|e| e.to_string())?;
    let mut tally = Tally::new(mode == Mode::Paced);
    if routed {
        tally = tally.routed();
    }
    let mut untethered = 0u64;
    let mut gaps = 0u64;
    println!("READY");
    let mut running = true;
    let spin = wait == "spin";
    while running {
        let n = sub.poll(1024, |e| match e {
            Event::Tick(t) => running &= tally.take(t.body.words()),
            Event::Gap { .. } => gaps += 1,
            Event::Untethered { .. } => untethered += 1,
            _ => {}
        });
        if n == 0 && !spin {
            sub.wait_for_data(Duration::from_millis(10));
        }
    }
    let mut v = tally.to_json();
    v["gaps"] = serde_json::json!(gaps);
    v["untethered"] = serde_json::json!(untethered);
    Ok(v)
}

/// Empty polls the ingest case's shard spins before parking.
pub const INGEST_SHARD_SPINS: u32 = 100;

/// A one-shard, one-partition broker pinned to `core`, with the synthetic
/// feed and the journal off: when idle the shard does not spin (that keeps
/// what shares its core off it: ~0.8 ms of p50 at 100k/s with the
/// defaults), it yields a little (at full rate the queue empties for
/// microseconds; parking at once costs the publisher a wake per event) and
/// then parks.
pub fn shared_core_config(
    dir: PathBuf,
    core: usize,
    topic: &str,
    capacity: u64,
) -> tickwire_broker::config::Config {
    use tickwire_broker::config::{Config, IdleStrategy, TopicConfig};
    let mut cfg = Config::default();
    cfg.node.dir = Some(dir);
    cfg.synthetic.enabled = false;
    cfg.journal.enabled = false;
    cfg.shards.count = 1;
    cfg.shards.pin = true;
    cfg.shards.cores = vec![core];
    cfg.shards.idle = IdleStrategy::Adaptive;
    cfg.shards.spin_iterations = 0;
    cfg.shards.yield_iterations = 50;
    cfg.topics = vec![TopicConfig {
        name: topic.into(),
        partitions: 1,
        capacity,
        ..TopicConfig::default()
    }];
    cfg
}

/// The route of the benchmarks' one instrument (BENCH on XBEN) in `topic`.
///
/// # Errors
/// No such topic; a full symbology table.
/// Starts the edge of `broker` (with `cfg.edge`) on `rt`.
///
/// # Errors
/// The edge's start error.
pub fn start_edge(
    rt: &tokio::runtime::Runtime,
    cfg: &tickwire_broker::config::Config,
    broker: &tickwire_broker::engine::Broker,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<tickwire_api::Edge, String> {
    rt.block_on(tickwire_api::Edge::start(
        cfg.edge.clone(),
        std::sync::Arc::new(tickwire_broker::edge::BrokerEngine::new(broker)),
        cancel.clone(),
    ))
    .map_err(|e| format!("edge: {e}"))
}

pub fn bench_route(
    ingest: &mut tickwire_broker::engine::Ingest,
    topic: &str,
) -> Result<tickwire_broker::router::Route, String> {
    let topic = ingest.resolver().topic(topic).ok_or("topic")?;
    ingest
        .resolver()
        .route(
            topic,
            &tickwire_proto::symbology::Instrument {
                symbol: "BENCH".into(),
                exchange: "XBEN".into(),
                currency: "USD".into(),
                size_decimals: 0,
            },
        )
        .map_err(|e| e.to_string())
}

/// `ingest_1x1`: events go through the broker's router and shard queue
/// (`Ingest::try_send`) from a paced producer; the reader is a process on
/// the shard's core.
///
/// # Errors
/// Broker or process failures.
pub fn ingest(run: &Run, tether_ms: u64) -> Result<Vec<serde_json::Value>, String> {
    use tickwire_broker::config::{Config, IdleStrategy, TopicConfig};
    use tickwire_broker::engine::Broker;
    use tickwire_proto::FrameBody;

    let dir = fresh_dir("ingest");
    let mut cfg = Config::default();
    cfg.node.dir = Some(dir.clone());
    cfg.synthetic.enabled = false;
    // The baselines (a plain ring, iceoryx2) keep nothing on disk; the
    // journal has its own benchmark (`tickwire-bench history`).
    cfg.journal.enabled = false;
    cfg.shards.count = 1;
    cfg.shards.pin = true;
    cfg.shards.cores = vec![run.reader_core];
    // The shard shares its core with the reader: it parks soon after the
    // queue empties so that the reader gets the core.
    cfg.shards.idle = IdleStrategy::Adaptive;
    cfg.shards.spin_iterations = INGEST_SHARD_SPINS;
    cfg.shards.yield_iterations = 0;
    cfg.topics = vec![TopicConfig {
        name: TOPIC.into(),
        partitions: 1,
        capacity: run.capacity,
        ..TopicConfig::default()
    }];
    let broker = Broker::start(&cfg).map_err(|e| e.to_string())?;
    let mut ingest = broker.ingest(1);
    let route = bench_route(&mut ingest, TOPIC)?;
    let args: Vec<String> = [
        "--system",
        "tickwire",
        "--mode",
        "paced",
        "--routed",
        "--path",
        &dir.display().to_string(),
        "--core",
        &run.reader_core.to_string(),
        "--wait",
        "futex",
        "--tether-ms",
        &tether_ms.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let proc = ReaderProc::spawn(&args)?;
    pin(run.writer_core);
    std::thread::sleep(Duration::from_millis(20));
    let send = |op: Op| {
        let Op::Publish(i, ts) = op else { return };
        let w = payload(i, ts);
        // The router overwrites the instrument id (word 5's low half) with
        // the route's; keep word 5 intact by giving it the same value.
        // The first seven payload words are the frame body.
        let b = FrameBody::from_words(&std::array::from_fn(|k| w[k]));
        while ingest.try_send(&route, &b, None).is_err() {
            std::hint::spin_loop();
        }
    };
    drive(Mode::Paced, run, send);
    let out = proc.result();
    broker.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    out.map(|v| vec![v])
}

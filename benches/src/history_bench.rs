//! `tickwire-bench history`: the journal beside the disk's own floor, in
//! one run, one JSON object per line.
//!
//! - `journal_append`: ingest at the producer's max rate with the journal
//!   off, then on (does ingest slow?), then paced at `--paced-rate` (does
//!   the journal keep up with no slowdown?); beside `plain_write`, the same
//!   bytes written sequentially with write(2) in blocks of the journal's
//!   size and an fdatasync per second, as the journal does. Both are timed
//!   until the bytes are durable (a last fdatasync): with 24 GiB of page
//!   cache, timing to the page cache would time memcpy, not the disk.
//!   Ingest here is bound by the one producer thread, so the journal's
//!   rate at max ingest is the producer's, not the journal's.
//! - `journal_catch_up`: the journal's own rate: a ring holding `--events`
//!   it has not written (filled with the journal off), and a journal
//!   started on it, as after a stop with the journal off; timed until the
//!   journal holds them all, durably, beside the same `plain_write`; the
//!   bar builder is off here (on in the other cases, on the journal's core).
//! - `replay_merge`: a subscriber from Earliest reads everything the journal
//!   holds while the writer goes on at `--live-rate`, and joins the live
//!   ring: catch-up rate, `lost` (gaps) and `duplicates`; beside
//!   `plain_read`, a sequential read of the same segment files in the
//!   reader's block size.
//!
//! - `history_1m_day`, `history_1h_month`: REST history beside the same
//!   query in PostgreSQL; `cache_latest`: REST latest of a symbol another
//!   node holds, through Redis, beside a plain Redis GET
//!   ([`crate::bars_bench`]).
//!
//! Cores: the shard and the journal thread on `--shard-core` (0), the
//! producer and the subscriber on `--client-core` (1). Rings live in
//! /dev/shm; the journal under `--dir` (default /var/tmp, the machine's
//! disk). The files were just written, so reads come from the page cache
//! for both systems alike.

use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use shm_client::{Event, Start, Subscriber, WaitStrategy};
use tickwire_broker::engine::{Broker, Ingest};
use tickwire_broker::router::Route;
use tickwire_proto::FrameBody;
use tickwire_proto::futex::realtime_ns;

const TOPIC: &str = "bench/history";

/// Options of `tickwire-bench history`.
#[derive(Debug, Clone, clap::Args)]
pub struct HistoryBench {
    /// Events per max-rate ingest run (and in the journal for the replay).
    #[arg(long, default_value_t = 20_000_000)]
    pub events: u64,
    /// Paced ingest rate for the keep-up check (events/s).
    #[arg(long, default_value_t = 2_000_000)]
    pub paced_rate: u64,
    /// Seconds of paced ingest.
    #[arg(long, default_value_t = 5.0)]
    pub paced_seconds: f64,
    /// Live rate while the replay catches up (events/s).
    #[arg(long, default_value_t = 500_000)]
    pub live_rate: u64,
    /// Where the journal and the plain files go.
    #[arg(long, default_value = "/var/tmp/tickwire-bench")]
    pub dir: PathBuf,
    /// Core of the shard.
    #[arg(long, default_value_t = 0)]
    pub shard_core: usize,
    /// Core of the producer and the subscriber.
    #[arg(long, default_value_t = 1)]
    pub client_core: usize,
    /// Core of the journal thread: the shard's by default (on 2 cores the
    /// shard yields when its queue is empty, and the producer has core 1;
    /// measured here: unpinned or on core 1 slows ingest to 0.75x).
    #[arg(long, default_value_t = 0)]
    pub journal_core: usize,
    /// Requests per REST and PostgreSQL history case (after 20 of warm-up).
    #[arg(long, default_value_t = 300)]
    pub history_requests: u64,
    /// Only these cases (comma-separated): journal_append, replay_merge,
    /// history_1m_day, history_1h_month, cache_latest.
    #[arg(long, value_delimiter = ',')]
    pub cases: Vec<String>,
}

impl HistoryBench {
    fn wants(&self, case: &str) -> bool {
        self.cases.is_empty() || self.cases.iter().any(|c| c == case)
    }
}

struct Node {
    broker: Broker,
    ingest: Ingest,
    route: Route,
    shm: PathBuf,
    /// Leave the rings for a node started after this one.
    keep_rings: bool,
}

fn node(b: &HistoryBench, journal: Option<&Path>) -> Result<Node, String> {
    node_at(b, journal, crate::tw::fresh_dir("history"), 1 << 18, true)
}

/// A node on the rings in `shm` (created, or resumed when a node before
/// left them), of `capacity` frames; with the bar builder when `bars`
/// (it runs on the journal's core).
fn node_at(
    b: &HistoryBench,
    journal: Option<&Path>,
    shm: PathBuf,
    capacity: u64,
    bars: bool,
) -> Result<Node, String> {
    // The shard shares core 0 with the journal thread (and the live
    // writer of the replay case).
    let mut cfg = crate::tw::shared_core_config(shm.clone(), b.shard_core, TOPIC, capacity);
    cfg.edge.enabled = false;
    cfg.stats.log_interval_secs = 0;
    cfg.history.enabled = bars;
    if let Some(dir) = journal {
        cfg.journal.enabled = true;
        cfg.journal.dir = Some(dir.to_path_buf());
        cfg.journal.core = Some(b.journal_core);
    }
    let broker = Broker::start(&cfg).map_err(|e| format!("broker: {e}"))?;
    let mut ingest = broker.ingest(1);
    let route = crate::tw::bench_route(&mut ingest, TOPIC)?;
    Ok(Node {
        broker,
        ingest,
        route,
        shm,
        keep_rings: false,
    })
}

impl Drop for Node {
    fn drop(&mut self) {
        if !self.keep_rings {
            let _ = std::fs::remove_dir_all(&self.shm);
        }
    }
}

fn body(i: u64) -> FrameBody {
    let mut b = FrameBody::trade(0, realtime_ns(), 100_000_000_000 + i as i64, 1);
    b.source_seq = i;
    b
}

/// Sends `n` events (source_seq `from..from + n`) as fast as the shard
/// takes them, or paced at `rate`; returns (seconds, events refused while
/// the queue was full, i.e. backpressure spins).
fn send(ingest: &mut Ingest, route: &Route, from: u64, n: u64, rate: Option<u64>) -> (f64, u64) {
    let start = Instant::now();
    let mut spins = 0u64;
    for k in 0..n {
        if let Some(r) = rate {
            let due = Duration::from_secs_f64(k as f64 / r as f64);
            while start.elapsed() < due {
                std::hint::spin_loop();
            }
        }
        let b = body(from + k);
        while ingest.try_send(route, &b, None).is_err() {
            spins += 1;
            std::hint::spin_loop();
        }
    }
    (start.elapsed().as_secs_f64(), spins)
}

fn wait_journaled(node: &Node, n: u64, lag: &mut Histogram<u64>) -> f64 {
    let start = Instant::now();
    loop {
        let j = node.broker.journal_stats().map_or(0, |s| s.events);
        let _ = lag.record(n.saturating_sub(j));
        if j >= n || start.elapsed() > Duration::from_secs(120) {
            return start.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn row(case: &str, system: &str, extra: Value) -> Value {
    let mut v = json!({"bench": "history", "case": case, "system": system});
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

fn pct(h: &Histogram<u64>) -> Value {
    json!({
        "p50": h.value_at_quantile(0.5),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

/// Runs the cases; prints each row as it comes.
///
/// # Errors
/// A broker that cannot start, files that cannot be written.
pub fn run(b: &HistoryBench) -> Result<(), String> {
    let root = b.dir.join(format!("history-{}", std::process::id()));
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let out = |v: Value| println!("{v}");
    crate::pin(b.client_core);
    let mut journal_rate = 0.0;
    let mut plain_rate = 0.0;
    if b.wants("journal_append") || b.wants("replay_merge") {
        // Max-rate ingest without the journal: the rate to compare with.
        let mut bare = node(b, None)?;
        let (secs, _) = send(&mut bare.ingest, &bare.route, 1, b.events, None);
        let bare_rate = b.events as f64 / secs;
        out(row(
            "journal_append",
            "tickwire_no_journal",
            json!({
                "events": b.events, "seconds": secs, "ingest_events_per_s": bare_rate,
                "cores": {"shard": b.shard_core, "producer": b.client_core},
            }),
        ));
        drop(bare);

        // The disk's floor: the same bytes, written the same way, from a
        // clean page cache (everything earlier synced), before the journal.
        sync_all();
        let plain = root.join("plain.bin");
        let (secs, bytes) = plain_write(&plain, b.events * 64, 256 * 1024)?;
        plain_rate = b.events as f64 / secs;
        out(row(
            "journal_append",
            "plain_write",
            json!({
                "events": b.events, "seconds": secs, "events_per_s": plain_rate,
                "mb_per_s": bytes as f64 / secs / 1e6, "block_bytes": 256 * 1024, "durable": true,
            }),
        ));
        let _ = std::fs::remove_file(&plain);
        sync_all();
        let catch_up_rate = catch_up(b, &root, plain_rate, &out)?;

        // The same with the journal: ingest rate, and when the journal has it all.
        let jdir = root.join("journal");
        let mut n = node(b, Some(&jdir))?;
        let start = Instant::now();
        let (secs, spins) = send(&mut n.ingest, &n.route, 1, b.events, None);
        let mut lag = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
        wait_journaled(&n, b.events, &mut lag);
        // Durable, as the plain write below: what the journal wrote, synced.
        sync_dir(&tickwire_proto::journal::partition_dir(&jdir, TOPIC, 0))?;
        let total = start.elapsed().as_secs_f64();
        journal_rate = b.events as f64 / total;
        let j = n.broker.journal_stats().unwrap_or_default();
        out(row(
            "journal_append",
            "tickwire",
            json!({
                "events": b.events, "seconds": total, "events_per_s": journal_rate,
                "mb_per_s": j.bytes as f64 / total / 1e6,
                "ingest_events_per_s": b.events as f64 / secs,
                "ingest_vs_no_journal": (b.events as f64 / secs) / bare_rate,
                "backpressure_spins": spins, "io": j.io, "writes": j.writes,
                "lag_events_after_ingest": pct(&lag),
                "durable": true,
                "cores": {"shard": b.shard_core, "producer": b.client_core, "journal": b.journal_core},
            }),
        ));

        // Paced: does the journal keep up at the target rate?
        let paced_n = (b.paced_rate as f64 * b.paced_seconds) as u64;
        let before = j.events;
        let sampler_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let Node {
            broker,
            ingest,
            route,
            ..
        } = &mut n;
        let (secs, spins) = std::thread::scope(|s| {
            let broker = &*broker;
            let stop = sampler_stop.clone();
            let sampler = s.spawn(move || {
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let st = broker.stats();
                    let jd = broker.journal_stats().map_or(0, |s| s.events);
                    let _ = h.record(st.events.saturating_sub(jd));
                    std::thread::sleep(Duration::from_millis(1));
                }
                h
            });
            let r = send(ingest, route, b.events + 1, paced_n, Some(b.paced_rate));
            sampler_stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (r, sampler.join().expect("sampler"))
        })
        .0;
        let mut tail = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
        let drain = wait_journaled(&n, before + paced_n, &mut tail);
        out(row(
            "journal_append_paced",
            "tickwire",
            json!({
                "offered_events_per_s": b.paced_rate, "events": paced_n,
                "ingest_events_per_s": paced_n as f64 / secs,
                "held_rate": paced_n as f64 / secs >= 0.99 * b.paced_rate as f64,
                "backpressure_spins": spins,
                "journal_drain_after_s": drain,
            }),
        ));
        let total_events = b.events + paced_n;

        out(json!({"bench": "history", "case": "journal_append",
                "ratio_tickwire_to_plain_write": journal_rate / plain_rate,
                "ratio_catch_up_to_plain_write": catch_up_rate / plain_rate}));

        if b.wants("replay_merge") {
            // Not measured against the kernel's writeback of what was just written.
            sync_all();
            replay(b, &mut n, &jdir, total_events)?;
        }
        drop(n);
    }
    let _ = (journal_rate, plain_rate);
    let _ = std::fs::remove_dir_all(&root);
    let bars: Vec<&str> = ["history_1m_day", "history_1h_month"]
        .into_iter()
        .filter(|c| b.wants(c))
        .collect();
    if !bars.is_empty() {
        crate::bars_bench::run(b, &bars, &out)?;
    }
    if b.wants("cache_latest") {
        crate::bars_bench::cache_latest(b, &out)?;
    }
    Ok(())
}

/// `journal_catch_up`: the journal's own rate, not bounded by a producer.
///
/// A node with the journal off fills a ring large enough to hold every
/// event; a node started on the same rings with the journal on then writes
/// them all, as it does after a crash or a stop with the journal off (the
/// journal starts at its last intact frame, the ring still holds the
/// rest). Timed from the start of the second node until the journal holds
/// every event, durably: the plain write's bytes, on the same disk. The
/// bar builder is off: it would share the journal's core, and it is not
/// the journal's work (`journal_append` runs with it).
fn catch_up(
    b: &HistoryBench,
    root: &Path,
    plain_rate: f64,
    out: &dyn Fn(Value),
) -> Result<f64, String> {
    let capacity = b.events.next_power_of_two().clamp(1 << 16, 1 << 25);
    let n = b.events.min(capacity);
    let shm = crate::tw::fresh_dir("catch-up");
    let mut filler = node_at(b, None, shm.clone(), capacity, false)?;
    send(&mut filler.ingest, &filler.route, 1, n, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while filler.broker.stats().events < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    filler.keep_rings = true;
    drop(filler);
    sync_all();
    let jdir = root.join("catch-up");
    let node = node_at(b, Some(&jdir), shm, capacity, false)?;
    // Timed from here: the broker's start (mapping and checking a ring of
    // `capacity` frames) is not the journal's work; what the journal wrote
    // during it is left out of the count.
    let start = Instant::now();
    let before = node.broker.journal_stats().unwrap_or_default();
    let mut lag = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    wait_journaled(&node, n, &mut lag);
    sync_dir(&tickwire_proto::journal::partition_dir(&jdir, TOPIC, 0))?;
    let secs = start.elapsed().as_secs_f64();
    let j = node.broker.journal_stats().unwrap_or_default();
    drop(node);
    let _ = std::fs::remove_dir_all(&jdir);
    let timed = j.events - before.events;
    out(row(
        "journal_catch_up",
        "tickwire",
        json!({
            "events": j.events, "timed_events": timed, "seconds": secs,
            "events_per_s": timed as f64 / secs,
            "mb_per_s": (j.bytes - before.bytes) as f64 / secs / 1e6, "io": j.io, "writes": j.writes,
            "durable": true, "ring_capacity": capacity, "bar_builder": false,
            "ratio_to_plain_write": timed as f64 / secs / plain_rate,
            "cores": {"shard": b.shard_core, "journal": b.journal_core},
        }),
    ));
    Ok(timed as f64 / secs)
}

fn plain_write(path: &Path, bytes: u64, block: usize) -> Result<(f64, u64), String> {
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let buf = vec![0x5Au8; block];
    let start = Instant::now();
    let mut last_sync = Instant::now();
    let mut done = 0u64;
    while done < bytes {
        let n = (bytes - done).min(block as u64) as usize;
        f.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        done += n as u64;
        if last_sync.elapsed() >= Duration::from_secs(1) {
            f.sync_data().map_err(|e| e.to_string())?;
            last_sync = Instant::now();
        }
    }
    f.sync_data().map_err(|e| e.to_string())?;
    Ok((start.elapsed().as_secs_f64(), done))
}

/// Flushes every dirty page of the machine, so each system starts clean.
fn sync_all() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// fdatasync of every segment file in a partition's journal.
fn sync_dir(dir: &Path) -> Result<(), String> {
    for first in tickwire_proto::journal::list_segments(dir).map_err(|e| e.to_string())? {
        let p = dir.join(tickwire_proto::journal::segment_name(first));
        std::fs::File::open(&p)
            .and_then(|f| f.sync_data())
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

/// `replay_merge`: everything from the journal, joined to live.
fn replay(b: &HistoryBench, n: &mut Node, jdir: &Path, in_journal: u64) -> Result<(), String> {
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(&n.shm)
        .start(Start::Earliest)
        .wait(WaitStrategy::SpinThenYield { spins: 100 })
        .open()
        .map_err(|e| e.to_string())?;
    let live_n = (b.live_rate as f64 * 3.0) as u64;
    let first_live = in_journal + 1;
    let mut next_seq = 1u64;
    let (mut lost, mut dups, mut got) = (0u64, 0u64, 0u64);
    let mut joined_at: Option<f64> = None;
    let mut replay_secs = 0.0;
    let start = Instant::now();
    let mut live_lat = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    std::thread::scope(|s| -> Result<(), String> {
        let ingest = &mut n.ingest;
        let route = n.route;
        let live_rate = b.live_rate;
        let shard_core = b.shard_core;
        // The live writer shares the shard's core.
        let producer = s.spawn(move || {
            crate::pin(shard_core);
            let t0 = Instant::now();
            for k in 0..live_n {
                let due = Duration::from_secs_f64(k as f64 / live_rate as f64);
                while t0.elapsed() < due {
                    std::thread::yield_now();
                }
                let b = body(first_live + k);
                while ingest.try_send(&route, &b, None).is_err() {
                    std::hint::spin_loop();
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(300);
        while got < in_journal + live_n && Instant::now() < deadline {
            let k = sub.poll(4096, |e| match e {
                Event::Tick(t) => {
                    if t.seq < next_seq {
                        dups += 1;
                    } else {
                        lost += t.seq - next_seq;
                        next_seq = t.seq + 1;
                        got += 1;
                    }
                    if joined_at.is_some() {
                        let ingest = t.body.ts_ingest();
                        let _ = live_lat.record(realtime_ns().saturating_sub(ingest).max(1));
                    }
                }
                Event::Gap { from, to, .. } => lost += to - from + 1,
                _ => {}
            });
            if got >= in_journal && replay_secs == 0.0 {
                replay_secs = start.elapsed().as_secs_f64();
            }
            if joined_at.is_none() && got > in_journal && !sub.replaying(0) {
                joined_at = Some(start.elapsed().as_secs_f64());
            }
            if k == 0 {
                std::thread::yield_now();
            }
        }
        producer
            .join()
            .map_err(|_| "producer panicked".to_string())?;
        Ok(())
    })?;
    let st = sub.stats();
    println!(
        "{}",
        row(
            "replay_merge",
            "tickwire",
            json!({
                "events_replayed": st.replayed, "events": got, "seconds_to_read_journal": replay_secs,
                "events_per_s": in_journal as f64 / replay_secs.max(1e-9),
                "joined_live_after_s": joined_at, "live_rate": b.live_rate,
                "lost": lost, "duplicates": dups, "gaps": st.gaps,
                "live_latency_ns_after_join": pct(&live_lat),
                "cores": {"shard_and_live_writer": b.shard_core, "subscriber": b.client_core},
            })
        )
    );
    // The floor: the same segment files read in order, no checks.
    let pdir = tickwire_proto::journal::partition_dir(jdir, TOPIC, 0);
    let segs = tickwire_proto::journal::list_segments(&pdir).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; tickwire_proto::journal::READ_FRAMES * 64];
    let start = Instant::now();
    let mut bytes = 0u64;
    for first in segs {
        let p = pdir.join(tickwire_proto::journal::segment_name(first));
        let f = std::fs::File::open(&p).map_err(|e| e.to_string())?;
        let mut off = 0;
        loop {
            let k = f.read_at(&mut buf, off).map_err(|e| e.to_string())?;
            if k == 0 {
                break;
            }
            off += k as u64;
            bytes += k as u64;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let plain = bytes as f64 / 64.0 / secs;
    println!(
        "{}",
        row(
            "replay_merge",
            "plain_read",
            json!({
                "events": bytes / 64, "seconds": secs, "events_per_s": plain,
                "mb_per_s": bytes as f64 / secs / 1e6, "block_bytes": buf.len(),
            })
        )
    );
    println!(
        "{}",
        json!({"bench": "history", "case": "replay_merge",
        "ratio_tickwire_to_plain_read": (in_journal as f64 / replay_secs.max(1e-9)) / plain})
    );
    Ok(())
}

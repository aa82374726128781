//! `tickwire-bench`: tickwire's figures with their baselines measured in the
//! same run, same 64-byte payload, same pinning and process topology.
//!
//! Every case runs the writer in this process and each reader in a child
//! process (`tickwire-bench __reader ...`), so shared memory is really
//! shared between processes. The payload of event `i` is eight words
//! `[ts, i, 2i, 3i, 4i, 5i, 6i, 7i]` (tickwire's 56-byte body carries the
//! first seven): readers check every word, so a torn read is counted, and
//! `i` jumping counts lost events. `ts` is CLOCK_MONOTONIC at publish: one
//! clock for all processes, so `now - ts` in the reader is one-way latency.

pub mod bars_bench;
pub mod edge;
pub mod groups_bench;
pub mod history_bench;
pub mod ice;
pub mod plain;
pub mod pulsar_bench;
pub mod tw;
pub mod wire_scan;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hdrhistogram::Histogram;
pub use tickwire_proto::futex::monotonic_ns;

/// End-of-run marker in the `i` word.
pub const END: u64 = u64::MAX;

/// Latency sampling in unpaced runs: one event in this many is timestamped.
pub const SAMPLE_EVERY: u64 = 1024;

/// How a run is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Writer as fast as it can; latency sampled 1 in 1024.
    Max,
    /// Writer spin-paced at `rate`; every event timestamped; reader spins.
    Paced,
    /// Writer paced at `rate`; readers wait (yield or futex).
    Fanout,
}

impl Mode {
    /// Name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Max => "max",
            Mode::Paced => "paced",
            Mode::Fanout => "fanout",
        }
    }
    /// Parses a name.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "max" => Some(Mode::Max),
            "paced" => Some(Mode::Paced),
            "fanout" => Some(Mode::Fanout),
            _ => None,
        }
    }
}

/// The payload of event `i`.
#[inline(always)]
pub fn payload(i: u64, ts: u64) -> [u64; 8] {
    [
        ts,
        i,
        i.wrapping_mul(2),
        i.wrapping_mul(3),
        i.wrapping_mul(4),
        i.wrapping_mul(5),
        i.wrapping_mul(6),
        i.wrapping_mul(7),
    ]
}

/// Whether words 2.. are the multiples of word 1 that the writer wrote
/// (words whose bit is clear in `skip` are checked).
#[inline(always)]
pub fn intact(w: &[u64], skip: u8) -> bool {
    let i = w[1];
    let mut ok = true;
    for (k, &v) in w.iter().enumerate().skip(2) {
        ok &= skip & (1 << k) != 0 || v == i.wrapping_mul(k as u64);
    }
    ok
}

/// What a reader counted.
pub struct Tally {
    /// Events received (not counting the end marker).
    pub events: u64,
    /// Events that never arrived (jumps in `i`).
    pub lost: u64,
    /// Events whose words did not match.
    pub torn: u64,
    /// Sum of `i` (keeps the reads from being optimised away).
    pub checksum: u64,
    /// One-way latency, ns.
    pub hist: Histogram<u64>,
    next: u64,
    first_ns: u64,
    last_ns: u64,
    sample_all: bool,
    skip: u8,
}

impl Tally {
    /// Do not check word 5 (the broker's router and shard write the
    /// instrument id and ingest delta there).
    pub fn routed(mut self) -> Tally {
        self.skip |= 1 << 5;
        self
    }

    /// A fresh tally; `sample_all` records every event's latency.
    pub fn new(sample_all: bool) -> Tally {
        Tally {
            events: 0,
            lost: 0,
            torn: 0,
            checksum: 0,
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3)
                .unwrap_or_else(|_| unreachable!()),
            next: 1,
            first_ns: 0,
            last_ns: 0,
            sample_all,
            skip: 0,
        }
    }

    /// Accounts one event; returns `false` at the end marker.
    #[inline(always)]
    pub fn take(&mut self, w: &[u64]) -> bool {
        let i = w[1];
        if i == END {
            self.last_ns = monotonic_ns();
            return false;
        }
        if self.events == 0 {
            self.first_ns = monotonic_ns();
        }
        if !intact(w, self.skip) {
            self.torn += 1;
        }
        if i != self.next {
            self.lost += i.saturating_sub(self.next);
        }
        self.next = i + 1;
        self.events += 1;
        self.checksum = self.checksum.wrapping_add(i);
        if w[0] != 0 && (self.sample_all || i.is_multiple_of(SAMPLE_EVERY)) {
            let _ = self.hist.record(monotonic_ns().saturating_sub(w[0]).max(1));
        }
        true
    }

    /// The reader's result line.
    pub fn to_json(&self) -> serde_json::Value {
        let elapsed = self.last_ns.saturating_sub(self.first_ns).max(1);
        serde_json::json!({
            "events": self.events,
            "elapsed_ns": elapsed,
            "lost": self.lost,
            "torn": self.torn,
            "checksum": self.checksum,
            "p50_ns": self.hist.value_at_quantile(0.5),
            "p99_ns": self.hist.value_at_quantile(0.99),
            "p999_ns": self.hist.value_at_quantile(0.999),
            "max_ns": self.hist.max(),
            "samples": self.hist.len(),
        })
    }
}

/// Pins the calling thread to a core. By id, not through
/// `core_affinity::get_core_ids()`, which lists only the cores of the
/// current mask (a child inherits its parent's pin).
pub fn pin(core: usize) {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        eprintln!("tickwire-bench: could not pin to core {core}");
    }
}

/// Spins until CLOCK_MONOTONIC reaches `deadline`.
#[inline(always)]
pub fn spin_until(deadline: u64) -> u64 {
    loop {
        let now = monotonic_ns();
        if now >= deadline {
            return now;
        }
        std::hint::spin_loop();
    }
}

/// A reader child process.
pub struct ReaderProc {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl ReaderProc {
    /// Starts `tickwire-bench __reader <args>` and waits for its READY line.
    ///
    /// # Errors
    /// If it cannot start or exits before READY.
    pub fn spawn(args: &[String]) -> Result<ReaderProc, String> {
        ReaderProc::spawn_cmd("__reader", args)
    }

    /// Starts `tickwire-bench <cmd> <args>` (a hidden subcommand) and waits
    /// for its READY line.
    ///
    /// # Errors
    /// If it cannot start or exits before READY.
    pub fn spawn_cmd(cmd: &str, args: &[String]) -> Result<ReaderProc, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .arg(cmd)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn reader: {e}"))?;
        let stdout = child.stdout.take().ok_or("reader stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        match lines.next() {
            Some(Ok(l)) if l == "READY" => Ok(ReaderProc { child, lines }),
            other => {
                let _ = child.kill();
                Err(format!("reader did not become ready: {other:?}"))
            }
        }
    }

    /// Waits for the reader's result line.
    ///
    /// # Errors
    /// If the reader dies or prints something else.
    pub fn result(mut self) -> Result<serde_json::Value, String> {
        let line = self
            .lines
            .next()
            .ok_or("reader exited without a result")?
            .map_err(|e| e.to_string())?;
        let _ = self.child.wait();
        serde_json::from_str(&line).map_err(|e| format!("reader result {line:?}: {e}"))
    }

    /// Kills it (on error paths).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for every reader's result.
///
/// # Errors
/// The first reader failure.
pub fn results(readers: Vec<ReaderProc>) -> Result<Vec<serde_json::Value>, String> {
    readers.into_iter().map(ReaderProc::result).collect()
}

/// Common settings of a run.
#[derive(Debug, Clone)]
pub struct Run {
    /// How long the writer writes.
    pub duration: Duration,
    /// Writer pace (events/s) in paced and fan-out modes. Fan-out samples
    /// latency 1 in 1024 like max mode (it measures loss, not latency).
    pub rate: u64,
    /// Writer core.
    pub writer_core: usize,
    /// Reader core(s).
    pub reader_core: usize,
    /// Ring capacity (slots) for tickwire and the plain ring.
    pub capacity: u64,
}

/// What [`drive`] asks the system under test to do.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Write event `i` with timestamp `ts`.
    Publish(u64, u64),
    /// End a batch (every 256 events unpaced, every event paced).
    BatchEnd,
}

/// Writes events `1..` until `run.duration` has passed, then the end marker.
pub fn drive(mode: Mode, run: &Run, mut f: impl FnMut(Op)) -> u64 {
    let start = monotonic_ns();
    let end = start + run.duration.as_nanos() as u64;
    let mut i = 0u64;
    match mode {
        Mode::Max => loop {
            for _ in 0..256 {
                i += 1;
                let ts = if i.is_multiple_of(SAMPLE_EVERY) {
                    monotonic_ns()
                } else {
                    0
                };
                f(Op::Publish(i, ts));
            }
            f(Op::BatchEnd);
            if monotonic_ns() >= end {
                break;
            }
        },
        Mode::Paced | Mode::Fanout => {
            let sample_all = mode == Mode::Paced;
            let period = 1_000_000_000 / run.rate.max(1);
            let mut deadline = start;
            while deadline < end {
                deadline += period;
                let now = spin_until(deadline);
                i += 1;
                f(Op::Publish(
                    i,
                    if sample_all || i.is_multiple_of(SAMPLE_EVERY) {
                        now
                    } else {
                        0
                    },
                ));
                f(Op::BatchEnd);
            }
        }
    }
    f(Op::Publish(END, 0));
    f(Op::BatchEnd);
    i
}

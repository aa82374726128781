//! The `tickwire` binary as a user runs it: serve, tail, bad input, SIGTERM.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tickwire");
const TOPIC: &str = "market-data/normalized/equities";

struct Server {
    child: Child,
}

impl Server {
    fn start(dir: &std::path::Path) -> Server {
        let cfg = dir.join("tickwire.toml");
        std::fs::write(
            &cfg,
            format!(
                "[node]\ndir = {:?}\n[synthetic]\nrate = 5000\n[stats]\nlog_interval_secs = 1\n",
                dir.join("node").display().to_string()
            ),
        )
        .expect("config");
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&cfg)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("serve");
        let ring = dir
            .join("node")
            .join("market-data~normalized~equities.3.ring");
        let start = Instant::now();
        while !ring.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "rings never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child }
    }

    fn terminate(mut self) -> (bool, String) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let status = self.child.wait().expect("wait");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status.success(), err)
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

fn tail(dir: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["tail", TOPIC, "--node-dir"])
        .arg(dir.join("node"))
        .args(extra)
        .args(["--idle-timeout", "30"])
        .output()
        .expect("tail");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_then_tail_json_filters_and_graceful_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());

    let (ok, out, err) = tail(dir.path(), &["--json", "--count", "50"]);
    assert!(ok, "tail failed: {err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 50);
    let mut last_seq = std::collections::HashMap::new();
    for v in &lines {
        assert_eq!(v["type"], "tick");
        assert_eq!(v["topic"], TOPIC);
        for key in [
            "symbol",
            "exchange",
            "currency",
            "kind",
            "sequence",
            "partition",
            "ts_event",
            "ts_event_ns",
            "ts_ingest_ns",
            "source_seq",
        ] {
            assert!(!v[key].is_null(), "{key} missing in {v}");
        }
        match v["kind"].as_str() {
            Some("trade") => assert!(
                v["price"].as_f64().is_some_and(|p| p > 0.0)
                    && v["size"].as_f64().is_some_and(|s| s > 0.0),
                "{v}"
            ),
            Some("quote") => assert!(v["bid_price"].as_f64() < v["ask_price"].as_f64(), "{v}"),
            other => panic!("kind {other:?}"),
        }
        let p = v["partition"].as_u64().expect("partition");
        let s = v["sequence"].as_u64().expect("sequence");
        if let Some(prev) = last_seq.insert(p, s) {
            assert_eq!(s, prev + 1, "tail prints each partition in order");
        }
    }

    let (ok, out, err) = tail(
        dir.path(),
        &[
            "--json",
            "--count",
            "20",
            "--exchange",
            "XETRA",
            "--kind",
            "trade",
        ],
    );
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 20);
    assert!(
        lines
            .iter()
            .all(|v| v["exchange"] == "XETRA" && v["currency"] == "EUR" && v["kind"] == "trade"),
        "{out}"
    );

    let (ok, out, err) = tail(dir.path(), &["--count", "5", "--symbol", "AAPL", "--stats"]);
    assert!(ok, "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(err.trim().lines().last().unwrap_or("")).expect("stats json");
    assert_eq!(summary["ticks"], 5);
    assert_eq!(summary["ingest_to_read_ns"]["samples"], 5);
    assert_eq!(out.lines().count(), 5);
    assert!(
        out.lines().all(|l| l.contains(" AAPL NASDAQ USD ")),
        "{out}"
    );

    let (ok, _, err) = tail(dir.path(), &["--kind", "bars"]);
    assert!(
        !ok && err.contains("--kind \"bars\": expected trade or quote"),
        "{err}"
    );
    let (ok, _, err) = tail(dir.path(), &["--start", "yesterday"]);
    assert!(!ok && err.contains("--start \"yesterday\""), "{err}");

    // Let one stats interval (1 s) pass so a stats line is logged.
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, log) = server.terminate();
    assert!(ok, "serve exits 0 on SIGTERM: {log}");
    assert!(
        log.contains("rings open") && log.contains(&dir.path().join("node").display().to_string()),
        "log says where the rings are: {log}"
    );
    assert!(log.contains("events_per_sec"), "stats lines: {log}");
    assert!(log.contains("stopped"), "{log}");
}

#[test]
fn tail_of_a_missing_topic_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, _, err) = tail(dir.path(), &["--count", "1"]);
    assert!(!ok);
    assert!(
        err.contains("topic \"market-data/normalized/equities\" has no rings in"),
        "{err}"
    );
}

#[test]
fn serve_refuses_a_bad_config_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[shards]\ncount = 0\n").expect("write");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .expect("serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shards.count"), "{err}");
}

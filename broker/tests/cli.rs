//! The `tickwire` binary as a user runs it: serve, tail, bad input, SIGTERM.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/serve_config.rs"]
mod serve_config;

const BIN: &str = env!("CARGO_BIN_EXE_tickwire");
const TOPIC: &str = "market-data/normalized/equities";

struct Server {
    child: Child,
}

/// A test that fails leaves no server behind.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(dir: &std::path::Path) -> Server {
        Server::start_with(dir, "")
    }

    /// A server on `<dir>/node` with `extra` TOML appended to `[node]`.
    fn start_with(dir: &std::path::Path, node_extra: &str) -> Server {
        let cfg = serve_config::write(dir, node_extra);
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&cfg)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("serve");
        // The last file the broker creates at start.
        let ring = dir
            .join("node")
            .join("market-data~normalized~equities.3.readers");
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

/// Waits for a child to exit, killing it (and failing) if it has not after
/// `limit`: a hang check, not a speed measurement.
fn exits_within(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process had not exited {limit:?} after being asked to");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc_kill(child.id() as i32, 15) };
}

#[test]
fn serve_survives_its_log_reader_going_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path());
    // Read one line, then close the pipe: like `serve 2>&1 | head -1`.
    let mut stderr = server.child.stderr.take().expect("stderr");
    let mut first = [0u8; 64];
    let _ = stderr.read(&mut first).expect("a log line");
    drop(stderr);
    // Stats are logged every second: several writes hit the closed pipe.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        server.child.try_wait().expect("wait").is_none(),
        "serve died when its log reader went away"
    );
    sigterm(&server.child);
    let status = exits_within(&mut server.child, Duration::from_secs(30));
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");
}

#[test]
fn serve_with_pulsar_unreachable_stops_at_once_on_sigterm_and_counts_the_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bridge.toml");
    // Port 1 on loopback: nothing listens there.
    std::fs::write(
        &cfg,
        format!(
            "[node]\ndir = {:?}\n[synthetic]\nenabled = false\n[stats]\nlog_interval_secs = 1\n[bridge]\nenabled = true\nurl = \"pulsar://127.0.0.1:1\"\n[edge]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n",
            dir.path().join("node").display().to_string()
        ),
    )
    .expect("config");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("serve");
    // An attempt still waiting after 10 s is reported and counted.
    std::thread::sleep(Duration::from_millis(11_500));
    sigterm(&child);
    let status = exits_within(&mut child, Duration::from_secs(20));
    let mut log = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut log)
        .expect("log");
    assert!(status.success(), "{status:?}: {log}");
    let last = log
        .lines()
        .rfind(|l| l.contains("pulsar bridge") && l.contains("connect_failures="))
        .unwrap_or("");
    assert!(
        last.contains("connected=0") && !last.contains("connect_failures=0 "),
        "the stats line says it is not connected and counts the failed attempts: {log}"
    );
}

#[test]
fn serve_on_a_file_system_too_small_for_its_rings_says_how_much_it_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "tickwire-cli-test"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "this test mounts a 1 MiB tmpfs and needs root");
    let out = Command::new(BIN)
        .args(["serve", "--node-dir"])
        .arg(mnt.join("node"))
        .output()
        .expect("serve");
    let _ = Command::new("umount").arg(&mnt).status();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no space left on device") && err.contains("bytes"),
        "{err}"
    );
}

#[test]
fn tail_refuses_a_bad_idle_timeout_without_panicking() {
    let dir = tempfile::tempdir().expect("tempdir");
    for bad in ["-1", "nan", "inf", "1e30", "soon"] {
        let out = Command::new(BIN)
            .args(["tail", TOPIC, "--node-dir"])
            .arg(dir.path())
            .arg(format!("--idle-timeout={bad}"))
            .output()
            .expect("tail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}: {err}");
        assert!(
            err.contains("--idle-timeout") && !err.contains("panicked"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn a_full_symbology_table_is_an_error_when_it_happens_and_the_rest_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(dir.path(), "symbology_capacity = 10");
    let (ok, out, err) = tail(dir.path(), &["--json", "--count", "20"]);
    assert!(ok, "{err}");
    let symbols: std::collections::HashSet<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["symbol"].as_str().map(String::from))
        .collect();
    assert!(
        !symbols.is_empty() && symbols.len() <= 10,
        "the 10 instruments that fit are served: {symbols:?}"
    );
    let (_, log) = server.terminate();
    let full = log
        .find("symbology table is full")
        .expect("said when it happened");
    let stopped = log.find("shutting down").expect("shutdown");
    assert!(full < stopped, "said before shutdown: {log}");
    assert!(log.contains("ERROR"), "as an error: {log}");
}

#[test]
fn tail_reports_write_errors_with_a_non_zero_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let out = Command::new(BIN)
        .args(["tail", TOPIC, "--json", "--count", "5", "--node-dir"])
        .arg(dir.path().join("node"))
        .stdout(std::fs::File::create("/dev/full").expect("/dev/full"))
        .output()
        .expect("tail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit 0 after writing nothing: {err}");
    assert!(err.contains("No space left on device"), "{err}");
    server.terminate();
}

#[test]
fn serve_and_tail_use_tickwire_node_dir_alike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = dir.path().join("from-env");
    let mut child = Command::new(BIN)
        .arg("serve")
        .env("TICKWIRE_NODE_DIR", &node)
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    // Partition 0's ring appears first; tail waits for the rest.
    let ring = node.join("market-data~normalized~equities.0.ring");
    let start = Instant::now();
    while !ring.exists() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let out = Command::new(BIN)
        .args(["tail", TOPIC, "--count", "3", "--idle-timeout", "30"])
        .env("TICKWIRE_NODE_DIR", &node)
        .output()
        .expect("tail");
    sigterm(&child);
    exits_within(&mut child, Duration::from_secs(30));
    assert!(
        ring.exists(),
        "serve wrote its rings under $TICKWIRE_NODE_DIR"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        3,
        "tail read them there: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tail_refuses_a_missing_or_corrupt_symbology_file_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let (ok, _, err) = tail(dir.path(), &["--count", "3"]);
    assert!(ok, "{err}");
    server.terminate();
    let symbology = dir.path().join("node").join("symbology");
    std::fs::write(&symbology, b"garbage that is no symbology table").expect("corrupt");
    let (ok, _, err) = tail(dir.path(), &["--count", "3", "--start", "earliest"]);
    assert!(!ok);
    assert!(
        err.contains("symbology") && err.contains("bytes"),
        "names the file and what is wrong: {err}"
    );
    let (ok, _, err) = tail(dir.path(), &["--symbol", "AAPL", "--count", "1"]);
    assert!(!ok);
    assert!(
        err.contains("symbology") && !err.contains("missing"),
        "a corrupt file is not called missing: {err}"
    );
    std::fs::remove_file(&symbology).expect("rm");
    let (ok, _, err) = tail(dir.path(), &["--count", "3", "--start", "earliest"]);
    assert!(!ok);
    assert!(
        err.contains("symbology") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn tail_says_what_it_waits_for_and_matches_names_ignoring_case() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let (ok, out, err) = tail(
        dir.path(),
        &["--exchange", "nasdaq", "--count", "3", "--json"],
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 3);
    assert!(out.lines().all(|l| l.contains("\"NASDAQ\"")), "{out}");
    let quick = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args(["tail", TOPIC, "--node-dir"])
            .arg(dir.path().join("node"))
            .args(extra)
            .args(["--idle-timeout", "1"])
            .output()
            .expect("tail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = quick(&["--symbol", "NOPE"]);
    assert!(err.contains("none of the") && err.contains("NOPE"), "{err}");
    let err = quick(&["--start", "999999999"]);
    assert!(err.contains("waiting for sequence 999999999"), "{err}");
    server.terminate();
    let err = quick(&[]);
    assert!(err.contains("no writer is running"), "{err}");
}

#[test]
fn restarts_are_logged_and_the_synthetic_feed_never_repeats_a_source_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = |out: &str| -> Vec<(u64, u64)> {
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["source_id"].as_u64()?, v["source_seq"].as_u64()?)))
            .collect()
    };
    let server = Server::start(dir.path());
    let (ok, out, err) = tail(dir.path(), &["--json", "--count", "50"]);
    assert!(ok, "{err}");
    let first = keys(&out);
    let (_, log) = server.terminate();
    assert!(
        log.contains("ring=\"created\"") || log.contains("ring=created"),
        "{log}"
    );
    let server = Server::start(dir.path());
    let (ok, out, err) = tail(dir.path(), &["--json", "--count", "50"]);
    assert!(ok, "{err}");
    let second = keys(&out);
    let (_, log) = server.terminate();
    assert!(
        (log.contains("ring=\"resumed\"") || log.contains("ring=resumed"))
            && log.contains("epoch=2"),
        "{log}"
    );
    assert_eq!((first.len(), second.len()), (50, 50));
    assert!(
        first
            .iter()
            .chain(&second)
            .all(|&(id, _)| id != 0 && id == first[0].0),
        "one non-zero source id: {first:?}"
    );
    let before = first.iter().map(|k| k.1).max().unwrap_or(0);
    assert!(
        second.iter().all(|k| k.1 > before),
        "source_seq after the restart starts above the last run's"
    );
}

#[test]
fn tail_follows_a_broker_restarted_on_a_new_node_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let mut tail = Command::new(BIN)
        .args([
            "tail",
            TOPIC,
            "--json",
            "--idle-timeout",
            "60",
            "--node-dir",
        ])
        .arg(dir.path().join("node"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tail");
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = tail.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    let wait_for = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(v) = rx.recv_timeout(Duration::from_millis(200))
                && pred(&v)
            {
                return v;
            }
        }
        panic!("tail never printed {what}");
    };
    wait_for("a tick", &|v| v["type"] == "tick");
    server.terminate();
    wait_for("the end of the stream", &|v| {
        v["type"] == "closed" && v["reason"] == "end_of_stream"
    });
    std::fs::remove_dir_all(dir.path().join("node")).expect("rm node dir");
    let server = Server::start(dir.path());
    wait_for("that the ring was replaced", &|v| v["type"] == "replaced");
    let first = wait_for("a tick from the new broker", &|v| v["type"] == "tick");
    assert!(
        first["sequence"].as_u64().is_some_and(|s| s < 100_000),
        "read from the new rings' start: {first}"
    );
    let _ = tail.kill();
    let _ = tail.wait();
    server.terminate();
}

#[test]
fn a_reader_in_another_account_reads_through_the_group_and_is_told_what_access_it_lacks() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let chmod = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    chmod(dir.path(), 0o755);
    // The binary where `nobody` may run it.
    let bin = dir.path().join("tickwire");
    std::fs::copy(BIN, &bin).expect("copy binary");
    chmod(&bin, 0o755);
    // Data readable by the group; reader state not writable by it: readers
    // in the group read untethered, without a reader slot.
    let server = Server::start_with(dir.path(), "group = \"nogroup\"\nreader_file_mode = 0o640");
    let as_nobody = || {
        let out = Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(&bin)
            .args([
                "tail",
                TOPIC,
                "--json",
                "--count",
                "3",
                "--idle-timeout",
                "30",
                "--node-dir",
            ])
            .arg(dir.path().join("node"))
            .output()
            .expect("runuser (util-linux; this test runs as root)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = as_nobody();
    assert!(ok, "a reader in the group reads: {err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    // Take the group's read access away from one ring: the error names the
    // file, its mode and group, and who the reader is.
    let ring = dir
        .path()
        .join("node")
        .join("market-data~normalized~equities.0.ring");
    chmod(&ring, 0o600);
    let (ok, _, err) = as_nobody();
    assert!(!ok);
    assert!(
        err.contains("permission denied")
            && err.contains("equities.0.ring")
            && err.contains("mode 0600")
            && err.contains("uid 65534"),
        "{err}"
    );
    server.terminate();
}

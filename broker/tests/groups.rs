//! Subscription groups with real consumer processes (`tickwire consume`),
//! over gRPC and over shared memory (`--shm`: a member reading the rings,
//! coordinated through the broker's control socket), killed with SIGKILL
//! where the test says so: the broker sees a connection drop and, over
//! shared memory, the member's liveness locks go, as on a crash.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tickwire_api::{Edge, EdgeConfig};
use tickwire_broker::config::{Config, TopicConfig};
use tickwire_broker::edge::BrokerEngine;
use tickwire_broker::engine::{Broker, Ingest};
use tickwire_proto::FrameBody;
use tickwire_proto::symbology::Instrument;
use tokio_util::sync::CancellationToken;

#[path = "../../api/tests/support/http.rs"]
mod http;
#[path = "support/serve_config.rs"]
mod serve_config;

const BIN: &str = env!("CARGO_BIN_EXE_tickwire");
const TOPIC: &str = "md/groups";
const KEYS: u64 = 16;

/// How a consumer reaches the group.
#[derive(Debug, Clone)]
enum Via {
    Grpc(SocketAddr),
    Shm(PathBuf),
}

/// A broker and its edge on a node directory.
struct Node {
    node_dir: PathBuf,
    broker: Option<Broker>,
    edge: Option<Edge>,
    cancel: CancellationToken,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Node {
    async fn start(dir: &Path, partitions: u32) -> Node {
        if std::env::var_os("TICKWIRE_TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_writer(std::io::stderr)
                .try_init();
        }
        let mut c = Config::default();
        c.node.dir = Some(dir.join("node"));
        c.journal.dir = Some(dir.join("journal"));
        c.synthetic.enabled = false;
        // Rings of 1024: a group that falls behind reads the journal.
        c.topics = vec![TopicConfig {
            name: TOPIC.into(),
            partitions,
            capacity: 1024,
            ..TopicConfig::default()
        }];
        let broker = Broker::start(&c).expect("broker");
        let engine = Arc::new(BrokerEngine::new(&broker));
        let cancel = CancellationToken::new();
        let edge = Edge::start(
            EdgeConfig {
                grpc_addr: "127.0.0.1:0".parse().expect("addr"),
                http_addr: "127.0.0.1:0".parse().expect("addr"),
                store_url: format!("sqlite://{}", dir.join("store.db").display()),
                ..EdgeConfig::default()
            },
            engine,
            cancel.clone(),
        )
        .await
        .expect("edge");
        Node {
            node_dir: dir.join("node"),
            grpc: edge.grpc_addr,
            http: edge.http_addr,
            broker: Some(broker),
            edge: Some(edge),
            cancel,
        }
    }

    /// Over shared memory, or gRPC.
    fn via(&self, shm: bool) -> Via {
        if shm {
            Via::Shm(self.node_dir.clone())
        } else {
            Via::Grpc(self.grpc)
        }
    }

    fn ingest(&self) -> Ingest {
        self.broker.as_ref().expect("running").ingest(1)
    }

    async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(e) = self.edge.take() {
            e.join().await;
        }
        if let Some(b) = self.broker.take() {
            tokio::task::spawn_blocking(move || b.shutdown())
                .await
                .expect("shutdown");
        }
    }

    /// The subscription's stats from REST.
    async fn stats(&self, name: &str) -> serde_json::Value {
        let url = format!(
            "http://{}/api/v1/subscriptions/{}/{name}",
            self.http,
            TOPIC.replace('/', "%2F")
        );
        http::Client.get(&url).await.1
    }
}

/// Sends trades `from..=to` (source sequence `i`) over [`KEYS`]
/// instruments, about `rate` per second.
fn send(ingest: &mut Ingest, from: u64, to: u64, rate: u64) {
    let t = ingest.resolver().topic(TOPIC).expect("routable");
    let routes: Vec<_> = (0..KEYS)
        .map(|k| {
            ingest
                .resolver()
                .route(
                    t,
                    &Instrument {
                        symbol: format!("K{k}"),
                        exchange: "XNAS".into(),
                        currency: "USD".into(),
                        size_decimals: 0,
                    },
                )
                .expect("route")
        })
        .collect();
    let started = Instant::now();
    for i in from..=to {
        let mut body = FrameBody::trade(0, 1_800_000_000_000_000_000 + i, 1_000_000_000, 1);
        body.source_seq = i;
        while ingest
            .try_send(&routes[(i % KEYS) as usize], &body, None)
            .is_err()
        {
            std::thread::yield_now();
        }
        let due = started + Duration::from_secs_f64((i - from) as f64 / rate as f64);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
}

/// One event a consumer printed.
#[derive(Debug, Clone)]
struct Got {
    partition: u32,
    seq: u64,
    symbol: String,
    redelivery: u64,
    source_seq: u64,
}

/// A `tickwire consume` process and what it printed.
struct Consumer {
    name: String,
    child: Child,
    got: Arc<Mutex<Vec<Got>>>,
    err: Arc<Mutex<String>>,
}

impl Consumer {
    fn spawn(via: Via, name: &str, args: &[&str]) -> Consumer {
        Consumer::spawn_on(TOPIC, via, name, args)
    }

    fn spawn_on(topic: &str, via: Via, name: &str, args: &[&str]) -> Consumer {
        let mut cmd = Command::new(BIN);
        cmd.args(["consume", "--topic", topic]);
        match via {
            Via::Grpc(a) => cmd.arg("--connect").arg(format!("http://{a}")),
            Via::Shm(d) => cmd.arg("--shm").arg("--node-dir").arg(d),
        };
        let mut child = cmd
            .args(["--consumer", name])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tickwire consume");
        let got = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let (out, e) = (
            child.stdout.take().expect("out"),
            child.stderr.take().expect("err"),
        );
        let g = got.clone();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(out);
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                // A process killed in the middle of a line leaves half of
                // it, never acknowledged: not something it received.
                let Some(line) = line.strip_suffix('\n') else {
                    return;
                };
                let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
                if v.get("gap").is_some() {
                    panic!("a group over the journal loses nothing: {line}");
                }
                let id = v["event_id"].as_str().expect("event_id");
                g.lock().expect("lock").push(Got {
                    partition: v["partition"].as_u64().expect("p") as u32,
                    seq: v["sequence"].as_u64().expect("seq"),
                    symbol: v["symbol"].as_str().expect("symbol").into(),
                    redelivery: v["redelivery_count"].as_u64().expect("count"),
                    source_seq: id
                        .rsplit('-')
                        .next()
                        .and_then(|s| s.parse().ok())
                        .expect("source seq"),
                });
            }
        });
        let er = err.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(e).lines() {
                let Ok(line) = line else { return };
                er.lock().expect("lock").push_str(&(line + "\n"));
            }
        });
        Consumer {
            name: name.into(),
            child,
            got,
            err,
        }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().expect("lock").clone()
    }

    fn count(&self) -> usize {
        self.got.lock().expect("lock").len()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for it to exit; its stderr.
    fn exit(&mut self, within: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                std::thread::sleep(Duration::from_millis(50));
                return (s.code(), self.err.lock().expect("lock").clone());
            }
            if Instant::now() > deadline {
                self.kill();
                return (None, self.err.lock().expect("lock").clone());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the consumers together received every source sequence
/// `1..=n`; returns how many receptions each source sequence had.
fn await_all(consumers: &[&Consumer], n: u64, within: Duration) -> HashMap<u64, usize> {
    let deadline = Instant::now() + within;
    loop {
        let mut times: HashMap<u64, usize> = HashMap::new();
        for c in consumers {
            for g in c.got() {
                *times.entry(g.source_seq).or_default() += 1;
            }
        }
        if (1..=n).all(|s| times.contains_key(&s)) {
            return times;
        }
        if Instant::now() > deadline {
            let missing: Vec<u64> = (1..=n)
                .filter(|s| !times.contains_key(s))
                .take(20)
                .collect();
            let counts: Vec<(String, usize)> = consumers
                .iter()
                .map(|c| (c.name.clone(), c.count()))
                .collect();
            let errs: Vec<String> = consumers
                .iter()
                .map(|c| c.err.lock().expect("lock").clone())
                .collect();
            // Who had the missing events' neighbours of the same key.
            let near: Vec<String> = missing.first().map_or(Vec::new(), |&m| {
                consumers
                    .iter()
                    .flat_map(|c| {
                        c.got()
                            .into_iter()
                            .filter(move |g| {
                                g.source_seq % KEYS == m % KEYS
                                    && g.source_seq + 160 >= m
                                    && g.source_seq <= m + 160
                            })
                            .map(move |g| {
                                format!(
                                    "{}:{}:{}:{}r{}",
                                    c.name, g.source_seq, g.partition, g.seq, g.redelivery
                                )
                            })
                    })
                    .collect()
            });
            panic!(
                "{} of {n} events arrived; missing {missing:?}..; near the first {near:?}; per consumer {counts:?}; stderr {errs:?}",
                times.len()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the group's stats say `f`.
async fn await_stats(
    node: &Node,
    name: &str,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = node.stats(name).await;
        if f(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Events the group's cursors are past, over all partitions.
fn cursor_sum(s: &serde_json::Value) -> u64 {
    s["cursors"].as_array().map_or(0, |c| {
        c.iter()
            .map(|c| c["next_sequence"].as_u64().unwrap_or(1).saturating_sub(1))
            .sum()
    })
}

async fn wait_members(node: &Node, name: &str, n: usize) {
    await_stats(node, name, &format!("{n} consumers"), |s| {
        s["consumers"].as_array().map_or(0, Vec::len) == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_shared_group_of_four_acks_each_event_once_and_a_killed_member_loses_nothing() {
    shared_group_of_four_acks_each_event_once_and_a_killed_member_loses_nothing(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_shared_group_of_four_acks_each_event_once_and_a_killed_member_loses_nothing() {
    shared_group_of_four_acks_each_event_once_and_a_killed_member_loses_nothing(true).await;
}

async fn shared_group_of_four_acks_each_event_once_and_a_killed_member_loses_nothing(shm: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start(dir.path(), 4).await;
    let args = [
        "--subscription",
        "sh",
        "--type",
        "shared",
        "--queue",
        "200",
        "--ack-timeout",
        "5s",
    ];
    let mut members: Vec<Consumer> = (0..4)
        .map(|i| Consumer::spawn(node.via(shm), &format!("m{i}"), &args))
        .collect();
    wait_members(&node, "sh", 4).await;
    let n = 40_000u64;
    let mut ingest = node.ingest();
    let sender = std::thread::spawn(move || send(&mut ingest, 1, n, 20_000));
    // SIGKILL one member once it is in the middle of the stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    while members[0].count() < 2_000 {
        assert!(
            Instant::now() < deadline,
            "member 0 got {}",
            members[0].count()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    members[0].kill();
    let killed_got = members[0].count();
    sender.join().expect("sender");
    let alive: Vec<&Consumer> = members.iter().collect();
    let times = await_all(&alive, n, Duration::from_secs(60));
    // Each event acknowledged exactly once overall, the cursor at the end.
    // (Over shared memory the broker sees cursors, not each ack.)
    // Over shared memory the members report their own counts (every
    // 100 ms): the killed one's last acknowledgements may not have reached
    // the broker.
    let s = await_stats(&node, "sh", "all acknowledged", |s| {
        let acked = s["acked"].as_u64().unwrap_or(0);
        cursor_sum(s) == n
            && s["unacked"].as_u64() == Some(0)
            && if shm { acked >= n - 2_000 } else { acked == n }
    })
    .await;
    for c in s["consumers"].as_array().expect("consumers") {
        assert!(
            c["delivered"].as_u64() > Some(1_000) && c["acked"] == c["delivered"],
            "each member's own counts: {c}"
        );
    }
    assert_eq!(cursor_sum(&s), n, "cursors past every event: {s}");
    // Duplicates only where the killed member held events unacknowledged,
    // and marked as redeliveries.
    let dups: u64 = times.values().map(|&t| (t - 1) as u64).sum();
    let redelivered: u64 = members[1..]
        .iter()
        .flat_map(|c| c.got())
        .filter(|g| g.redelivery > 0)
        .count() as u64;
    assert!(
        redelivered >= dups,
        "{dups} duplicates, {redelivered} marked redelivered"
    );
    assert!(
        dups <= 200 + 256,
        "at most the killed member's window: {dups}"
    );
    for (i, c) in members[1..].iter().enumerate() {
        assert!(
            c.count() > 1_000,
            "member {} shared the load: {}",
            i + 1,
            c.count()
        );
    }
    eprintln!("shared: killed member had {killed_got}; {dups} duplicates; stats {s}");
    drop(members);
    node.stop().await;
}

/// A member that leaves cleanly tells the broker its last counts: the
/// subscription's stats show every acknowledgement it made, not only those
/// up to its last periodic report (every 100 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_a_member_that_leaves_cleanly_reports_its_last_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start(dir.path(), 2).await;
    let mut one = Consumer::spawn(
        node.via(true),
        "one",
        &[
            "--subscription",
            "fin",
            "--type",
            "exclusive",
            "--count",
            "500",
        ],
    );
    wait_members(&node, "fin", 1).await;
    let mut ingest = node.ingest();
    send(&mut ingest, 1, 500, 50_000);
    let (code, err) = one.exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(one.count(), 500);
    let s = await_stats(&node, "fin", "the member's last counts", |s| {
        s["acked"].as_u64() == Some(500)
    })
    .await;
    assert_eq!(s["delivered"].as_u64(), Some(500), "{s}");
    assert_eq!(s["unacked"].as_u64(), Some(0), "{s}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_failover_standby_takes_over_from_the_acked_cursor_when_the_active_member_is_killed() {
    failover_standby_takes_over_from_the_acked_cursor_when_the_active_member_is_killed(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_failover_standby_takes_over_from_the_acked_cursor_when_the_active_member_is_killed() {
    failover_standby_takes_over_from_the_acked_cursor_when_the_active_member_is_killed(true).await;
}

async fn failover_standby_takes_over_from_the_acked_cursor_when_the_active_member_is_killed(
    shm: bool,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start(dir.path(), 1).await;
    let base = [
        "--subscription",
        "fo",
        "--type",
        "failover",
        "--queue",
        "100",
    ];
    let mut active = Consumer::spawn(
        node.via(shm),
        "a",
        &[&base[..], &["--priority", "0"]].concat(),
    );
    wait_members(&node, "fo", 1).await;
    let standby = Consumer::spawn(
        node.via(shm),
        "b",
        &[&base[..], &["--priority", "1"]].concat(),
    );
    wait_members(&node, "fo", 2).await;
    let n = 20_000u64;
    let mut ingest = node.ingest();
    let sender = std::thread::spawn(move || send(&mut ingest, 1, n, 10_000));
    let deadline = Instant::now() + Duration::from_secs(30);
    while active.count() < 5_000 {
        assert!(Instant::now() < deadline, "active got {}", active.count());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        standby.count(),
        0,
        "a standby gets nothing while the active member lives"
    );
    active.kill();
    sender.join().expect("sender");
    let times = await_all(&[&active, &standby], n, Duration::from_secs(60));
    // The standby starts at the acknowledged cursor: what the active one
    // printed but had not acked yet comes again, marked, and in order.
    let got = standby.got();
    let first = got.first().expect("standby got events").seq;
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq), "in order");
    let a_last = active.got().last().expect("active got events").seq;
    assert!(
        first <= a_last + 1,
        "no gap: standby starts at {first}, active printed up to {a_last}"
    );
    let dups: usize = times.values().map(|t| t - 1).sum();
    assert_eq!(
        dups as u64,
        a_last + 1 - first,
        "duplicates are exactly the unacked tail"
    );
    assert!(
        got.iter().take(dups).all(|g| g.redelivery > 0),
        "the tail is marked redelivered"
    );
    drop((active, standby));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_exclusive_refuses_a_second_consumer_and_a_key_shared_member_that_never_acks_is_removed()
 {
    exclusive_refuses_a_second_consumer_and_a_key_shared_member_that_never_acks_is_removed(false)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_exclusive_refuses_a_second_consumer_and_a_key_shared_member_that_never_acks_is_removed()
 {
    exclusive_refuses_a_second_consumer_and_a_key_shared_member_that_never_acks_is_removed(true)
        .await;
}

async fn exclusive_refuses_a_second_consumer_and_a_key_shared_member_that_never_acks_is_removed(
    shm: bool,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start(dir.path(), 2).await;
    let first = Consumer::spawn(
        node.via(shm),
        "one",
        &["--subscription", "ex", "--type", "exclusive"],
    );
    wait_members(&node, "ex", 1).await;
    let mut second = Consumer::spawn(
        node.via(shm),
        "two",
        &["--subscription", "ex", "--type", "exclusive"],
    );
    let (code, err) = second.exit(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("Exclusive") && err.contains("\"one\""),
        "{err}"
    );
    // A different type on the same subscription is refused too.
    let mut other = Consumer::spawn(
        node.via(shm),
        "three",
        &["--subscription", "ex", "--type", "shared"],
    );
    let (code, err) = other.exit(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("this consumer asked for"), "{err}");
    // So is another dead-letter limit: a group has one.
    let mut other = Consumer::spawn(
        node.via(shm),
        "four",
        &[
            "--subscription",
            "ex",
            "--type",
            "exclusive",
            "--max-redeliveries",
            "3",
        ],
    );
    let (code, err) = other.exit(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("dead-letters an event after") && err.contains("asked for 3"),
        "{err}"
    );
    drop(first);

    // Key_Shared: a member that never acks is removed after its timeout and
    // the keys it held reach the other member, in order.
    let good = Consumer::spawn(
        node.via(shm),
        "good",
        &["--subscription", "ks", "--type", "key_shared"],
    );
    let mut stuck = Consumer::spawn(
        node.via(shm),
        "stuck",
        &[
            "--subscription",
            "ks",
            "--type",
            "key_shared",
            "--no-ack",
            "--ack-timeout",
            "1s",
        ],
    );
    wait_members(&node, "ks", 2).await;
    let n = 5_000u64;
    let mut ingest = node.ingest();
    std::thread::spawn(move || send(&mut ingest, 1, n, 20_000))
        .join()
        .expect("sender");
    let (code, err) = stuck.exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("not acknowledged within the ack timeout"),
        "{err}"
    );
    let stuck_got = stuck.count();
    assert!(stuck_got > 0, "the stuck member had keys");
    let times = await_all(&[&good], n, Duration::from_secs(30));
    assert_eq!(times.len() as u64, n);
    let mut last: HashMap<(String, u32), u64> = HashMap::new();
    for g in good.got() {
        let k = (g.symbol.clone(), g.partition);
        if let Some(&prev) = last.get(&k) {
            assert!(g.seq > prev, "key {k:?} in order: {} after {prev}", g.seq);
        }
        last.insert(k, g.seq);
    }
    drop(good);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_key_shared_under_churn_keeps_keys_in_order_loses_nothing_and_never_stalls() {
    key_shared_under_churn_keeps_keys_in_order_loses_nothing_and_never_stalls(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_key_shared_under_churn_keeps_keys_in_order_loses_nothing_and_never_stalls() {
    key_shared_under_churn_keeps_keys_in_order_loses_nothing_and_never_stalls(true).await;
}

async fn key_shared_under_churn_keeps_keys_in_order_loses_nothing_and_never_stalls(shm: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start(dir.path(), 4).await;
    let args = [
        "--subscription",
        "kc",
        "--type",
        "key_shared",
        "--queue",
        "100",
        "--ack-timeout",
        "3s",
    ];
    let mut members: Vec<Consumer> = (0..3)
        .map(|i| Consumer::spawn(node.via(shm), &format!("s{i}"), &args))
        .collect();
    wait_members(&node, "kc", 3).await;
    let churn_for = Duration::from_secs(30);
    let rate = 5_000u64;
    let n = rate * churn_for.as_secs();
    let mut ingest = node.ingest();
    let sender = std::thread::spawn(move || send(&mut ingest, 1, n, rate));
    // Every 100 ms a member joins, leaves (killed), or both, keeping 2 to 6.
    let started = Instant::now();
    let mut next = 3;
    let mut progress: Vec<u64> = Vec::new();
    let mut last_second = Instant::now();
    let mut gone: Vec<Consumer> = Vec::new();
    let mut step = 0u64;
    while started.elapsed() < churn_for {
        tokio::time::sleep(Duration::from_millis(100)).await;
        step += 1;
        let r = step.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60;
        if (r.is_multiple_of(2) && members.len() < 6) || members.len() < 3 {
            members.push(Consumer::spawn(node.via(shm), &format!("c{next}"), &args));
            next += 1;
        } else {
            let i = (r as usize) % members.len();
            let mut m = members.remove(i);
            m.kill();
            gone.push(m);
        }
        if last_second.elapsed() >= Duration::from_secs(1) {
            // Events the members received so far (the killed ones too).
            let got: usize = members.iter().chain(gone.iter()).map(Consumer::count).sum();
            progress.push(got as u64);
            last_second = Instant::now();
        }
    }
    sender.join().expect("sender");
    let all: Vec<&Consumer> = members.iter().chain(gone.iter()).collect();
    await_all(&all, n, Duration::from_secs(60));
    // Progress in every second of the churn.
    for w in progress.windows(2) {
        assert!(
            w[1] > w[0],
            "the group stalled for a second: received {progress:?}"
        );
    }
    // Per key, each member's first deliveries in order.
    for c in &all {
        let mut last: HashMap<(String, u32), u64> = HashMap::new();
        for g in c.got().iter().filter(|g| g.redelivery == 0) {
            let k = (g.symbol.clone(), g.partition);
            if let Some(&prev) = last.get(&k) {
                assert!(
                    g.seq > prev,
                    "{}: key {k:?} out of order: {} after {prev}",
                    c.name,
                    g.seq
                );
            }
            last.insert(k, g.seq);
        }
    }
    // A key's first deliveries never overtake an earlier event of the key.
    let mut by_key: BTreeMap<(String, u32), Vec<u64>> = BTreeMap::new();
    for c in &all {
        for g in c.got().iter().filter(|g| g.redelivery == 0) {
            by_key
                .entry((g.symbol.clone(), g.partition))
                .or_default()
                .push(g.seq);
        }
    }
    for (k, seqs) in &by_key {
        let set: HashSet<u64> = seqs.iter().copied().collect();
        let mut seen = HashSet::new();
        let twice: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| !seen.insert(*s))
            .take(5)
            .collect();
        let who: Vec<String> = all
            .iter()
            .flat_map(|c| {
                c.got()
                    .into_iter()
                    .filter(|g| {
                        (g.symbol.clone(), g.partition) == *k
                            && twice
                                .first()
                                .is_some_and(|t| g.seq + 40 >= *t && g.seq <= t + 40)
                    })
                    .map(|g| format!("{}:{}r{}", c.name, g.seq, g.redelivery))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            set.len(),
            seqs.len(),
            "{k:?}: an event first-delivered twice: {twice:?}; near it {who:?}"
        );
    }
    let s = await_stats(&node, "kc", "everything acknowledged", |s| {
        cursor_sum(s) == n
            && (shm || (s["acked"].as_u64() >= Some(n) && s["unacked"].as_u64() == Some(0)))
    })
    .await;
    eprintln!(
        "key_shared churn: {} members came and went; received by second {progress:?}; {s}",
        next
    );
    drop(members);
    drop(gone);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_durable_cursor_survives_a_reboot_and_dead_letters_after_max_redeliveries() {
    durable_cursor_survives_a_reboot_and_dead_letters_after_max_redeliveries(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_durable_cursor_survives_a_reboot_and_dead_letters_after_max_redeliveries() {
    durable_cursor_survives_a_reboot_and_dead_letters_after_max_redeliveries(true).await;
}

async fn durable_cursor_survives_a_reboot_and_dead_letters_after_max_redeliveries(shm: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start(dir.path(), 2).await;
    let args = ["--subscription", "du", "--type", "shared"];
    let mut first = Consumer::spawn(
        node.via(shm),
        "a",
        &[&args[..], &["--count", "3000"]].concat(),
    );
    wait_members(&node, "du", 1).await;
    let mut ingest = node.ingest();
    std::thread::spawn(move || send(&mut ingest, 1, 10_000, 50_000))
        .join()
        .expect("sender");
    let (code, err) = first.exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    let had: HashSet<u64> = first.got().iter().map(|g| g.source_seq).collect();
    assert_eq!(had.len(), 3000);
    // The group stops a few seconds after its last member, writing its
    // cursors; the broker stops too, and the machine reboots: the node
    // directory (rings, reader slots, symbology) is emptied, as a tmpfs
    // is, while the journal and the store stay on disk.
    node.stop().await;
    std::fs::remove_dir_all(dir.path().join("node")).expect("empty the node directory");
    let mut node = Node::start(dir.path(), 2).await;
    let mut ingest = node.ingest();
    std::thread::spawn(move || send(&mut ingest, 10_001, 12_000, 50_000))
        .join()
        .expect("sender");
    let second = Consumer::spawn(node.via(shm), "b", &args);
    let times = await_all(&[&first, &second], 12_000, Duration::from_secs(60));
    let again: Vec<u64> = second
        .got()
        .iter()
        .map(|g| g.source_seq)
        .filter(|s| had.contains(s))
        .collect();
    assert!(
        again.is_empty(),
        "resumed after the acknowledged cursor, not at Latest or Earliest: {} again",
        again.len()
    );
    assert_eq!(times.values().filter(|&&t| t > 1).count(), 0);
    drop(second);

    // Dead letters: members that never ack, at most 2 redeliveries.
    let dl_args = [
        "--subscription",
        "dl",
        "--type",
        "shared",
        "--no-ack",
        "--ack-timeout",
        "200ms",
        "--max-redeliveries",
        "2",
    ];
    let mut stuck = Consumer::spawn(node.via(shm), "dl", &dl_args);
    wait_members(&node, "dl", 1).await;
    let mut ingest = node.ingest();
    std::thread::spawn(move || send(&mut ingest, 12_001, 12_010, 1_000))
        .join()
        .expect("sender");
    let mut got = Vec::new();
    if shm {
        // Over shared memory a member that does not ack in time is removed
        // (its process exits): the next member gets what it held again.
        for i in 1..=3 {
            let (code, err) = stuck.exit(Duration::from_secs(30));
            assert_eq!(code, Some(1), "{err}");
            assert!(
                err.contains("not acknowledged within the ack timeout"),
                "{err}"
            );
            got.extend(stuck.got());
            if i < 3 {
                stuck = Consumer::spawn(node.via(shm), &format!("dl{i}"), &dl_args);
            }
        }
    }
    let s = await_stats(&node, "dl", "ten dead letters", |s| {
        s["dead_lettered"].as_u64() == Some(10)
    })
    .await;
    assert_eq!(s["unacked"].as_u64(), Some(0), "{s}");
    if !shm {
        got = stuck.got();
    }
    assert_eq!(got.len(), 30, "each sent three times: {got:?}");
    assert_eq!(got.iter().filter(|g| g.redelivery == 2).count(), 10);
    let url = format!(
        "http://{}/api/v1/subscriptions/{}/dl/dead-letters",
        node.http,
        TOPIC.replace('/', "%2F")
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (code, body) = http::Client.get(&url).await;
        assert_eq!(code, 200, "{body}");
        if body["count"].as_u64() == Some(10) || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["count"].as_u64(), Some(10), "{body}");
    let d = &body["dead_letters"][0];
    assert_eq!(d["deliveries"].as_u64(), Some(3), "{d}");
    assert!(
        d["reason"]
            .as_str()
            .expect("reason")
            .contains("not acknowledged after 3 deliveries"),
        "{d}"
    );
    assert!(
        d["event"]["data"]["symbol"]
            .as_str()
            .is_some_and(|s| s.starts_with('K')),
        "{d}"
    );
    // The same events are on the subscription's dead-letter topic, each
    // once, with their source sequences: any consumer can read them there.
    let dlq = tickwire_api::group::dead_letter_topic(TOPIC, "dl");
    assert_eq!(dlq, format!("{TOPIC}-dl-DLQ"));
    let mut seqs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut reader = None;
    while seqs.len() < 10 && Instant::now() < deadline {
        if reader.is_none() {
            // The topic is made by the first dead letter.
            reader = shm_client::Subscriber::builder(dlq.clone())
                .node_dir(&node.node_dir)
                .start(shm_client::Start::Earliest)
                .open()
                .ok();
        }
        if let Some(r) = reader.as_mut() {
            source_seqs(r, &mut seqs);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing more comes (a duplicate would).
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Some(r) = reader.as_mut() {
        source_seqs(r, &mut seqs);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (12_001..=12_010).collect::<Vec<u64>>());
    stuck.kill();
    node.stop().await;
}

/// The source sequences of what `r` has now.
fn source_seqs(r: &mut shm_client::Subscriber, out: &mut Vec<u64>) {
    r.poll(1024, |e| {
        if let shm_client::Event::Tick(t) = e {
            out.push(t.body.source_seq());
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_a_cursor_reset_moves_the_group_to_earliest_then_latest() {
    a_cursor_reset_moves_the_group_to_earliest_then_latest(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_a_cursor_reset_moves_the_group_to_earliest_then_latest() {
    a_cursor_reset_moves_the_group_to_earliest_then_latest(true).await;
}

async fn a_cursor_reset_moves_the_group_to_earliest_then_latest(shm: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start(dir.path(), 2).await;
    let args = ["--subscription", "rs", "--type", "shared"];
    let reset_url = format!(
        "http://{}/api/v1/subscriptions/{}/rs/reset",
        node.http,
        TOPIC.replace('/', "%2F")
    );
    // Bad requests change nothing and say what was wrong.
    let (code, body) = http::Client.post(&reset_url, "{}").await;
    assert_eq!(code, 404, "no such subscription yet: {body}");
    let mut first = Consumer::spawn(
        node.via(shm),
        "a",
        &[&args[..], &["--count", "1000"]].concat(),
    );
    wait_members(&node, "rs", 1).await;
    let mut ingest = node.ingest();
    std::thread::spawn(move || send(&mut ingest, 1, 3_000, 50_000))
        .join()
        .expect("sender");
    let (code, err) = first.exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    let (code, body) = http::Client
        .post(&reset_url, r#"{"position":"yesterday"}"#)
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("position"), "{body}");
    let (code, body) = http::Client
        .post(
            &reset_url,
            r#"{"position":"message_id","message_ids":["0:x:5"]}"#,
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("message_ids[0]"), "{body}");

    // Back to the earliest event kept: a new consumer gets all 3000 again.
    let (code, body) = http::Client
        .post(&reset_url, r#"{"position":"earliest"}"#)
        .await;
    assert_eq!(code, 200, "{body}");
    let mut second = Consumer::spawn(node.via(shm), "b", &args);
    let times = await_all(&[&second], 3_000, Duration::from_secs(60));
    assert_eq!(times.len(), 3_000);

    // Forward to latest while it is attached: it is ended; the next one
    // gets only what comes after.
    let (code, body) = http::Client
        .post(&reset_url, r#"{"position":"latest"}"#)
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, err) = second.exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("was reset"), "{err}");
    let third = Consumer::spawn(node.via(shm), "c", &args);
    wait_members(&node, "rs", 1).await;
    let mut ingest = node.ingest();
    std::thread::spawn(move || send(&mut ingest, 3_001, 3_500, 50_000))
        .join()
        .expect("sender");
    let deadline = Instant::now() + Duration::from_secs(30);
    while third.count() < 500 {
        assert!(Instant::now() < deadline, "third got {}", third.count());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got: Vec<u64> = third.got().iter().map(|g| g.source_seq).collect();
    assert!(
        got.iter().all(|&s| s > 3_000),
        "nothing from before the reset: {:?}",
        got.iter()
            .filter(|&&s| s <= 3_000)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(got.len(), 500);
    drop(third);
    node.stop().await;
}

/// `tickwire serve` on `<dir>/node` with the synthetic feed at 5,000
/// events/s, its edge on ports of its own; returned once its control
/// socket answers. Killed when dropped (a failing test leaves none).
fn serve_process(dir: &Path) -> ServeProcess {
    let cfg = serve_config::write(dir, "");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("serve");
    let socket = dir.join("node").join("control.sock");
    let start = Instant::now();
    // A socket left by a killed broker answers no one: wait for a live one.
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if start.elapsed() > Duration::from_secs(60) || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            panic!("the broker never opened its control socket");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ServeProcess(child)
}

struct ServeProcess(Child);

impl ServeProcess {
    /// SIGKILL, and reaped.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A broker killed with SIGKILL (no shutdown, no last cursor write) under
/// an at-least-once shm group: its member is told and ends; a broker
/// started again on the node resumes the group from its stored cursors, so
/// the next member gets every event the first did not acknowledge: per
/// partition, the two together hold every sequence from the first's first
/// to the second's last. What the first acknowledged in the last cursor
/// interval may come again (counted, the stated loss window is none).
#[test]
fn shm_group_after_a_broker_sigkill_resumes_from_its_cursors_losing_nothing() {
    const SYNTHETIC: &str = "market-data/normalized/equities";
    let dir = tempfile::tempdir().expect("tempdir");
    let node = dir.path().join("node");
    let args = ["--subscription", "k9", "--type", "shared"];
    let wait_for = |c: &Consumer, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while c.count() < n {
            assert!(
                Instant::now() < deadline,
                "{} got {} of {n}",
                c.name,
                c.count()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut broker = serve_process(dir.path());
    let mut a = Consumer::spawn_on(SYNTHETIC, Via::Shm(node.clone()), "a", &args);
    wait_for(&a, 3000);
    broker.kill();
    let (code, err) = a.exit(Duration::from_secs(15));
    assert_eq!(code, Some(1), "the member ends when its broker dies: {err}");
    assert!(err.contains("broker"), "and says why: {err}");
    let first = a.got();

    let mut broker = serve_process(dir.path());
    let mut b = Consumer::spawn_on(SYNTHETIC, Via::Shm(node.clone()), "b", &args);
    wait_for(&b, first.len() + 3000);
    b.kill();
    let second = b.got();
    broker.kill();

    let mut by_part: BTreeMap<u32, (u64, u64, HashSet<u64>)> = BTreeMap::new();
    for g in &first {
        let e = by_part
            .entry(g.partition)
            .or_insert((u64::MAX, 0, HashSet::new()));
        e.0 = e.0.min(g.seq);
        e.2.insert(g.seq);
    }
    let had: HashSet<(u32, u64)> = first.iter().map(|g| (g.partition, g.seq)).collect();
    let again = second
        .iter()
        .filter(|g| had.contains(&(g.partition, g.seq)))
        .count();
    for g in &second {
        if let Some(e) = by_part.get_mut(&g.partition) {
            e.1 = e.1.max(g.seq);
            e.2.insert(g.seq);
        }
    }
    for (p, (from, to, seen)) in &by_part {
        assert!(
            to > from,
            "partition {p}: the second member got nothing after {from}"
        );
        let missing: Vec<u64> = (*from..=*to).filter(|s| !seen.contains(s)).collect();
        assert!(
            missing.is_empty(),
            "partition {p}: {} sequences lost, first {:?} (again: {again})",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }
    assert!(
        again < first.len(),
        "resumed from the stored cursors, not from the start: {again} of {} again",
        first.len()
    );
}

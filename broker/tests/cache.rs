//! The spec's cache: its keys and TTLs in a real Redis (a private
//! `redis-server` this test starts: `scripts/services.sh up` installs it)
//! and in process; REST latest of a symbol another node holds, answered
//! from Redis; Redis stopped mid-run: ingest goes on, REST latest still
//! answers, and the cache recovers when Redis is back.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tickwire_api::{Edge, EdgeConfig};
use tickwire_broker::config::{Config, TopicConfig};
use tickwire_broker::edge::BrokerEngine;
use tickwire_broker::engine::{Broker, Ingest};
use tickwire_proto::FrameBody;
use tokio_util::sync::CancellationToken;

#[path = "../../api/tests/support/http.rs"]
mod http;
#[path = "support/routes.rs"]
mod support;

const TOPIC: &str = "md/cache";
const PX: i64 = 1_000_000_000;

/// A private Redis on a free port, stopped on drop.
struct Redis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut r = Redis {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        r.up();
        r
    }

    fn up(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server; scripts/services.sh up installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server listens");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to redis")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.down();
    }
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.node.dir = Some(dir.to_path_buf());
    c.synthetic.enabled = false;
    c.history.enabled = false;
    c.topics = vec![TopicConfig {
        name: TOPIC.into(),
        partitions: 1,
        capacity: 4096,
        ..TopicConfig::default()
    }];
    c
}

async fn edge(broker: &Broker, cache_url: &str, cancel: &CancellationToken) -> Edge {
    Edge::start(
        EdgeConfig {
            grpc_addr: "127.0.0.1:0".parse().expect("addr"),
            http_addr: "127.0.0.1:0".parse().expect("addr"),
            cache_url: cache_url.into(),
            cache_interval_ms: 100,
            metrics_interval_secs: 1,
            ..EdgeConfig::default()
        },
        std::sync::Arc::new(BrokerEngine::new(broker)),
        cancel.clone(),
    )
    .await
    .expect("edge")
}

fn trade(ingest: &mut Ingest, i: usize, px: i64) {
    let routes = support::routes(ingest, TOPIC, 3);
    let body = FrameBody::trade(0, tickwire_proto::futex::realtime_ns(), px, 10);
    while ingest.try_send(&routes[i], &body, None).is_err() {
        std::thread::yield_now();
    }
}

/// Waits until `f` is true (or fails with `what`).
async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn get(c: &mut redis::Connection, key: &str) -> Option<(serde_json::Value, i64)> {
    let v: Option<String> = redis::cmd("GET").arg(key).query(c).ok()?;
    let ttl: i64 = redis::cmd("PTTL").arg(key).query(c).ok()?;
    Some((serde_json::from_str(&v?).ok()?, ttl))
}

fn price(v: &serde_json::Value) -> String {
    v["data"]["price"].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_ttls_in_redis_a_remote_symbol_and_an_outage() {
    let mut redis = Redis::start();
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let cancel = CancellationToken::new();
    // Node A holds the symbols; node B has the topic but none of them.
    let a = Broker::start(&config(da.path())).expect("node a");
    let b = Broker::start(&config(db.path())).expect("node b");
    let mut ingest = a.ingest(1);
    for i in 0..3 {
        trade(&mut ingest, i, (100 + i as i64) * PX);
    }
    let ea = edge(&a, &redis.url(), &cancel).await;
    let eb = edge(&b, &redis.url(), &cancel).await;
    let (base_a, base_b) = (
        format!("http://{}", ea.http_addr),
        format!("http://{}", eb.http_addr),
    );
    // A routing rule and a subscription, for their keys.
    let (code, body) = http::Client
        .post(
            &format!("{base_a}/api/v1/routing-rules"),
            &format!(r#"{{"rule_name":"eq","source_pattern":"synthetic","target_topic":"{TOPIC}","priority":1}}"#),
        )
        .await;
    assert!(code == 200 || code == 201, "{code} {body}");
    let (code, sub) = http::Client
        .post(
            &format!("{base_a}/api/v1/subscriptions"),
            &format!(r#"{{"topic":"{TOPIC}","subscription":"watch"}}"#),
        )
        .await;
    assert!(code == 200 || code == 201, "{code} {sub}");
    let sub_id = sub["subscription_id"]
        .as_str()
        .or(sub["stats"]["subscription_id"].as_str())
        .expect("subscription id")
        .to_string();

    let mut c = redis.conn();
    until("latest:SYM0 in Redis", async || {
        get(&mut c, "latest:SYM0").is_some()
    })
    .await;
    let (v, ttl) = get(&mut c, "latest:SYM0").expect("latest");
    assert_eq!(v["symbol"], "SYM0");
    assert_eq!(price(&v), "100");
    assert!((50_000..=60_000).contains(&ttl), "latest TTL 1 min: {ttl}");
    until("every key", async || {
        get(&mut c, &format!("topic_stats:{TOPIC}")).is_some()
            && get(&mut c, &format!("backpressure:{TOPIC}:0")).is_some()
            && get(&mut c, "routing:synthetic").is_some()
            && get(&mut c, &format!("subscription:{sub_id}")).is_some()
    })
    .await;
    for (key, most) in [
        (format!("topic_stats:{TOPIC}"), 30_000),
        (format!("backpressure:{TOPIC}:0"), 10_000),
        ("routing:synthetic".to_string(), 900_000),
        (format!("subscription:{sub_id}"), 300_000),
    ] {
        let (v, ttl) = get(&mut c, &key).expect("key");
        assert!(
            // Rewritten once half gone (each 100 ms interval looks): a live
            // key never has less than half its TTL left, nor more than all.
            ttl > most / 2 - 1_000 && ttl <= most,
            "{key}: TTL {ttl} of {most}"
        );
        assert!(!v.is_null(), "{key}");
    }
    let (bp, _) = get(&mut c, &format!("backpressure:{TOPIC}:0")).expect("bp");
    assert_eq!(bp["backlog"], 0, "{bp}");

    // Node B answers SYM0 from Redis; a symbol nobody has is a 404.
    let (code, v) = http::Client
        .get(&format!(
            "{base_b}/api/v1/market-data/SYM0/latest?topic=md%2Fcache"
        ))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (v["cache"].as_str(), price(&v)),
        (Some("redis"), "100".to_string())
    );
    let (code, _) = http::Client
        .get(&format!(
            "{base_b}/api/v1/market-data/SYM0/latest?topic=md%2Fcache&exchange=XLON"
        ))
        .await;
    assert_eq!(code, 404, "another venue than the cached one");
    let (code, _) = http::Client
        .get(&format!(
            "{base_b}/api/v1/market-data/NONE/latest?topic=md%2Fcache"
        ))
        .await;
    assert_eq!(code, 404);
    // Whatever else sits under a latest key is no answer: 404, not a 500
    // nor the foreign text passed on.
    for junk in ["not json", "[1,2]", r#"{"data":{"price":1}}"#] {
        let _: () = redis::cmd("SET")
            .arg("latest:JUNK")
            .arg(junk)
            .query(&mut c)
            .expect("set junk");
        let (code, v) = http::Client
            .get(&format!(
                "{base_b}/api/v1/market-data/JUNK/latest?topic=md%2Fcache"
            ))
            .await;
        assert_eq!(code, 404, "{junk}: {v}");
    }

    // Redis goes away: ingest goes on, A still answers, the outage shows.
    redis.down();
    trade(&mut ingest, 0, 111 * PX);
    until("A serves the new price without Redis", async || {
        let (_, v) = http::Client
            .get(&format!(
                "{base_a}/api/v1/market-data/SYM0/latest?topic=md%2Fcache"
            ))
            .await;
        price(&v) == "111"
    })
    .await;
    until("the outage is on /health and /metrics", async || {
        let (_, h) = http::Client.get(&format!("{base_a}/health")).await;
        let (_, m) = http::Client.get_text(&format!("{base_a}/metrics")).await;
        h["cache"] == "redis_down" && m.contains("tickwire_cache_redis_up 0")
    })
    .await;
    assert_eq!(
        a.stats().events,
        4,
        "every trade ingested while Redis was down"
    );

    // Redis is back (empty): the cache writes everything current again.
    redis.up();
    let mut c = redis.conn();
    until("latest:SYM0 back in Redis with the new price", async || {
        get(&mut c, "latest:SYM0").is_some_and(|(v, _)| price(&v) == "111")
    })
    .await;
    until("topic stats back too", async || {
        get(&mut c, &format!("topic_stats:{TOPIC}")).is_some()
    })
    .await;
    let (_, m) = http::Client.get_text(&format!("{base_a}/metrics")).await;
    assert!(m.contains("tickwire_cache_redis_up 1"), "{m}");
    // B finds Redis again at its next write (every interval).
    until("node B answers from Redis again", async || {
        let (code, v) = http::Client
            .get(&format!(
                "{base_b}/api/v1/market-data/SYM0/latest?topic=md%2Fcache"
            ))
            .await;
        code == 200 && price(&v) == "111"
    })
    .await;
    cancel.cancel();
    ea.join().await;
    eb.join().await;
    drop(ingest);
    a.shutdown();
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_keys_and_ttls_in_process() {
    let d = tempfile::tempdir().expect("dir");
    let cancel = CancellationToken::new();
    let broker = Broker::start(&config(d.path())).expect("broker");
    let mut ingest = broker.ingest(1);
    trade(&mut ingest, 1, 42 * PX);
    let e = edge(&broker, "", &cancel).await;
    let cache = &e.state.cache;
    until("every key in process", async || {
        [
            "latest:SYM1".to_string(),
            format!("topic_stats:{TOPIC}"),
            format!("backpressure:{TOPIC}:0"),
        ]
        .iter()
        .all(|k| cache.get_local(k).is_some())
    })
    .await;
    assert_eq!(cache.mode(), "in_process");
    for (key, ttl) in [
        ("latest:SYM1".to_string(), 60),
        (format!("topic_stats:{TOPIC}"), 30),
        (format!("backpressure:{TOPIC}:0"), 10),
    ] {
        let (v, left) = cache.get_local(&key).unwrap_or_else(|| panic!("{key}"));
        assert!(
            left <= Duration::from_secs(ttl)
                && left > Duration::from_secs(ttl) / 2 - Duration::from_secs(1),
            "{key}: {left:?}"
        );
        let v: serde_json::Value = serde_json::from_str(&v).expect("json");
        if key.starts_with("latest") {
            assert_eq!(price(&v), "42");
        }
    }
    // The query side: distribution_metrics_ts rows, per partition, each second.
    let base = format!("http://{}", e.http_addr);
    until("distribution_metrics_ts rows", async || {
        let (code, v) = http::Client
            .get(&format!("{base}/api/v1/stats/metrics?topic=md%2Fcache"))
            .await;
        code == 200 && v["count"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    let (_, v) = http::Client
        .get(&format!("{base}/api/v1/stats/metrics?topic=md%2Fcache"))
        .await;
    let m = &v["metrics"][0];
    assert_eq!(
        (m["topic_name"].as_str(), m["partition_id"].as_i64()),
        (Some(TOPIC), Some(0)),
        "{v}"
    );
    assert_eq!(m["backlog_size"], 0, "{v}");
    for (q, field) in [
        ("limit=0", "limit"),
        ("start_time=soon", "start_time"),
        ("colour=red", "query"),
    ] {
        let (code, body) = http::Client
            .get(&format!("{base}/api/v1/stats/metrics?{q}"))
            .await;
        assert_eq!(code, 400, "{q}");
        assert!(body.to_string().contains(field), "{q}: {body}");
    }
    // A symbol this node does not have is not found (no Redis to ask).
    let (code, _) = http::Client
        .get(&format!(
            "http://{}/api/v1/market-data/NONE/latest?topic=md%2Fcache",
            e.http_addr
        ))
        .await;
    assert_eq!(code, 404);
    cancel.cancel();
    e.join().await;
    drop(ingest);
    broker.shutdown();
}

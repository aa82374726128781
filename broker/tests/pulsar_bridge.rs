//! The Pulsar bridge against the real Apache Pulsar that
//! `scripts/services.sh up` starts (127.0.0.1:6650, admin on :8080; override
//! with TICKWIRE_PULSAR_URL and TICKWIRE_PULSAR_ADMIN). Each test uses its own
//! topics and subscription.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shm_client::{Event, Start, Subscriber};
use tickwire_bridge::pulsar::{Pulsar, TokioExecutor};
use tickwire_bridge::{BridgeConfig, Format, InitialPosition, SubscriptionType};
use tickwire_broker::config::{Config, TopicConfig};
use tickwire_broker::engine::Broker;
use tickwire_broker::pulsar::BridgeHandle;
use tickwire_broker::router::RoutingTemplate;

mod common;
use common::{backlog, create_partitioned, pulsar_url, read_topic, unique};

const TARGET: &str = "market-data/normalized/equities";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn client() -> Pulsar<TokioExecutor> {
    Pulsar::builder(pulsar_url(), TokioExecutor)
        .build()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Pulsar is not reachable at {} ({e}); run scripts/services.sh up",
                pulsar_url()
            )
        })
}

struct Node {
    _dir: tempfile::TempDir,
    broker: Broker,
    bridge: Option<BridgeHandle>,
    sub: Subscriber,
}

fn node(bridge: BridgeConfig) -> Node {
    node_with_template(bridge, &TopicConfig::default().routing_key.to_string())
}

fn node_with_template(bridge: BridgeConfig, routing_key: &str) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Config::default();
    c.node.dir = Some(dir.path().to_path_buf());
    c.synthetic.enabled = false;
    c.topics = vec![TopicConfig {
        name: TARGET.into(),
        partitions: 2,
        capacity: 1 << 14,
        routing_key: RoutingTemplate::parse(routing_key).expect("template"),
        retention: None,
    }];
    // Housekeeping (reader counts for subscribers_notified) every 20 ms.
    c.shards.reclaim_interval_ms = 20;
    c.bridge = bridge;
    c.validate().expect("config");
    let broker = Broker::start(&c).expect("broker");
    let sub = Subscriber::builder(TARGET)
        .node_dir(dir.path())
        .start(Start::Sequence(1))
        .tethered(Duration::from_secs(10))
        .open()
        .expect("subscriber");
    // Let housekeeping count the subscriber before messages flow.
    std::thread::sleep(Duration::from_millis(100));
    let bridge = Some(BridgeHandle::start(&broker, c.bridge.clone()).expect("bridge"));
    Node {
        _dir: dir,
        broker,
        bridge,
        sub,
    }
}

fn bridge_config(input: &str, dlq: &str, subscription: &str, format: Format) -> BridgeConfig {
    BridgeConfig {
        enabled: true,
        url: pulsar_url(),
        topics: vec![input.into()],
        subscription: subscription.into(),
        subscription_type: SubscriptionType::Failover,
        format,
        target_topic: TARGET.into(),
        dead_letter_topic: dlq.into(),
        // Messages may be produced before the subscription exists.
        initial_position: InitialPosition::Earliest,
        ..BridgeConfig::default()
    }
}

/// (symbol, price, source_seq) of every tick read until `n` arrive or a
/// generous deadline passes (a liveness bound, not a speed check).
fn read_ticks(sub: &mut Subscriber, n: usize) -> Vec<(String, f64, u64, u32)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while got.len() < n && Instant::now() < deadline {
        let k = sub.poll(1024, |e| match e {
            Event::Tick(t) => got.push((
                t.symbol().unwrap_or("?").to_string(),
                t.price().unwrap_or(f64::NAN),
                t.body.source_seq(),
                t.body.source_id(),
            )),
            other => panic!("lossless subscriber got {other:?}"),
        });
        if k == 0 {
            sub.wait_for_data(Duration::from_millis(50));
        }
    }
    got
}

/// JSON messages on `inputs` (several topics, partitioned ones among them)
/// through one `kind` subscription: exactly the sent messages reach the
/// rings, no duplicate by source identity, per-key order where the type
/// promises it, and every message acknowledged once committed.
fn json_ingest(kind: SubscriptionType, inputs: &[String], per_input: usize) {
    let rt = runtime();
    let dlq = unique("tw-json-dlq");
    let sub_name = format!("tickwire-json-{kind:?}");
    let mut cfg = bridge_config(&inputs[0], &dlq, &sub_name, Format::Json);
    cfg.topics = inputs.to_vec();
    cfg.subscription_type = kind;
    let mut n = node(cfg);
    let total = per_input * inputs.len();
    let keyed = tickwire_bridge::pulsar::ProducerOptions {
        routing_policy: Some(tickwire_bridge::pulsar::routing_policy::RoutingPolicy::RoundRobin),
        ..blocking()
    };
    let receipts = rt.block_on(async {
        let pulsar = client().await;
        let mut ok = 0;
        for (k, input) in inputs.iter().enumerate() {
            // Unbatched (Key_Shared needs it) and keyed: a partitioned topic
            // routes each key to one partition (pulsar-rs's default policy
            // would spread one key round-robin, with no order to keep).
            let mut producer = pulsar.producer().with_topic(input).with_name(format!("json-producer-{}-{k}", std::process::id())).with_options(keyed.clone()).build().await.expect("producer");
            // Receipts are awaited in windows: the client refuses too many in flight.
            let mut window = Vec::new();
            for i in 0..per_input {
                let symbol = format!("T{k}SYM{}", i % 10);
                let body = serde_json::json!({
                    "symbol": symbol, "exchange": "NASDAQ", "currency": "USD",
                    "timestamp_ns": tickwire_proto::futex::realtime_ns(), "price": 100.0 + i as f64, "volume": 10 + i,
                });
                let f = producer.create_message().with_key(symbol).with_content(serde_json::to_vec(&body).expect("json")).send_non_blocking().await.expect("send");
                window.push(f);
                if window.len() == 256 || i + 1 == per_input {
                    for f in window.drain(..) {
                        if f.await.is_ok() {
                            ok += 1;
                        }
                    }
                }
            }
        }
        ok
    });
    assert_eq!(receipts, total, "every send got a receipt");
    let ticks = read_ticks(&mut n.sub, total);
    assert_eq!(
        ticks.len(),
        total,
        "{kind:?}: exactly the sent messages reach the rings"
    );
    // No duplicates by source identity (producer + partition, sequence), and
    // per-key order where the subscription type keeps it.
    let ordered = kind != SubscriptionType::Shared;
    let mut last: HashMap<&str, f64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for (sym, price, seq, src) in &ticks {
        assert!(
            seen.insert((*src, *seq)),
            "{kind:?}: duplicate source ({src}, {seq})"
        );
        let prev = last.insert(sym.as_str(), *price);
        assert!(
            !ordered || prev.is_none_or(|p| p < *price),
            "{kind:?}: {sym}: {price} after {prev:?}"
        );
    }
    assert_eq!(last.len(), 10 * inputs.len(), "every key arrived");
    let extra = n.sub.poll(10, |_| {});
    assert_eq!(extra, 0, "nothing beyond the sent messages");
    // Acknowledged after commit: once the bridge has acked all, every
    // subscription backlog is empty.
    let stats = n.bridge.as_ref().map(|b| b.stats.clone()).expect("bridge");
    let acked = || stats.acked.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked() < total as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(acked(), total as u64, "{kind:?}: acknowledged");
    n.bridge
        .take()
        .map(BridgeHandle::stop)
        .transpose()
        .expect("bridge stop");
    for input in inputs {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut b = backlog(input, &sub_name);
        while b != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            b = backlog(input, &sub_name);
        }
        assert_eq!(b, 0, "{kind:?}: {input}: all messages acknowledged");
    }
    assert_eq!(
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    eprintln!(
        "{kind:?}: {total} messages on {} topics, {} ack commands",
        inputs.len(),
        stats
            .ack_commands
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    n.broker.shutdown();
}

fn partitioned(name: &str, partitions: u32) -> String {
    let t = unique(name);
    create_partitioned(&t, partitions);
    t
}

#[test]
fn json_messages_reach_the_rings_exactly_in_per_key_order_and_are_acked_after_commit() {
    // A plain topic and a partitioned one, through one Failover subscription.
    let inputs = [unique("tw-json"), partitioned("tw-json-parts", 3)];
    json_ingest(SubscriptionType::Failover, &inputs, 1000);
}

#[test]
fn exclusive_key_shared_and_shared_subscriptions_ingest_a_partitioned_topic_exactly() {
    for kind in [
        SubscriptionType::Exclusive,
        SubscriptionType::KeyShared,
        SubscriptionType::Shared,
    ] {
        json_ingest(kind, &[partitioned("tw-json-kinds", 2)], 500);
    }
}

#[test]
fn every_kind_of_bad_message_goes_to_the_dead_letter_topic_with_its_reason_and_none_reaches_a_ring()
{
    let rt = runtime();
    let input = unique("tw-bad");
    let dlq = unique("tw-bad-dlq");
    let mut cfg = bridge_config(&input, &dlq, "tickwire-bad", Format::Json);
    cfg.exchanges = vec!["NASDAQ".into()];
    cfg.max_payload_bytes = 1024;
    let mut n = node(cfg);
    let now = tickwire_proto::futex::realtime_ns();
    let good = |i: u64| {
        serde_json::json!({"symbol": "GOOD", "exchange": "NASDAQ", "timestamp_ns": now, "price": 10.0 + i as f64, "volume": 1}).to_string()
    };
    let bad: Vec<(&str, String)> = vec![
        ("decode", "{not json".into()),
        ("missing_field", serde_json::json!({"exchange": "NASDAQ", "timestamp_ns": now, "price": 1.0}).to_string()),
        ("invalid_price", serde_json::json!({"symbol": "X", "exchange": "NASDAQ", "timestamp_ns": now, "price": -1.0}).to_string()),
        ("invalid_volume", serde_json::json!({"symbol": "X", "exchange": "NASDAQ", "timestamp_ns": now, "price": 1.0, "volume": -5}).to_string()),
        ("future_timestamp", serde_json::json!({"symbol": "X", "exchange": "NASDAQ", "timestamp_ns": now + 3_600_000_000_000u64, "price": 1.0}).to_string()),
        ("unknown_exchange", serde_json::json!({"symbol": "X", "exchange": "MOON", "timestamp_ns": now, "price": 1.0}).to_string()),
        ("oversized", format!("{{\"symbol\": \"{}\"}}", "X".repeat(2000))),
    ];
    let reasons = rt.block_on(async {
        let mut producer = producer(&input).await;
        // Five good, every bad one, five good.
        let payloads = (0..5)
            .map(good)
            .chain(bad.iter().map(|(_, p)| p.clone()))
            .chain((5..10).map(good));
        for payload in payloads {
            producer
                .send_non_blocking(payload.into_bytes())
                .await
                .expect("send")
                .await
                .expect("receipt");
        }
        let mut reasons = Vec::new();
        for (_, props) in read_topic(&client().await, &dlq, bad.len()).await {
            assert!(
                props.get("detail").is_some_and(|d| !d.is_empty()),
                "a detail with the reason"
            );
            assert_eq!(props.get("source_topic"), Some(&input));
            reasons.push(props.get("reason").cloned().unwrap_or_default());
        }
        reasons
    });
    let mut expected: Vec<String> = bad.iter().map(|(r, _)| r.to_string()).collect();
    let mut got = reasons;
    expected.sort();
    got.sort();
    assert_eq!(
        got, expected,
        "one dead letter per bad message, with its reason"
    );
    let ticks = read_ticks(&mut n.sub, 10);
    assert_eq!(ticks.len(), 10);
    assert!(
        ticks.iter().all(|(s, _, _, _)| s == "GOOD"),
        "no bad message reached a ring"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(n.sub.poll(10, |_| {}), 0);
    n.bridge
        .take()
        .map(BridgeHandle::stop)
        .transpose()
        .expect("bridge stop");
    n.broker.shutdown();
}

#[test]
fn protobuf_trades_and_quotes_reach_the_rings() {
    use tickwire_bridge::payload::pb::NormalizedMarketData;
    let rt = runtime();
    let input = unique("tw-proto");
    let dlq = unique("tw-proto-dlq");
    let output = unique("tw-proto-distributed");
    let mut cfg = bridge_config(&input, &dlq, "tickwire-proto", Format::Protobuf);
    cfg.output_topic = output.clone();
    cfg.output_sample_every = 1;
    cfg.target_workflows = vec!["market_intelligence".into()];
    // A template other than the default: the events carry the topic's key.
    let mut n = node_with_template(cfg, "{exchange}:{symbol}:{kind}");
    let total = 300usize;
    rt.block_on(async {
        let mut producer = producer(&input).await;
        for i in 0..total {
            let now = tickwire_proto::futex::realtime_ns() as i64;
            let m = if i % 2 == 0 {
                NormalizedMarketData {
                    symbol: "BTC-USD".into(),
                    exchange: "COINBASE".into(),
                    kind: "trade".into(),
                    timestamp_ns: now,
                    price: 60000.0 + i as f64,
                    volume: 5,
                    size_decimals: 6,
                    ..Default::default()
                }
            } else {
                NormalizedMarketData {
                    symbol: "BTC-USD".into(),
                    exchange: "COINBASE".into(),
                    kind: "quote".into(),
                    timestamp_ns: now,
                    bid_price: 60000.0 + i as f64,
                    bid_size: 7,
                    ask_price: 60001.0 + i as f64,
                    ask_size: 9,
                    size_decimals: 6,
                    ..Default::default()
                }
            };
            producer
                .send_non_blocking(prost_encode(&m))
                .await
                .expect("send")
                .await
                .expect("receipt");
        }
    });
    let mut kinds = HashMap::new();
    let mut offsets = std::collections::HashSet::new();
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < total && Instant::now() < deadline {
        n.sub.poll(1024, |e| {
            if let Event::Tick(t) = e {
                got += 1;
                offsets.insert((t.partition as u64, t.seq));
                *kinds.entry(t.kind().map(|k| k.name())).or_insert(0) += 1;
                assert_eq!(
                    t.instrument()
                        .map(|i| (i.symbol(), i.exchange(), i.size_decimals())),
                    Some(("BTC-USD", "COINBASE", 6))
                );
            }
        });
        n.sub.wait_for_data(Duration::from_millis(20));
    }
    assert_eq!(got, total);
    assert_eq!(kinds.get(&Some("trade")), Some(&(total / 2)));
    assert_eq!(kinds.get(&Some("quote")), Some(&(total / 2)));
    n.bridge
        .take()
        .map(BridgeHandle::stop)
        .transpose()
        .expect("bridge stop");
    // One market_data_distributed event per committed message (sampling 1),
    // pointing at where the message landed.
    let events: Vec<serde_json::Value> = rt.block_on(async {
        let pulsar = client().await;
        read_topic(&pulsar, &output, total)
            .await
            .into_iter()
            .map(|(body, _)| serde_json::from_slice(&body).expect("event json"))
            .collect()
    });
    assert_eq!(events.len(), total);
    for e in &events {
        assert_eq!(e["event_type"], "market_data_distributed");
        let d = &e["distribution"];
        assert_eq!(d["topic"], TARGET);
        let key = (
            d["partition"].as_u64().expect("partition"),
            d["offset"].as_u64().expect("offset"),
        );
        assert!(
            offsets.contains(&key),
            "event points at a committed frame: {e}"
        );
        assert!(
            d["subscribers_notified"].as_u64() >= Some(1),
            "our subscriber was counted: {e}"
        );
        assert_eq!(e["data"]["symbol"], "BTC-USD");
        let kind = e["data"]["kind"].as_str().expect("kind");
        assert_eq!(
            e["routing"]["routing_key"].as_str(),
            Some(format!("COINBASE:BTC-USD:{kind}").as_str()),
            "the routing key of the topic's template: {e}"
        );
        assert_eq!(e["routing"]["delivery_guarantees"], "at_least_once");
        assert_eq!(e["routing"]["target_workflows"][0], "market_intelligence");
    }
    n.broker.shutdown();
}

/// A producer on `topic` with Pulsar's defaults (no batching).
async fn producer(topic: &str) -> tickwire_bridge::pulsar::Producer<TokioExecutor> {
    client()
        .await
        .producer()
        .with_topic(topic)
        .build()
        .await
        .expect("producer")
}

/// Producer options: wait for room rather than fail with SlowDown.
fn blocking() -> tickwire_bridge::pulsar::ProducerOptions {
    tickwire_bridge::pulsar::ProducerOptions {
        block_queue_if_full: true,
        ..Default::default()
    }
}

fn prost_encode(m: &tickwire_bridge::payload::pb::NormalizedMarketData) -> Vec<u8> {
    let mut buf = Vec::new();
    tickwire_bridge::payload::encode(m, &mut buf);
    buf
}

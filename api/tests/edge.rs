//! The edge end to end: a real ring written with shm-client's test writer,
//! the real gRPC and HTTP servers on port 0, a tonic client generated from
//! proto/, a tokio-tungstenite WebSocket client and plain HTTP requests.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use shm_client::testing::TopicWriter;
use tickwire_api::auth::{AuthConfig, Grant, KeyConfig, Right, hash_key};
use tickwire_api::{Edge, EdgeConfig, Engine, TopicDesc};
use tickwire_proto::pb;
use tickwire_proto::pb::market_data_stream_client::MarketDataStreamClient;
use tickwire_proto::pb::stream_response::Kind as R;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "market-data/normalized/equities";

struct TestEngine {
    dir: std::path::PathBuf,
    /// Every rule set applied, as (name, priority) lists, newest last.
    applied: std::sync::Mutex<Vec<Vec<(String, i64)>>>,
}

impl TestEngine {
    fn new(dir: &std::path::Path) -> TestEngine {
        TestEngine {
            dir: dir.to_path_buf(),
            applied: Default::default(),
        }
    }
}

impl Engine for TestEngine {
    fn node_dir(&self) -> std::path::PathBuf {
        self.dir.clone()
    }
    fn topics(&self) -> Vec<TopicDesc> {
        vec![TopicDesc {
            name: TOPIC.into(),
            partitions: 2,
            capacity: 1024,
            runtime: false,
            retention: Some(Duration::from_secs(7 * 86_400)),
        }]
    }
    fn default_topic(&self) -> String {
        TOPIC.into()
    }
    fn set_routing_rules(
        &self,
        rules: &[tickwire_api::RoutingRule],
        dry_run: bool,
    ) -> Result<(), (String, String)> {
        for (i, r) in rules.iter().enumerate() {
            if r.target_topic != TOPIC {
                return Err((format!("rules[{i}].target_topic"), "no such topic".into()));
            }
        }
        if !dry_run {
            self.applied.lock().expect("lock").push(
                rules
                    .iter()
                    .filter(|r| r.enabled)
                    .map(|r| (r.rule_name.clone(), r.priority))
                    .collect(),
            );
        }
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    /// Taken while a flood thread writes (see `flood`).
    writer: Option<TopicWriter>,
    edge: Option<Edge>,
    cancel: CancellationToken,
    cfg: EdgeConfig,
    engine: Arc<TestEngine>,
}

impl Fixture {
    async fn start(tune: impl FnOnce(&mut EdgeConfig)) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = TopicWriter::create(dir.path(), TOPIC, 2, 1024).expect("rings");
        let mut cfg = EdgeConfig {
            grpc_addr: "127.0.0.1:0".parse().expect("addr"),
            http_addr: "127.0.0.1:0".parse().expect("addr"),
            ..EdgeConfig::default()
        };
        tune(&mut cfg);
        let (edge, cancel, engine) = Fixture::edge_on(dir.path(), &cfg).await;
        Fixture {
            dir,
            writer: Some(writer),
            edge: Some(edge),
            cancel,
            cfg,
            engine,
        }
    }

    async fn edge_on(
        dir: &std::path::Path,
        cfg: &EdgeConfig,
    ) -> (Edge, CancellationToken, Arc<TestEngine>) {
        let cancel = CancellationToken::new();
        let engine = Arc::new(TestEngine::new(dir));
        let edge = Edge::start(cfg.clone(), engine.clone(), cancel.clone())
            .await
            .expect("edge");
        (edge, cancel, engine)
    }

    /// The rule set the engine was last given.
    fn applied(&self) -> Option<Vec<(String, i64)>> {
        self.engine.applied.lock().expect("lock").last().cloned()
    }

    /// Stops the edge and starts a new one on the same rings and store
    /// (as a broker restart would).
    async fn restart(&mut self) {
        self.cancel.cancel();
        if let Some(e) = self.edge.take() {
            tokio::time::timeout(Duration::from_secs(10), e.join())
                .await
                .expect("edge stops promptly");
        }
        let (edge, cancel, engine) = Fixture::edge_on(self.dir.path(), &self.cfg).await;
        self.edge = Some(edge);
        self.cancel = cancel;
        self.engine = engine;
    }

    /// Queues of 64 events: a stalled client backs up quickly.
    async fn small_queues() -> Fixture {
        Fixture::start(|c| {
            c.queue_events = 64;
            c.queue_bytes = 64 * 1024;
            c.max_batch = 16;
            c.metrics_interval_secs = 1;
            c.delivery_log_sample = 1;
        })
        .await
    }

    fn edge(&self) -> &Edge {
        self.edge.as_ref().expect("running")
    }

    async fn grpc(&self) -> MarketDataStreamClient<tonic::transport::Channel> {
        MarketDataStreamClient::connect(format!("http://{}", self.edge().grpc_addr))
            .await
            .expect("connect")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.edge().http_addr)
    }

    fn trade(&mut self, partition: u32, symbol: &str, exchange: &str, price: f64) -> u64 {
        let w = self.writer.as_mut().expect("the writer is not flooding");
        let s = w
            .publish_trade(partition, symbol, exchange, "USD", price, 100)
            .expect("publish");
        w.flush();
        s
    }

    /// A thread publishing trades of S00..S49 on both partitions as fast as
    /// it can until `stop`; joining it gives the writer back.
    fn flood(
        &mut self,
    ) -> (
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<TopicWriter>,
    ) {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut w = self.writer.take().expect("one flood at a time");
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let sym = format!("S{:02}", n % 50);
                let _ = w.publish_trade((n % 2) as u32, &sym, "NASDAQ", "USD", 1.0, 100);
                w.flush();
                n += 1;
            }
            w
        });
        (stop, t)
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(e) = self.edge.take() {
            tokio::time::timeout(Duration::from_secs(10), e.join())
                .await
                .expect("edge stops promptly");
        }
    }
}

/// The next response on an open stream, before `deadline`.
async fn next_kind(
    s: &mut tonic::Streaming<pb::StreamResponse>,
    deadline: tokio::time::Instant,
) -> R {
    tokio::time::timeout_at(deadline, s.message())
        .await
        .expect("no stall")
        .expect("stream ok")
        .expect("not ended")
        .kind
        .expect("kind")
}

/// Reads responses until `n` events arrived; returns (events as
/// (partition, seq, symbol, snapshot), notices).
async fn collect(
    s: &mut tonic::Streaming<pb::StreamResponse>,
    n: usize,
) -> (Vec<(u32, u64, String, bool)>, Vec<R>) {
    let mut events = Vec::new();
    let mut notices = Vec::new();
    // One deadline for all of it: heartbeats must not keep a stalled wait alive.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while events.len() < n {
        match next_kind(s, deadline).await {
            R::Batch(b) => {
                for m in b.messages {
                    let md = m.metadata.expect("metadata");
                    let d = m.data.expect("data");
                    events.push((md.partition, md.sequence, d.symbol, md.snapshot));
                }
            }
            R::Heartbeat(_) => {}
            other => notices.push(other),
        }
    }
    (events, notices)
}

/// The next JSON text message of a WebSocket (heartbeats skipped if asked).
async fn next_json(
    ws: &mut (
             impl futures::Stream<
        Item = Result<
            tokio_tungstenite::tungstenite::Message,
            tokio_tungstenite::tungstenite::Error,
        >,
    > + Unpin
         ),
    skip_heartbeats: bool,
) -> serde_json::Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no stall")
            .expect("open")
            .expect("ok");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).expect("json");
            if skip_heartbeats && v["type"] == "heartbeat" {
                continue;
            }
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_filtered_events_in_order_with_snapshot_and_earliest() {
    let mut f = Fixture::start(|_| {}).await;
    // History before anyone subscribes.
    let mut before = Vec::new();
    for i in 0..10 {
        before.push((0, f.trade(0, "AAPL", "NASDAQ", 150.0 + i as f64)));
        f.trade(1, "MSFT", "NASDAQ", 300.0);
    }
    let mut c = f.grpc().await;
    // Earliest, AAPL only, with a snapshot first.
    let mut s = c
        .stream_market_data(pb::StreamRequest {
            symbols: vec!["AAPL".into()],
            start_position: pb::MessagePosition::Earliest as i32,
            snapshot: true,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    // Live events after subscribing.
    let mut after = Vec::new();
    for i in 0..5 {
        after.push((0, f.trade(0, "AAPL", "NASDAQ", 160.0 + i as f64)));
        f.trade(1, "MSFT", "NASDAQ", 300.0);
    }
    let (events, notices) = collect(&mut s, 1 + 10 + 5).await;
    // The initial image: AAPL's latest, marked snapshot, then its end.
    assert_eq!(events[0], (0, 10, "AAPL".into(), true));
    assert!(matches!(
        notices[0],
        R::SnapshotComplete(pb::SnapshotComplete { instruments: 1 })
    ));
    // Then every AAPL event from the oldest, in order, no MSFT, no gap, no duplicate.
    let got: Vec<(u32, u64)> = events[1..].iter().map(|e| (e.0, e.1)).collect();
    let want: Vec<(u32, u64)> = before.iter().chain(&after).copied().collect();
    assert_eq!(got, want);
    assert!(events[1..].iter().all(|e| e.2 == "AAPL" && !e.3));
    assert_eq!(notices.len(), 1, "{notices:?}");

    // Resume after a message id: only what follows it.
    let mut s = c
        .stream_market_data(pb::StreamRequest {
            symbols: vec!["AAPL".into()],
            start_position: pb::MessagePosition::MessageId as i32,
            start_message_ids: vec![pb::MessageId {
                partition: 0,
                epoch: 1,
                sequence: 12,
            }],
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    let (events, _) = collect(&mut s, 3).await;
    assert_eq!(
        events.iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![13, 14, 15]
    );

    // Filters: price range and data type.
    let mut s = c
        .stream_market_data(pb::StreamRequest {
            data_types: vec!["trade".into()],
            filters: Some(pb::FilterCriteria {
                min_price: Some(500.0),
                exchanges: vec!["NYSE".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    f.trade(0, "IBM", "NYSE", 100.0); // too cheap
    f.trade(1, "IBM", "NASDAQ", 900.0); // wrong venue
    let want = f.trade(1, "IBM", "NYSE", 900.0);
    let (events, _) = collect(&mut s, 1).await;
    assert_eq!(events, vec![(1, want, "IBM".into(), false)]);

    // Bad requests name the field.
    let e = c
        .stream_market_data(pb::StreamRequest {
            data_types: vec!["bars".into()],
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("data_types[0]"), "{}", e.message());
    let e = c
        .stream_market_data(pb::StreamRequest {
            subscription_type: pb::SubscriptionType::Shared as i32,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("subscription_name"), "{}", e.message());
    // Acknowledgements need the bidirectional call.
    let e = c
        .stream_market_data(pb::StreamRequest {
            subscription_name: "g".into(),
            delivery_mode: pb::DeliveryMode::AtLeastOnce as i32,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("ConsumeMarketData"), "{}", e.message());
    let e = c
        .stream_market_data(pb::StreamRequest {
            topic: "no/such/topic".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::NotFound);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_gets_exact_gaps_and_never_slows_another() {
    let mut f = Fixture::small_queues().await;
    // Two connections, as two remote programs would have (HTTP/2 flow
    // control is per connection as well as per stream).
    let mut fast = stream_with(&f, pb::SlowConsumerPolicy::Drop).await;
    let mut slow = stream_with(&f, pb::SlowConsumerPolicy::Drop).await;
    // The fast client reads each round of 32 events in full (its queue
    // holds 64); the slow one reads nothing until the end.
    let total = 2000 * 32;
    paced_by_a_fast_client(&mut f, &mut fast, 2000).await;
    // The slow client: every sequence either arrived or lies in a gap it
    // was told about, exactly once, in order.
    let marker = f.trade(1, "END", "NASDAQ", 1.0);
    let mut covered = Vec::new();
    let mut slow_notice = false;
    // One deadline for the whole drain: heartbeats must not keep a wait for
    // a gap notice that never comes alive.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match next_kind(&mut slow, deadline).await {
            R::Batch(b) => {
                let mut end = false;
                for m in b.messages {
                    let md = m.metadata.expect("md");
                    if md.partition == 1 {
                        assert_eq!(md.sequence, marker);
                        end = true;
                    } else {
                        covered.push(md.sequence);
                    }
                }
                if end {
                    break;
                }
            }
            R::Gap(g) => {
                assert_eq!(g.reason, "slow_consumer");
                if g.partition == 1 {
                    // The end marker itself was skipped: told exactly.
                    assert_eq!((g.from_sequence, g.to_sequence), (marker, marker));
                    break;
                }
                assert_eq!(g.partition, 0);
                covered.extend(g.from_sequence..=g.to_sequence);
            }
            R::SlowConsumer(n) => {
                assert_eq!(n.policy, "drop");
                slow_notice = true;
            }
            _ => {}
        }
    }
    assert!(slow_notice, "the slow client was told");
    assert_eq!(
        covered,
        (1..=total).collect::<Vec<_>>(),
        "delivered + gaps = everything, in order"
    );
    // message_delivery_log: each range the slow client was told it missed
    // is a failed row; delivered frames are sampled (here every one).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows = f
            .edge()
            .store
            .deliveries(TOPIC, 0, i64::MAX, None, 100_000)
            .await
            .expect("delivery log");
        let failed: Vec<_> = rows.iter().filter(|r| r.status == "failed").collect();
        let delivered = rows.iter().filter(|r| r.status == "delivered").count();
        if !failed.is_empty() && delivered > 0 {
            assert!(
                failed.iter().all(|r| r
                    .error_message
                    .as_deref()
                    .is_some_and(|e| e.starts_with("slow_consumer:"))),
                "{failed:?}"
            );
            assert!(
                failed
                    .iter()
                    .all(|r| r.message_id.starts_with("0:") || r.message_id.starts_with("1:"))
            );
            // The same failed rows over REST.
            let http = reqwest_free::Client;
            let (code, v) = http
                .get(&f.url(&format!(
                    "/api/v1/stats/deliveries?topic={}&start_time=1&status=failed&limit=100000",
                    TOPIC.replace('/', "%2F")
                )))
                .await;
            assert_eq!(code, 200, "{v}");
            let listed = v["deliveries"].as_array().expect("deliveries");
            assert!(listed.len() >= failed.len(), "{v}");
            assert!(listed.iter().all(|d| d["status"] == "failed"), "{v}");
            assert_eq!(listed[0]["message_id"], failed[0].message_id.as_str());
            let (code, v) = http
                .get(&f.url("/api/v1/stats/deliveries?status=lost"))
                .await;
            assert_eq!(code, 400);
            assert!(v.to_string().contains("status"), "{v}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "failed and delivered rows: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_group_members_ack_and_a_closed_member_s_events_go_to_the_other() {
    use tokio_tungstenite::tungstenite::Message;
    let mut f = Fixture::start(|_| {}).await;
    let url = format!("ws://{}/api/v1/market-data/stream", f.edge().http_addr);
    let (mut a, _) = tokio_tungstenite::connect_async(&url).await.expect("ws");
    let (mut b, _) = tokio_tungstenite::connect_async(&url).await.expect("ws");
    let join = r#"{"type":"subscribe","payload":{"subscription_id":"g","subscription_name":"ws-group","subscription_type":"shared","delivery_mode":"at_least_once","receiver_queue_size":2}}"#;
    for ws in [&mut a, &mut b] {
        ws.send(Message::Text(join.into())).await.expect("send");
        let r = next_json(ws, true).await;
        assert_eq!(r["type"], "subscribed", "{r}");
        assert_eq!(r["payload"]["subscription_type"], "Shared", "{r}");
    }
    // A bad ack names the field and changes nothing.
    for (bad, field) in [
        (
            r#"{"type":"ack","payload":{"subscription_id":"g","message_ids":["0:1"]}}"#,
            "payload.message_ids[0]",
        ),
        (
            r#"{"type":"ack","payload":{"subscription_id":"g","message_ids":[],"cumulative":true}}"#,
            "payload.cumulative",
        ),
        (
            r#"{"type":"ack","payload":{"subscription_id":"nope","message_ids":[]}}"#,
            "payload.subscription_id",
        ),
    ] {
        a.send(Message::Text(bad.into())).await.expect("send");
        let e = next_json(&mut a, true).await;
        assert_eq!(e["type"], "error", "{bad}: {e}");
        assert_eq!(e["payload"]["field"], field, "{bad}: {e}");
    }
    let mut sent = Vec::new();
    for i in 0..4 {
        sent.push((0u64, f.trade(0, "AAPL", "NASDAQ", 150.0 + i as f64)));
    }
    // Two each (credit 2); `a` never acks, `b` acks what it gets.
    async fn take(
        ws: &mut (
                 impl futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
                 + Unpin
             ),
        n: usize,
    ) -> Vec<(u64, u64, String, u64)> {
        let mut got = Vec::new();
        while got.len() < n {
            let d = next_json(ws, true).await;
            assert_eq!(d["type"], "data", "{d}");
            for m in d["payload"]["messages"].as_array().expect("messages") {
                let md = &m["metadata"];
                got.push((
                    md["partition"].as_u64().expect("p"),
                    md["sequence"].as_u64().expect("s"),
                    md["message_id"].as_str().expect("id").to_string(),
                    md["redelivery_count"].as_u64().unwrap_or(0),
                ));
            }
        }
        got
    }
    let got_a = take(&mut a, 2).await;
    let got_b = take(&mut b, 2).await;
    let ids: Vec<String> = got_b.iter().map(|g| format!("{:?}", g.2)).collect();
    b.send(Message::Text(
        format!(
            r#"{{"type":"ack","payload":{{"subscription_id":"g","message_ids":[{}]}}}}"#,
            ids.join(",")
        )
        .into(),
    ))
    .await
    .expect("send");
    let mut all: Vec<(u64, u64)> = got_a.iter().chain(&got_b).map(|g| (g.0, g.1)).collect();
    all.sort_unstable();
    assert_eq!(all, sent, "each event to one member");
    // `a` goes away: what it held goes to `b`, marked.
    drop(a);
    let again = take(&mut b, 2).await;
    let mut want: Vec<(u64, u64, u64)> = got_a.iter().map(|g| (g.0, g.1, 1)).collect();
    let mut again: Vec<(u64, u64, u64)> = again.iter().map(|g| (g.0, g.1, g.3)).collect();
    want.sort_unstable();
    again.sort_unstable();
    assert_eq!(again, want);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscribe_unsubscribe_and_bad_messages() {
    let mut f = Fixture::start(|_| {}).await;
    let url = format!("ws://{}/api/v1/market-data/stream", f.edge().http_addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Text(
        r#"{"type":"subscribe","payload":{"symbols":["AAPL"]}}"#.into(),
    ))
    .await
    .expect("send");
    let ack = next_json(&mut ws, true).await;
    assert_eq!(ack["type"], "subscribed");
    let id = ack["payload"]["subscription_id"]
        .as_str()
        .expect("id")
        .to_string();
    // Bad messages: each names what was wrong and changes nothing.
    for (bad, field) in [
        (
            r#"{"type":"subscribe","payload":{"symbols":["AAPL"],"policy":"block"}}"#,
            "payload.policy",
        ),
        (
            r#"{"type":"subscribe","payload":{"symbol":["AAPL"]}}"#,
            "payload.symbol",
        ),
        (
            r#"{"type":"subscribe","payload":{"data_types":["bars"]}}"#,
            "payload.data_types[0]",
        ),
        (r#"{"type":"shout","payload":{}}"#, "type"),
        (r#"not json"#, "message"),
    ] {
        ws.send(Message::Text(bad.into())).await.expect("send");
        let e = next_json(&mut ws, true).await;
        assert_eq!(e["type"], "error", "{bad}");
        assert_eq!(e["payload"]["field"], field, "{bad}: {e}");
    }
    let s1 = f.trade(0, "AAPL", "NASDAQ", 150.25);
    f.trade(0, "MSFT", "NASDAQ", 300.0);
    let s2 = f.trade(1, "AAPL", "NASDAQ", 150.5);
    let mut got = Vec::new();
    while got.len() < 2 {
        let d = next_json(&mut ws, true).await;
        assert_eq!(d["type"], "data", "{d}");
        assert_eq!(d["payload"]["subscription_id"], id.as_str());
        for m in d["payload"]["messages"].as_array().expect("messages") {
            assert_eq!(m["data"]["symbol"], "AAPL");
            got.push((
                m["metadata"]["partition"].as_u64().expect("p"),
                m["metadata"]["sequence"].as_u64().expect("s"),
                m["data"]["price"].to_string(),
            ));
        }
    }
    assert_eq!(got, vec![(0, s1, "150.25".into()), (1, s2, "150.5".into())]);
    ws.send(Message::Text(
        format!(r#"{{"type":"unsubscribe","payload":{{"subscription_id":"{id}"}}}}"#).into(),
    ))
    .await
    .expect("send");
    assert_eq!(next_json(&mut ws, true).await["type"], "unsubscribed");
    ws.send(Message::Text(
        format!(r#"{{"type":"unsubscribe","payload":{{"subscription_id":"{id}"}}}}"#).into(),
    ))
    .await
    .expect("send");
    let e = next_json(&mut ws, true).await;
    assert_eq!(e["type"], "error");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_latest_admin_health_metrics_and_openapi() {
    let mut f = Fixture::start(|_| {}).await;
    f.trade(0, "AAPL", "NASDAQ", 150.25);
    let last = f.trade(1, "AAPL", "XETRA", 151.0);
    let http = reqwest_free::Client;
    // Wait for the dispatcher to have read it.
    let mut v = serde_json::Value::Null;
    for _ in 0..200 {
        let (code, body) = http.get(&f.url("/api/v1/market-data/AAPL/latest")).await;
        if code == 200 {
            v = body;
            if v["sequence"] == last {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(v["source"], "XETRA", "{v}");
    assert_eq!(v["data"]["price"].to_string(), "151");
    assert_eq!(v["venues"], serde_json::json!(["NASDAQ", "XETRA"]));
    let (code, v) = http
        .get(&f.url("/api/v1/market-data/AAPL/latest?exchange=NASDAQ"))
        .await;
    assert_eq!(code, 200);
    assert_eq!(v["data"]["price"].to_string(), "150.25");
    let (code, v) = http
        .get(&f.url("/api/v1/market-data/AAPL/latest?exchange="))
        .await;
    assert_eq!(
        (code, v["error"]["field"].as_str()),
        (400, Some("exchange"))
    );
    let (code, v) = http
        .get(&f.url("/api/v1/market-data/AAPL/latest?venue=X"))
        .await;
    assert_eq!(code, 400, "{v}");
    let (code, _) = http.get(&f.url("/api/v1/market-data/NOPE/latest")).await;
    assert_eq!(code, 404);
    let (code, v) = http
        .get(&f.url("/api/v1/market-data/AAPL/latest?exchange=XLON&currency=GBP"))
        .await;
    assert_eq!(code, 404);
    assert_eq!(
        v["error"]["message"],
        "symbol not found: AAPL (exchange XLON, currency GBP)"
    );
    // A symbol that is not UTF-8 is a bad parameter like any other: JSON
    // naming it, not the framework's plain text.
    let (code, v) = http.get(&f.url("/api/v1/market-data/%FF%FE/latest")).await;
    assert_eq!(
        (code, v["error"]["field"].as_str()),
        (400, Some("symbol")),
        "{v}"
    );
    // A huge one is named by its start and length, not echoed back.
    let long = "A".repeat(5000);
    let (code, v) = http
        .get(&f.url(&format!("/api/v1/market-data/{long}/latest")))
        .await;
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert_eq!(
        (code, v["error"]["field"].as_str()),
        (400, Some("symbol")),
        "{v}"
    );
    assert!(
        message.len() < 200 && message.contains("5000 bytes"),
        "{message}"
    );
    let (code, v) = http.get(&f.url("/health")).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("ok")));
    let (code, v) = http.get(&f.url("/api/v1/topics")).await;
    assert_eq!(code, 200);
    assert_eq!(v["topics"][0]["topic"], TOPIC);
    let enc = TOPIC.replace('/', "%2F");
    let (code, v) = http
        .get(&f.url(&format!("/api/v1/topics/{enc}/stats")))
        .await;
    assert_eq!(code, 200, "{v}");
    assert!(v["events"].as_u64().expect("events") >= 2);
    let (code, _) = http
        .post(&f.url("/api/v1/topics"), r#"{"topic":"x","partitions":2}"#)
        .await;
    assert_eq!(code, 501, "an engine that cannot make topics says so");
    // Named subscriptions: create, pause, stats, delete.
    let (code, v) = http
        .post(
            &f.url("/api/v1/subscriptions"),
            r#"{"subscription":"screen","symbols":["AAPL"]}"#,
        )
        .await;
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["status"], "ACTIVE");
    let (code, _) = http
        .post(
            &f.url("/api/v1/subscriptions"),
            r#"{"subscription":"screen"}"#,
        )
        .await;
    assert_eq!(code, 409);
    let (code, v) = http
        .post(
            &f.url("/api/v1/subscriptions"),
            r#"{"subscription":"x","policy":"block"}"#,
        )
        .await;
    assert_eq!((code, v["error"]["field"].as_str()), (400, Some("policy")));
    let (code, v) = http
        .post(
            &f.url(&format!("/api/v1/subscriptions/{enc}/screen/pause")),
            "",
        )
        .await;
    assert_eq!((code, v["status"].as_str()), (200, Some("PAUSED")));
    let (code, _) = http
        .delete(&f.url(&format!("/api/v1/subscriptions/{enc}/screen")))
        .await;
    assert_eq!(code, 204);
    let (code, _) = http
        .get(&f.url(&format!("/api/v1/subscriptions/{enc}/screen")))
        .await;
    assert_eq!(code, 404);
    let (code, text) = http.get_text(&f.url("/metrics")).await;
    assert_eq!(code, 200);
    assert!(
        text.contains("tickwire_edge_events_total{topic=\"market-data/normalized/equities\"}"),
        "{text}"
    );
    // The OpenAPI document lists exactly the routes the router serves.
    let (code, doc) = http.get(&f.url("/api/v1/openapi.json")).await;
    assert_eq!(code, 200);
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for m in ops.as_object().expect("ops").keys() {
            documented.push((m.clone(), path.clone()));
        }
    }
    documented.sort();
    let mut served: Vec<(String, String)> = tickwire_api::rest::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    served.sort();
    assert_eq!(documented, served);
    // And every listed route is served (not the 404 fallback).
    for (m, p) in tickwire_api::rest::ROUTES {
        let p = p
            .replace("{symbol}", "AAPL")
            .replace("{topic}", &enc)
            .replace("{name}", "none");
        let code = http.request(m, &f.url(&p), "{}").await.0;
        assert!(
            code != 404 || p.contains("none") || p.contains("stream"),
            "{m} {p}: {code}"
        );
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_checked_on_rest_grpc_and_websocket() {
    let mut f = Fixture::start(|c| {
        c.auth = AuthConfig {
            enabled: true,
            allow_unauthenticated_remote: false,
            keys: vec![KeyConfig {
                name: "reader".into(),
                sha256: hash_key("k-read"),
                grants: vec![Grant {
                    topic: "market-data/*".into(),
                    rights: vec![Right::Read],
                }],
            }],
        };
    })
    .await;
    f.trade(0, "AAPL", "NASDAQ", 1.0);
    let http = reqwest_free::Client;
    let (code, v) = http.get(&f.url("/api/v1/topics")).await;
    assert_eq!(code, 401);
    assert!(!v.to_string().contains("k-read"));
    let (code, _) = http
        .get_auth(&f.url("/api/v1/topics"), "Bearer wrong")
        .await;
    assert_eq!(code, 401);
    let (code, _) = http
        .get_auth(&f.url("/api/v1/topics"), "Bearer k-read")
        .await;
    assert_eq!(code, 200);
    let (code, _) = http
        .request_auth(
            "post",
            &f.url("/api/v1/subscriptions"),
            r#"{"subscription":"s"}"#,
            "Bearer k-read",
        )
        .await;
    assert_eq!(code, 403, "read may not administer");
    let mut c = f.grpc().await;
    let e = c
        .stream_market_data(pb::StreamRequest::default())
        .await
        .expect_err("no key");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut r = tonic::Request::new(pb::StreamRequest::default());
    r.metadata_mut()
        .insert("authorization", "Bearer k-read".parse().expect("header"));
    assert!(c.stream_market_data(r).await.is_ok());
    let mut r = tonic::Request::new(pb::SubscriptionRequest {
        subscription: "s".into(),
        ..Default::default()
    });
    r.metadata_mut()
        .insert("authorization", "Bearer k-read".parse().expect("header"));
    assert_eq!(
        c.manage_subscription(r).await.expect_err("denied").code(),
        tonic::Code::PermissionDenied
    );
    let url = format!("ws://{}/api/v1/market-data/stream", f.edge().http_addr);
    let e = tokio_tungstenite::connect_async(url)
        .await
        .expect_err("no key");
    assert!(e.to_string().contains("401"), "{e}");
    f.stop().await;
}

#[path = "support/http.rs"]
mod reqwest_free;

/// A stream with `policy` on its own connection.
async fn stream_with(
    f: &Fixture,
    policy: pb::SlowConsumerPolicy,
) -> tonic::Streaming<pb::StreamResponse> {
    f.grpc()
        .await
        .stream_market_data(pb::StreamRequest {
            policy: policy as i32,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner()
}

/// Publishes `rounds` rounds of 32 trades over four symbols (price = the
/// round's number, so the latest per symbol is known), each round read in
/// full by `fast`, which must get every one in order.
async fn paced_by_a_fast_client(
    f: &mut Fixture,
    fast: &mut tonic::Streaming<pb::StreamResponse>,
    rounds: u64,
) {
    let mut seen = Vec::new();
    for r in 0..rounds {
        for k in 0..32u64 {
            f.trade(
                0,
                ["AAPL", "MSFT", "GOOG", "AMZN"][(k % 4) as usize],
                "NASDAQ",
                (r + 1) as f64,
            );
        }
        let (ev, notices) = collect(fast, 32).await;
        assert!(
            notices.is_empty(),
            "the fast client lost nothing: {notices:?}"
        );
        seen.extend(ev.into_iter().map(|e| e.1));
    }
    assert_eq!(
        seen,
        (1..=rounds * 32).collect::<Vec<_>>(),
        "the fast client got everything in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_conflating_client_ends_with_the_latest_price_of_every_instrument() {
    let mut f = Fixture::small_queues().await;
    let mut fast = stream_with(&f, pb::SlowConsumerPolicy::Drop).await;
    let mut slow = stream_with(&f, pb::SlowConsumerPolicy::Conflate).await;
    let rounds = 2000;
    paced_by_a_fast_client(&mut f, &mut fast, rounds).await;
    // The last word on each symbol: a price no round used.
    let last: Vec<u64> = ["AAPL", "MSFT", "GOOG", "AMZN"]
        .iter()
        .map(|s| f.trade(0, s, "NASDAQ", 99_999.0))
        .collect();
    let final_seq = *last.iter().max().expect("four");
    // Drain the slow client until it has the final sequence.
    let mut by_symbol: std::collections::HashMap<String, Vec<(u64, f64)>> = Default::default();
    let (mut conflated, mut notices, mut gaps) = (0u64, 0u64, 0u64);
    let mut prev = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    'drain: loop {
        match next_kind(&mut slow, deadline).await {
            R::Batch(b) => {
                for m in b.messages {
                    let md = m.metadata.expect("md");
                    let d = m.data.expect("data");
                    assert!(
                        md.sequence > prev,
                        "in sequence order: {} after {prev}",
                        md.sequence
                    );
                    prev = md.sequence;
                    conflated += u64::from(md.conflated);
                    by_symbol
                        .entry(d.symbol)
                        .or_default()
                        .push((md.sequence, d.price));
                    if md.sequence == final_seq {
                        break 'drain;
                    }
                }
            }
            R::SlowConsumer(n) => {
                assert_eq!(n.policy, "conflate");
                notices += 1;
            }
            R::Gap(_) => gaps += 1,
            _ => {}
        }
    }
    assert!(
        notices > 0,
        "the slow client was told it is being conflated"
    );
    assert!(conflated > 0, "some events arrived marked conflated");
    assert_eq!(
        gaps, 0,
        "conflation leaves no gap: each instrument's latest arrives"
    );
    for (sym, seq) in ["AAPL", "MSFT", "GOOG", "AMZN"].iter().zip(&last) {
        let got = by_symbol.get(*sym).expect("every instrument arrived");
        assert_eq!(
            got.last(),
            Some(&(*seq, 99_999.0)),
            "{sym}: the latest price arrived last"
        );
    }
    let total: usize = by_symbol.values().map(Vec::len).sum();
    assert!(
        total < (rounds * 32) as usize,
        "it was conflated, not sent in full ({total})"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_under_disconnect_is_told_and_ended_while_another_gets_everything() {
    let mut f = Fixture::small_queues().await;
    let mut fast = stream_with(&f, pb::SlowConsumerPolicy::Drop).await;
    let mut slow = stream_with(&f, pb::SlowConsumerPolicy::Disconnect).await;
    paced_by_a_fast_client(&mut f, &mut fast, 2000).await;
    // The slow client: what was queued, then the end notice, then
    // RESOURCE_EXHAUSTED; never a gap.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut prev = 0u64;
    let mut ended = None;
    let status = loop {
        match tokio::time::timeout_at(deadline, slow.message())
            .await
            .expect("no stall")
        {
            Ok(Some(m)) => match m.kind.expect("kind") {
                R::Batch(b) => {
                    assert!(ended.is_none(), "nothing after the end notice");
                    for m in b.messages {
                        let s = m.metadata.expect("md").sequence;
                        assert_eq!(s, prev + 1, "no gap before the end");
                        prev = s;
                    }
                }
                R::End(e) => ended = Some(e.reason),
                R::Gap(g) => panic!("a disconnect policy never skips: {g:?}"),
                _ => {}
            },
            Ok(None) => panic!("the stream must end with a status, not silently"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    let reason = ended.expect("an end notice came first");
    assert!(reason.contains("slow"), "the end notice says why: {reason}");
    // The other client carries on.
    f.trade(0, "AAPL", "NASDAQ", 7.0);
    let (ev, _) = collect(&mut fast, 1).await;
    assert_eq!(ev[0].1, 2000 * 32 + 1);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_each_get_their_symbols_in_order() {
    let mut f = Fixture::start(|_| {}).await;
    let symbols: Vec<String> = (0..50).map(|i| format!("S{i:02}")).collect();
    // Stream k takes symbols k % 50 and (k + 1) % 50, over 10 connections.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(f.grpc().await);
    }
    let mut streams = Vec::new();
    for k in 0..1000usize {
        let want = vec![symbols[k % 50].clone(), symbols[(k + 1) % 50].clone()];
        let s = clients[k % 10]
            .stream_market_data(pb::StreamRequest {
                symbols: want.clone(),
                ..Default::default()
            })
            .await
            .expect("stream")
            .into_inner();
        streams.push((want, s));
    }
    // 20 trades per symbol, alternating partitions by symbol.
    let mut published: std::collections::HashMap<String, Vec<(u32, u64)>> = Default::default();
    for round in 0..20 {
        for (i, s) in symbols.iter().enumerate() {
            let p = (i % 2) as u32;
            let seq = f.trade(p, s, "NASDAQ", (round + 1) as f64);
            published.entry(s.clone()).or_default().push((p, seq));
        }
    }
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|(want, mut s)| {
            tokio::spawn(async move {
                let mut ev = Vec::new();
                let mut notices = Vec::new();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                while ev.len() < 40 {
                    match tokio::time::timeout_at(deadline, s.message()).await {
                        Ok(Ok(Some(m))) => match m.kind.expect("kind") {
                            R::Batch(b) => ev.extend(b.messages.into_iter().map(|m| {
                                let md = m.metadata.expect("md");
                                (md.partition, md.sequence, m.data.expect("data").symbol)
                            })),
                            R::Heartbeat(_) => {}
                            other => notices.push(format!("{other:?}")),
                        },
                        other => {
                            notices.push(format!("stream ended: {other:?}"));
                            break;
                        }
                    }
                }
                (want, ev, notices)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        let (want, ev, notices) = t.await.expect("task");
        if !notices.is_empty() || ev.len() != 40 {
            failures.push(format!("{want:?}: {} events, {notices:?}", ev.len()));
            continue;
        }
        for sym in &want {
            let got: Vec<(u32, u64)> = ev
                .iter()
                .filter(|e| &e.2 == sym)
                .map(|e| (e.0, e.1))
                .collect();
            assert_eq!(
                &got, &published[sym],
                "{sym}: every event, in order, nothing else"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 1000 streams fell short; first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    f.stop().await;
}

fn filters_policy(json: &str) -> i64 {
    serde_json::from_str::<serde_json::Value>(json).expect("json")["policy"]
        .as_i64()
        .unwrap_or(-1)
}

/// The PostgreSQL that `scripts/services.sh up` starts
/// (TICKWIRE_POSTGRES_URL overrides).
fn postgres_url() -> String {
    std::env::var("TICKWIRE_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://tickwire:tickwire@127.0.0.1:5432/tickwire".into())
}

/// What a restart must keep, on the store at `url` (empty: the default
/// SQLite file in the node directory): a created subscription with its
/// filters, its paused status and creation time; a deleted one stays gone;
/// the topics table names the engine's topics; distribution stats are
/// written each interval with what was delivered.
async fn restart_keeps_the_command_side(url: String) {
    let mut f = Fixture::start(|c| {
        c.store_url = url.clone();
        c.stats_interval_secs = 1;
    })
    .await;
    let run = format!("{}", tickwire_proto::futex::realtime_ns());
    let (keep, gone) = (format!("keep-{run}"), format!("gone-{run}"));
    let mut g = f.grpc().await;
    let manage = |name: &str, action: pb::SubscriptionAction| pb::SubscriptionRequest {
        topic: TOPIC.into(),
        subscription: name.into(),
        action: action as i32,
        symbols: vec!["AAPL".into()],
        filters: Some(pb::FilterCriteria {
            exchanges: vec!["NASDAQ".into()],
            min_price: Some(10.5),
            ..Default::default()
        }),
        policy: pb::SlowConsumerPolicy::Conflate as i32,
        r#type: pb::SubscriptionType::Exclusive as i32,
        ..Default::default()
    };
    for name in [&keep, &gone] {
        g.manage_subscription(manage(name, pb::SubscriptionAction::Create))
            .await
            .expect("create");
    }
    let created = g
        .manage_subscription(manage(&keep, pb::SubscriptionAction::Pause))
        .await
        .expect("pause")
        .into_inner()
        .stats
        .expect("stats")
        .created_at_ns;
    g.manage_subscription(manage(&gone, pb::SubscriptionAction::Delete))
        .await
        .expect("delete");
    // Something delivered, for the stats rows.
    let mut s = g
        .stream_market_data(pb::StreamRequest {
            symbols: vec!["AAPL".into()],
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    for i in 0..5 {
        f.trade(0, "AAPL", "NASDAQ", 100.0 + f64::from(i));
    }
    let _ = collect(&mut s, 5).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(2500)).await;

    f.restart().await;
    let mut g = f.grpc().await;
    let st = g
        .manage_subscription(manage(&keep, pb::SubscriptionAction::Status))
        .await
        .expect("kept across the restart")
        .into_inner();
    assert_eq!(
        st.status,
        pb::SubscriptionStatus::Paused as i32,
        "still paused"
    );
    assert_eq!(
        st.stats.expect("stats").created_at_ns,
        created,
        "same creation time"
    );
    let e = g
        .manage_subscription(manage(&gone, pb::SubscriptionAction::Status))
        .await
        .expect_err("deleted stays deleted");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = g
        .manage_subscription(manage(&keep, pb::SubscriptionAction::Create))
        .await
        .expect_err("a second create of a kept subscription");
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    // The rows themselves.
    let store = &f.edge().store;
    let rows = store.subscriptions().await.expect("rows");
    let row = rows
        .iter()
        .find(|r| r.subscription_name == keep)
        .expect("the kept row");
    assert_eq!(row.status, "paused");
    assert_eq!(row.subscription_type, "Exclusive");
    assert_eq!(
        filters_policy(&row.filters),
        pb::SlowConsumerPolicy::Conflate as i64
    );
    assert_eq!(row.start_position, "Latest");
    let filters: serde_json::Value = serde_json::from_str(&row.filters).expect("json");
    assert_eq!(filters["symbols"], serde_json::json!(["AAPL"]));
    assert_eq!(filters["exchanges"], serde_json::json!(["NASDAQ"]));
    assert_eq!(filters["min_price"], serde_json::json!(10.5));
    assert!(!rows.iter().any(|r| r.subscription_name == gone));
    let topics = store.topics().await.expect("topics");
    let t = topics
        .iter()
        .find(|t| t.topic_name == TOPIC)
        .expect("the topic's row");
    assert_eq!((t.partitions, t.enabled), (2, true));
    // The engine's retention, as the row keeps it.
    assert_eq!(t.retention_policy, "7days");
    let stats = store.stats(TOPIC, 100).await.expect("stats rows");
    let delivered: i64 = stats.iter().map(|r| r.messages_distributed).sum();
    assert!(
        delivered >= 5,
        "the 5 delivered events are in distribution_stats ({stats:?})"
    );
    let bytes: i64 = stats.iter().map(|r| r.bytes_distributed).sum();
    assert!(bytes > 5 * 100, "and the bytes sent for them ({stats:?})");
    // Cleaned up, so the next run starts from what it creates.
    g.manage_subscription(manage(&keep, pb::SubscriptionAction::Delete))
        .await
        .expect("delete");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_subscriptions_topics_and_stats_in_the_default_sqlite_store() {
    restart_keeps_the_command_side(String::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_subscriptions_topics_and_stats_in_postgresql() {
    restart_keeps_the_command_side(postgres_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_unreachable_store_is_refused_at_start_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _w = TopicWriter::create(dir.path(), TOPIC, 2, 1024).expect("rings");
    for (url, says) in [
        ("mysql://x@127.0.0.1/db", "use sqlite://"),
        ("postgres://tickwire:secret@127.0.0.1:1/none", "127.0.0.1:1"),
    ] {
        let cfg = EdgeConfig {
            grpc_addr: "127.0.0.1:0".parse().expect("addr"),
            http_addr: "127.0.0.1:0".parse().expect("addr"),
            store_url: url.into(),
            ..EdgeConfig::default()
        };
        let engine = Arc::new(TestEngine::new(dir.path()));
        let e = match Edge::start(cfg, engine, CancellationToken::new()).await {
            Ok(_) => panic!("{url} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(says), "{url}: {e}");
        assert!(!e.contains("secret"), "no password in errors: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_rules_over_rest_apply_at_once_are_checked_and_survive_a_restart() {
    let mut f = Fixture::start(|_| {}).await;
    let http = reqwest_free::Client;
    let base = f.url("/api/v1/routing-rules");
    let rule = |priority: i64| {
        serde_json::json!({"rule_name": "vip", "source_pattern": "*/md-*", "target_topic": TOPIC,
            "routing_key_template": "{symbol}", "conditions": {"symbols": ["AAPL"]},
            "priority": priority})
    };
    let (st, body) = http.request("POST", &base, &rule(5).to_string()).await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(
        f.applied(),
        Some(vec![("vip".into(), 5)]),
        "in force at once"
    );
    let (st, _) = http.request("POST", &base, &rule(5).to_string()).await;
    assert_eq!(st, 409, "a taken name");
    let mut bad = rule(1);
    bad["rule_name"] = "other".into();
    bad["target_topic"] = "no/such".into();
    let (st, body) = http.request("POST", &base, &bad.to_string()).await;
    assert_eq!(st, 400);
    assert!(body.contains("\"field\":\"target_topic\""), "{body}");
    let mut bad = rule(1);
    bad["colour"] = "red".into();
    let (st, body) = http.request("POST", &base, &bad.to_string()).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("colour"), "{body}");
    assert_eq!(
        f.applied(),
        Some(vec![("vip".into(), 5)]),
        "refusals change nothing"
    );
    // Replace: the new priority applies at once; the path names the rule.
    let (st, body) = http
        .request("PUT", &format!("{base}/vip"), &rule(9).to_string())
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(f.applied(), Some(vec![("vip".into(), 9)]));
    let (st, body) = http
        .request("PUT", &format!("{base}/other"), &rule(9).to_string())
        .await;
    assert_eq!(st, 400);
    assert!(body.contains("rule_name"), "{body}");
    let (st, list) = http.get(&base).await;
    assert_eq!(st, 200);
    assert_eq!(list["rules"][0]["rule_name"], "vip");
    assert_eq!(list["rules"][0]["priority"], 9);
    assert_eq!(list["rules"][0]["conditions"]["symbols"][0], "AAPL");
    assert!(
        list["rules"][0]["created_at"]
            .as_str()
            .is_some_and(|t| t.len() > 10)
    );
    // A restart applies the stored rules before serving.
    f.restart().await;
    assert_eq!(
        f.applied(),
        Some(vec![("vip".into(), 9)]),
        "re-applied at start"
    );
    let base = f.url("/api/v1/routing-rules");
    let (st, _) = http.request("DELETE", &format!("{base}/vip"), "").await;
    assert_eq!(st, 204);
    assert_eq!(f.applied(), Some(vec![]), "gone at once");
    let (st, _) = http.request("DELETE", &format!("{base}/vip"), "").await;
    assert_eq!(st, 404);
    f.stop().await;
}

/// Every `.ring` file under `dir`.
fn ring_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(ring_files(&p));
        } else if p.extension().is_some_and(|x| x == "ring") {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_a_topic_whose_rings_are_deleted_are_told_and_ended() {
    let mut f = Fixture::start(|_| {}).await;
    let mut s = f
        .grpc()
        .await
        .stream_market_data(pb::StreamRequest {
            heartbeat_interval_ms: 100,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/api/v1/market-data/stream",
        f.edge().http_addr
    ))
    .await
    .expect("ws");
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        r#"{"type":"subscribe","payload":{}}"#.into(),
    ))
    .await
    .expect("subscribe");
    for i in 0..3 {
        f.trade(0, "AAPL", "NASDAQ", 1.0 + f64::from(i));
    }
    let (ev, _) = collect(&mut s, 3).await;
    assert_eq!(ev.len(), 3);
    let files = ring_files(f.dir.path());
    assert_eq!(files.len(), 2, "two partitions: {files:?}");
    for p in files {
        std::fs::remove_file(p).expect("remove ring");
    }
    // gRPC: an end notice naming the deletion, then NOT_FOUND; never a hang.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut end = None;
    let status = loop {
        match tokio::time::timeout_at(deadline, s.message())
            .await
            .expect("told within 10 s, not left hanging")
        {
            Ok(Some(m)) => {
                if let Some(R::End(e)) = m.kind {
                    end = Some(e.reason);
                }
            }
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    let reason = end.expect("an end notice first");
    assert!(reason.contains("deleted"), "{reason}");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    // WebSocket: an `end` message naming it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("told within 10 s")
            .expect("open")
            .expect("ok");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
            if v["type"] == "end" {
                assert!(v.to_string().contains("deleted"), "{v}");
                break;
            }
        }
    }
    // A new stream on it is refused.
    let e = f
        .grpc()
        .await
        .stream_market_data(pb::StreamRequest::default())
        .await
        .expect_err("no rings");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    f.stop().await;
}

/// Subscriptions that arrive together while the rings flood are all
/// answered: the dispatcher reads the rings ahead of new subscriptions once
/// for all of those queued, not up to 16 times for each (1000 subscribers
/// arriving under load waited minutes for that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_arriving_together_during_a_flood_are_all_answered() {
    let mut f = Fixture::start(|c| {
        c.queue_events = 64;
        c.queue_bytes = 64 * 1024;
    })
    .await;
    let client = f.grpc().await;
    // Streams taking everything, never read: every read of the rings is
    // encoded for each of them.
    let mut heavy = Vec::new();
    for _ in 0..100 {
        let s = client
            .clone()
            .stream_market_data(pb::StreamRequest::default())
            .await
            .expect("stream")
            .into_inner();
        heavy.push(s);
    }
    let (stop, flood) = f.flood();
    let opens: Vec<_> = (0..400)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.stream_market_data(pb::StreamRequest {
                    symbols: vec![format!("S{:02}", i % 50)],
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
            })
        })
        .collect();
    // Answered within a bound far above what it takes (about a second
    // here) and far below what 16 reads per subscription took.
    let answered =
        tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(opens)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    f.writer = Some(flood.join().expect("flood thread"));
    let answered = answered.expect("400 subscriptions answered during the flood");
    let refused: Vec<String> = answered
        .into_iter()
        .filter_map(|r| match r {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        })
        .collect();
    assert!(
        refused.is_empty(),
        "refused: {:?}",
        &refused[..refused.len().min(3)]
    );
    drop(heavy);
    f.stop().await;
}

/// However many subscribers stall, what the edge queues for all of them is
/// bounded by `queue_bytes_total`: a stalled client far under its own
/// limits is told that the edge's queues are full and skips to live, while
/// a client that keeps up gets every event in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_queue_budget_bounds_stalled_clients_and_never_one_that_keeps_up() {
    let mut f = Fixture::start(|c| {
        c.queue_bytes_total = 256 * 1024;
        c.max_batch = 16;
    })
    .await;
    let mut fast = stream_with(&f, pb::SlowConsumerPolicy::Drop).await;
    let mut slow = stream_with(&f, pb::SlowConsumerPolicy::Drop).await;
    // 64,000 events: far more than the budget and the slow client's
    // HTTP/2 and TCP buffers hold, far less than its own 16 MiB queue.
    paced_by_a_fast_client(&mut f, &mut fast, 2000).await;
    let budget = f.edge().state.hub.budget().clone();
    assert!(
        budget.used() <= budget.max() + 2 * tickwire_api::dispatch::outbox::BUDGET_FLOOR,
        "{} bytes queued with a budget of {}",
        budget.used(),
        budget.max()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut events = 0;
    let detail = loop {
        match next_kind(&mut slow, deadline).await {
            R::Batch(b) => events += b.messages.len(),
            R::SlowConsumer(n) => break n.detail,
            _ => {}
        }
    };
    assert!(
        detail.contains("edge.queue_bytes_total"),
        "the slow client is told which limit: {detail}"
    );
    assert!(events < 64_000, "{events} events before the notice");
    drop(slow);
    // What the stalled client left queued goes back to the budget.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while budget.used() > 64 * 1024 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} bytes still queued after the slow client left",
            budget.used()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f.stop().await;
}

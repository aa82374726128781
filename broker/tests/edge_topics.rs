//! Topics made, grown and deleted at run time through the edge of a real
//! broker: REST and gRPC admin, a gRPC stream and a shared-memory reader on
//! the new topic, routing rules that hold a topic, and restarts on the same
//! node directory and command store.

use std::time::Duration;

use shm_client::{Event, Start, Subscriber};
use tickwire_api::{Edge, EdgeConfig};
use tickwire_broker::config::{Config, TopicConfig};
use tickwire_broker::edge::BrokerEngine;
use tickwire_broker::engine::{Broker, Ingest};
use tickwire_proto::FrameBody;
use tickwire_proto::pb;
use tickwire_proto::pb::stream_response::Kind as R;
use tickwire_proto::symbology::Instrument;
use tokio_util::sync::CancellationToken;

#[path = "../../api/tests/support/http.rs"]
mod http;

struct Node {
    broker: Option<Broker>,
    edge: Option<Edge>,
    cancel: CancellationToken,
}

impl Node {
    async fn start(dir: &std::path::Path, store_url: &str) -> Node {
        let mut c = Config::default();
        c.node.dir = Some(dir.to_path_buf());
        c.synthetic.enabled = false;
        c.shards.count = 2;
        c.topics = vec![TopicConfig {
            name: "md/eq".into(),
            partitions: 2,
            capacity: 1 << 12,
            ..TopicConfig::default()
        }];
        let broker = Broker::start(&c).expect("broker");
        let engine = std::sync::Arc::new(BrokerEngine::new(&broker));
        let cancel = CancellationToken::new();
        let cfg = EdgeConfig {
            grpc_addr: "127.0.0.1:0".parse().expect("addr"),
            http_addr: "127.0.0.1:0".parse().expect("addr"),
            store_url: store_url.into(),
            ..EdgeConfig::default()
        };
        let edge = Edge::start(cfg, engine, cancel.clone())
            .await
            .expect("edge");
        Node {
            broker: Some(broker),
            edge: Some(edge),
            cancel,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.edge().http_addr)
    }

    fn edge(&self) -> &Edge {
        self.edge.as_ref().expect("running")
    }

    /// A gRPC stream of everything on `topic`.
    async fn stream(&self, topic: &str) -> tonic::Streaming<pb::StreamResponse> {
        pb::market_data_stream_client::MarketDataStreamClient::connect(format!(
            "http://{}",
            self.edge().grpc_addr
        ))
        .await
        .expect("connect")
        .stream_market_data(pb::StreamRequest {
            topic: topic.into(),
            heartbeat_interval_ms: 100,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner()
    }

    fn broker(&self) -> &Broker {
        self.broker.as_ref().expect("running")
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(e) = self.edge.take() {
            tokio::time::timeout(Duration::from_secs(10), e.join())
                .await
                .expect("edge stops promptly");
        }
        if let Some(b) = self.broker.take() {
            tokio::task::spawn_blocking(move || b.shutdown())
                .await
                .expect("broker stops");
        }
    }
}

/// Sends one trade of each symbol to `topic`, waiting out backpressure.
fn send(ingest: &mut Ingest, topic: &str, symbols: &[String]) {
    let t = ingest.resolver().topic(topic).expect("routable");
    for s in symbols {
        let route = ingest
            .resolver()
            .route(
                t,
                &Instrument {
                    symbol: s.clone(),
                    exchange: "XFX".into(),
                    currency: "USD".into(),
                    size_decimals: 0,
                },
            )
            .expect("route");
        let body = FrameBody {
            kind: tickwire_proto::Kind::Trade.code(),
            px_a: tickwire_proto::frame::PRICE_SCALE,
            size_a: 1,
            ts_event: tickwire_proto::futex::realtime_ns(),
            ..FrameBody::default()
        };
        while ingest.try_send(&route, &body, None).is_err() {
            std::thread::yield_now();
        }
    }
}

/// Reads `n` events from a stream; returns (partition, sequence) in the
/// order received, checking each partition's sequences are contiguous.
async fn events(s: &mut tonic::Streaming<pb::StreamResponse>, n: usize) -> Vec<(u32, u64)> {
    let mut out: Vec<(u32, u64)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        let m = tokio::time::timeout_at(deadline, s.message())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} events arrived", out.len()))
            .expect("stream ok")
            .expect("open");
        if let Some(R::Batch(b)) = m.kind {
            for m in b.messages {
                let md = m.metadata.expect("metadata");
                if let Some(&(_, prev)) = out.iter().rev().find(|(p, _)| *p == md.partition) {
                    assert_eq!(md.sequence, prev + 1, "partition {} in order", md.partition);
                }
                out.push((md.partition, md.sequence));
            }
        }
    }
    out
}

fn symbols(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_made_at_run_time_is_served_grown_kept_across_restarts_and_deleted_on_sqlite() {
    lifecycle("", "rt/fx").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_made_at_run_time_is_served_grown_kept_across_restarts_and_deleted_on_postgresql() {
    let url = std::env::var("TICKWIRE_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://tickwire:tickwire@127.0.0.1:5432/tickwire".into());
    // The database outlives the run: a name of its own, so a row left by
    // an earlier run that stopped half-way is never restored here.
    let topic = format!(
        "rt/pg{}x{}",
        std::process::id(),
        tickwire_proto::futex::realtime_ns() % 1_000_000
    );
    lifecycle(&url, &topic).await;
}

/// Create, stream, grow, restart, refuse while a rule holds it, delete,
/// restart, on the command store at `store_url` (empty: SQLite in the node
/// directory), for run-time topic `rt`.
async fn lifecycle(store_url: &str, rt: &str) {
    let (rt_path, dir) = (
        rt.replace('/', "%2F"),
        tempfile::tempdir().expect("tempdir"),
    );
    let http = http::Client;
    let node = Node::start(dir.path(), store_url).await;

    // Create over REST; bad requests name their field and change nothing.
    let (code, v) = http
        .post(
            &node.url("/api/v1/topics"),
            &format!(r#"{{"topic":"{rt}","partitions":2,"capacity":1024}}"#),
        )
        .await;
    assert_eq!(code, 201, "{v}");
    assert_eq!(
        (v["partitions"].as_u64(), v["origin"].as_str()),
        (Some(2), Some("runtime"))
    );
    let (code, _) = http
        .post(
            &node.url("/api/v1/topics"),
            &format!(r#"{{"topic":"{rt}","partitions":2}}"#),
        )
        .await;
    assert_eq!(code, 409, "exists");
    for (body, field) in [
        (r#"{"topic":"bad name!","partitions":1}"#, "name"),
        (r#"{"topic":"ok/x","partitions":0}"#, "partitions"),
        (
            r#"{"topic":"ok/x","partitions":1,"capacity":1000}"#,
            "capacity",
        ),
        (
            r#"{"topic":"ok/x","partitions":1,"retention_policy":"soon"}"#,
            "retention_policy",
        ),
    ] {
        let (code, v) = http.post(&node.url("/api/v1/topics"), body).await;
        assert_eq!(code, 400, "{body}: {v}");
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
    }
    let listed = admin_client(&node)
        .await
        .list_topics(pb::ListTopicsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed
            .topics
            .iter()
            .any(|t| t.topic == rt && t.origin == "runtime")
    );

    // A gRPC stream and a shared-memory reader on it get what is sent.
    let mut stream = node.stream(rt).await;
    let mut shm = Subscriber::builder(rt)
        .node_dir(dir.path())
        .start(Start::Earliest)
        .open()
        .expect("shm reader");
    let mut ingest = node.broker().ingest(1);
    send(&mut ingest, rt, &symbols("A", 20));
    let got = events(&mut stream, 20).await;
    assert_eq!(got.len(), 20);
    let mut shm_n = 0;
    while shm_n < 20 {
        match shm.recv_timeout(Duration::from_secs(10)) {
            Some(Event::Tick(_)) => shm_n += 1,
            Some(_) => {}
            None => panic!("shm reader got {shm_n} of 20"),
        }
    }

    // Grow over REST (never shrink); the open stream gets the new partitions.
    let (code, v) = http
        .patch(
            &node.url(&format!("/api/v1/topics/{rt_path}")),
            r#"{"partitions":1}"#,
        )
        .await;
    assert_eq!(
        (code, v["error"]["field"].as_str()),
        (400, Some("partitions")),
        "{v}"
    );
    let (code, v) = http
        .patch(
            &node.url(&format!("/api/v1/topics/{rt_path}")),
            r#"{"partitions":4}"#,
        )
        .await;
    assert_eq!((code, v["partitions"].as_u64()), (200, Some(4)), "{v}");
    send(&mut ingest, rt, &symbols("B", 40));
    let got = events(&mut stream, 40).await;
    assert!(
        got.iter().any(|(p, _)| *p >= 2),
        "the grown partitions reach the open stream: {got:?}"
    );
    drop(stream);
    drop(shm);
    drop(ingest);
    node.stop().await;

    // A restart keeps the run-time topic, its partitions and its sequences.
    let node = Node::start(dir.path(), store_url).await;
    let (code, v) = http
        .get(&node.url(&format!("/api/v1/topics/{rt_path}")))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (
            v["partitions"].as_u64(),
            v["capacity"].as_u64(),
            v["origin"].as_str()
        ),
        (Some(4), Some(1024), Some("runtime"))
    );
    let mut stream = node.stream(rt).await;
    let mut ingest = node.broker().ingest(1);
    send(&mut ingest, rt, &symbols("A", 20));
    let got = events(&mut stream, 20).await;
    assert!(
        got.iter().all(|(_, seq)| *seq > 0),
        "sequences continue after the restart: {got:?}"
    );

    // A routing rule holds the topic; without it, deleting ends the stream.
    let (code, v) = http
        .post(
            &node.url("/api/v1/routing-rules"),
            &format!(
                r#"{{"rule_name":"fx","source_pattern":"*","target_topic":"{rt}","enabled":false}}"#
            ),
        )
        .await;
    assert_eq!(code, 201, "{v}");
    let (code, v) = http
        .delete(&node.url(&format!("/api/v1/topics/{rt_path}")))
        .await;
    assert_eq!(code, 409, "{v}");
    assert!(v.to_string().contains("fx"), "names the rule: {v}");
    let (code, _) = http.delete(&node.url("/api/v1/routing-rules/fx")).await;
    assert_eq!(code, 204);
    let (code, v) = http
        .patch(&node.url("/api/v1/topics/md%2Feq"), r#"{"partitions":8}"#)
        .await;
    assert_eq!(
        code, 409,
        "a configured topic grows in the configuration: {v}"
    );
    let (code, v) = http.delete(&node.url("/api/v1/topics/md%2Feq")).await;
    assert_eq!(
        code, 409,
        "a configured topic is deleted in the configuration: {v}"
    );
    assert!(v.to_string().contains("configuration"), "{v}");
    let deleted = admin_client(&node)
        .await
        .delete_topic(pb::TopicRequest { topic: rt.into() })
        .await
        .expect("deleted over gRPC")
        .into_inner();
    assert!(deleted.deleted);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        match tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("told within 10 s, not left hanging")
        {
            Ok(Some(_)) => {}
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(matches!(
        Subscriber::builder(rt).node_dir(dir.path()).open(),
        Err(shm_client::Error::NoSuchTopic { .. })
    ));
    assert!(ingest.resolver().topic(rt).is_none());
    drop(ingest);
    node.stop().await;

    // And a restart does not bring it back.
    let node = Node::start(dir.path(), store_url).await;
    let (code, _) = http
        .get(&node.url(&format!("/api/v1/topics/{rt_path}")))
        .await;
    assert_eq!(code, 404);
    node.stop().await;
}

async fn admin_client(
    node: &Node,
) -> pb::topic_manager_client::TopicManagerClient<tonic::transport::Channel> {
    pb::topic_manager_client::TopicManagerClient::connect(format!(
        "http://{}",
        node.edge().grpc_addr
    ))
    .await
    .expect("connect")
}

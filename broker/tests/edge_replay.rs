//! Remote streams that start in the past: replayed from the journal by the
//! edge, then joined to live with no gap and no duplicate.

use std::collections::HashMap;
use std::time::Duration;

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

const TOPIC: &str = "md/replay";

/// Sends trades with event times `t0 + i` and source sequences `i`.
fn send(ingest: &mut Ingest, from: u64, to: u64, t0: u64) {
    let t = ingest.resolver().topic(TOPIC).expect("routable");
    let routes: Vec<_> = (0..8)
        .map(|k| {
            ingest
                .resolver()
                .route(
                    t,
                    &Instrument {
                        symbol: format!("R{k}"),
                        exchange: "XNAS".into(),
                        currency: "USD".into(),
                        size_decimals: 0,
                    },
                )
                .expect("route")
        })
        .collect();
    for i in from..=to {
        let mut body = FrameBody::trade(0, t0 + i, 1_000_000_000 + i as i64, 1);
        body.source_seq = i;
        while ingest
            .try_send(&routes[(i % 8) as usize], &body, None)
            .is_err()
        {
            std::thread::yield_now();
        }
    }
}

/// Reads a stream until `n` events came; every partition's sequences must
/// be contiguous and a gap notice fails the test. Returns (partition,
/// sequence, epoch, event time) in order.
async fn read(s: &mut tonic::Streaming<pb::StreamResponse>, n: usize) -> Vec<(u32, u64, u64, u64)> {
    let mut out: Vec<(u32, u64, u64, u64)> = Vec::new();
    let mut next: HashMap<u32, u64> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        let m = tokio::time::timeout_at(deadline, s.message())
            .await
            .unwrap_or_else(|_| {
                let mut firsts: HashMap<u32, (u64, u64, usize)> = HashMap::new();
                for e in &out {
                    let f = firsts.entry(e.0).or_insert((e.1, e.1, 0));
                    f.1 = e.1;
                    f.2 += 1;
                }
                panic!(
                    "{} of {n} events arrived: (first, last, count) per partition {firsts:?}",
                    out.len()
                )
            })
            .expect("stream ok")
            .expect("open");
        match m.kind {
            Some(R::Batch(b)) => {
                for m in b.messages {
                    let md = m.metadata.expect("metadata");
                    if let Some(&want) = next.get(&md.partition) {
                        assert_eq!(md.sequence, want, "partition {} in order", md.partition);
                    }
                    next.insert(md.partition, md.sequence + 1);
                    let ts = m.data.map_or(0, |d| d.timestamp_ns as u64);
                    out.push((md.partition, md.sequence, md.epoch, ts));
                }
            }
            Some(R::Gap(g)) => panic!("a replay merged into live has no gap: {g:?}"),
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_from_earliest_and_from_a_time_replay_the_journal_and_join_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Config::default();
    c.node.dir = Some(dir.path().to_path_buf());
    c.synthetic.enabled = false;
    // Rings of 1024: most of the history has left them.
    c.topics = vec![TopicConfig {
        name: TOPIC.into(),
        partitions: 2,
        capacity: 1024,
        ..TopicConfig::default()
    }];
    let broker = Broker::start(&c).expect("broker");
    let mut ingest = broker.ingest(1);
    let t0 = 1_800_000_000_000_000_000u64;
    let history = 20_000u64;
    send(&mut ingest, 1, history, t0);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while broker.journal_stats().expect("journal").events < history {
        assert!(std::time::Instant::now() < deadline, "journaled");
        std::thread::sleep(Duration::from_millis(10));
    }
    let engine = std::sync::Arc::new(BrokerEngine::new(&broker));
    let cancel = CancellationToken::new();
    let edge = Edge::start(
        EdgeConfig {
            grpc_addr: "127.0.0.1:0".parse().expect("addr"),
            http_addr: "127.0.0.1:0".parse().expect("addr"),
            ..EdgeConfig::default()
        },
        engine,
        cancel.clone(),
    )
    .await
    .expect("edge");
    let mut client = pb::market_data_stream_client::MarketDataStreamClient::connect(format!(
        "http://{}",
        edge.grpc_addr
    ))
    .await
    .expect("connect");
    let request = |position: pb::MessagePosition, start_time_ns: i64| pb::StreamRequest {
        topic: TOPIC.into(),
        start_position: position as i32,
        start_time_ns,
        heartbeat_interval_ms: 100,
        ..Default::default()
    };
    let mut earliest = client
        .stream_market_data(request(pb::MessagePosition::Earliest, 0))
        .await
        .expect("stream")
        .into_inner();
    // From the event time of source sequence 15000 on: 5001 of the history.
    let mut from_time = client
        .stream_market_data(request(
            pb::MessagePosition::Timestamp,
            (t0 + 15_000) as i64,
        ))
        .await
        .expect("stream")
        .into_inner();
    // Live events while they replay.
    let live = tokio::task::spawn_blocking(move || {
        send(&mut ingest, history + 1, history + 3_000, t0);
        ingest
    });
    let all = read(&mut earliest, (history + 3_000) as usize).await;
    let mut per_partition: HashMap<u32, Vec<u64>> = HashMap::new();
    for (p, s, epoch, _) in &all {
        assert_eq!(*epoch, 1);
        per_partition.entry(*p).or_default().push(*s);
    }
    for (p, seqs) in &per_partition {
        assert_eq!(seqs[0], 1, "partition {p} from its first event");
        assert_eq!(*seqs.last().expect("some") as usize, seqs.len());
    }
    assert_eq!(all.len() as u64, history + 3_000, "every event once");
    let timed = read(&mut from_time, 5_001 + 3_000).await;
    assert_eq!(timed.len(), 8_001);
    // Each partition starts at its first event at or after the time.
    for p in 0..2 {
        let first = timed
            .iter()
            .find(|e| e.0 == p)
            .expect("events of the partition");
        assert!(
            first.3 >= t0 + 15_000,
            "partition {p} starts at or after the time"
        );
        let before = all
            .iter()
            .filter(|e| e.0 == p && e.1 == first.1 - 1)
            .map(|e| e.3)
            .next();
        assert!(
            before.is_none_or(|t| t < t0 + 15_000),
            "partition {p}: the event before is older"
        );
    }
    let _ingest = live.await.expect("live");
    // History: the raw events of a range, then the end of the stream.
    let range = |symbol: &str, from: u64, to: u64| pb::HistoricalRequest {
        topic: TOPIC.into(),
        symbol: symbol.into(),
        start_time_ns: (t0 + from) as i64,
        end_time_ns: (t0 + to) as i64,
        ..Default::default()
    };
    for (symbol, want) in [("", 7_000), ("R3", 875)] {
        let mut h = client
            .stream_historical_data(range(symbol, 5_000, 12_000))
            .await
            .expect("history")
            .into_inner();
        let mut got = Vec::new();
        let mut ended = false;
        while let Some(m) = tokio::time::timeout(Duration::from_secs(20), h.message())
            .await
            .expect("history in time")
            .expect("ok")
        {
            match m.kind {
                Some(R::Batch(b)) => {
                    for m in b.messages {
                        let d = m.data.expect("data");
                        got.push((d.timestamp_ns as u64 - t0, d.symbol));
                    }
                }
                Some(R::End(e)) => {
                    assert_eq!(e.reason, "complete");
                    ended = true;
                }
                other => panic!("history sends events then the end: {other:?}"),
            }
        }
        assert!(ended, "the stream says it is complete");
        assert_eq!(got.len(), want, "symbol {symbol:?}");
        let mut times: Vec<u64> = got.iter().map(|g| g.0).collect();
        times.sort_unstable();
        assert_eq!(
            times.first(),
            Some(&if symbol.is_empty() { 5_000 } else { 5_003 })
        );
        assert!(times.iter().all(|&t| (5_000..12_000).contains(&t)));
        assert!(symbol.is_empty() || got.iter().all(|g| g.1 == symbol));
    }
    for (req, field) in [
        (
            pb::HistoricalRequest {
                interval: "2m".into(),
                ..range("", 1, 2)
            },
            "interval",
        ),
        (range("", 5, 5), "end_time_ns"),
        (
            pb::HistoricalRequest {
                start_time_ns: 0,
                ..range("", 1, 2)
            },
            "start_time_ns",
        ),
        (
            pb::HistoricalRequest {
                limit: 20_000_000,
                ..range("", 1, 2)
            },
            "limit",
        ),
    ] {
        let e = client
            .stream_historical_data(req)
            .await
            .expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(field), "{field}: {e:?}");
    }
    // Bars of a range that has none: just the end.
    let mut bars = client
        .stream_historical_data(pb::HistoricalRequest {
            interval: "1m".into(),
            ..range("", 1, 2)
        })
        .await
        .expect("bars")
        .into_inner();
    match bars
        .message()
        .await
        .expect("a message")
        .and_then(|m| m.kind)
    {
        Some(R::End(e)) => assert_eq!(e.reason, "complete"),
        other => panic!("no bars in 1970, then the end: {other:?}"),
    }
    // The journal's counters are on /metrics.
    let (code, text) = http::Client
        .get_text(&format!("http://{}/metrics", edge.http_addr))
        .await;
    assert_eq!(code, 200);
    let journaled: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tickwire_journal_events_total "))
        .and_then(|v| v.parse().ok())
        .expect("tickwire_journal_events_total");
    assert!(journaled >= history, "{journaled}");
    assert!(
        text.contains("tickwire_journal_write_errors_total 0"),
        "{text}"
    );
    // A timestamp of 0 is refused, naming the field.
    let err = client
        .stream_market_data(request(pb::MessagePosition::Timestamp, 0))
        .await
        .expect_err("refused");
    assert!(err.message().contains("start_time_ns"), "{err:?}");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), edge.join())
        .await
        .expect("edge stops promptly");
    tokio::task::spawn_blocking(move || broker.shutdown())
        .await
        .expect("broker stops");
}

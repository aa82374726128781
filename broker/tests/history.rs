//! History: one-minute bars built from the journal, 5m/1h bars resampled
//! with Polars, over REST and gRPC, equal to a plain model of the trades
//! sent; parameter errors; late events; a restart that neither loses nor
//! doubles a bar; Parquet export.

#![cfg(feature = "history")]

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use tickwire_api::{Edge, EdgeConfig};
use tickwire_broker::config::{Config, TopicConfig};
use tickwire_broker::edge::BrokerEngine;
use tickwire_broker::engine::{Broker, Ingest};
use tickwire_proto::FrameBody;
use tickwire_proto::bars::{Interval, MINUTE_NS};
use tickwire_proto::pb;
use tickwire_proto::pb::stream_response::Kind as R;
use tokio_util::sync::CancellationToken;

#[path = "../../api/tests/support/http.rs"]
mod http;
#[path = "support/routes.rs"]
mod support;

const TOPIC: &str = "md/history";
const PX: i64 = 1_000_000_000;

/// One event sent: (instrument index, trade?, time, price, size).
type Sent = (usize, bool, u64, i64, u32);

/// Events of minutes `from..to` after `t0`: SYM0 trades and quotes (some
/// minutes only quotes), SYM1 trades (not every minute), SYM2 only quotes.
fn events(t0: u64, from: u64, to: u64) -> Vec<Sent> {
    let mut out = Vec::new();
    for m in from..to {
        for j in 0..5u64 {
            let t = t0 + m * MINUTE_NS + j * 7_000_000_000 + 1;
            let wiggle = ((m * 31 + j * 17) % 23) as i64;
            // SYM0 also quotes (its quotes and trades go to different
            // partitions), and some minutes it only quotes.
            if m % 11 != 5 {
                out.push((0, true, t, (100 + wiggle) * PX, (1 + j * m % 9) as u32));
            }
            out.push((0, false, t + 3, (99 + wiggle) * PX, 0));
            if m % 7 != 3 {
                out.push((1, true, t + 5, (50 + wiggle / 2) * PX + 250_000_000, 10));
            }
            out.push((2, false, t + 9, (20 + wiggle) * PX, 0));
        }
    }
    out
}

fn send(ingest: &mut Ingest, evs: &[Sent]) {
    let routes = support::routes(ingest, TOPIC, 3);
    for &(i, trade, t, px, size) in evs {
        let body = if trade {
            FrameBody::trade(0, t, px, size)
        } else {
            // A quote of px - 0.5 / px + 0.5: its mid is px.
            FrameBody::quote(0, t, (px - PX / 2, 5), (px + PX / 2, 7))
        };
        while ingest.try_send(&routes[i], &body, None).is_err() {
            std::thread::yield_now();
        }
    }
}

/// (start, open, high, low, close, volume, trades, notional, mid).
type ModelBar = (u64, i64, i64, i64, i64, u64, u32, i128, bool);

/// The model: one [`ModelBar`] per bar of `interval`, for instrument `i`.
fn model(evs: &[Sent], i: usize, interval: Interval) -> Vec<ModelBar> {
    let mut groups: BTreeMap<u64, Vec<&Sent>> = BTreeMap::new();
    for e in evs.iter().filter(|e| e.0 == i) {
        groups.entry(interval.bucket(e.2)).or_default().push(e);
    }
    groups
        .into_iter()
        .map(|(start, g)| {
            let trades: Vec<&&Sent> = g.iter().filter(|e| e.1).collect();
            let mid = trades.is_empty();
            let use_: Vec<&&Sent> = if mid { g.iter().collect() } else { trades };
            (
                start,
                use_[0].3,
                use_.iter().map(|e| e.3).max().unwrap_or(0),
                use_.iter().map(|e| e.3).min().unwrap_or(0),
                use_[use_.len() - 1].3,
                use_.iter().map(|e| u64::from(e.4)).sum(),
                if mid { 0 } else { use_.len() as u32 },
                use_.iter().map(|e| i128::from(e.3) * i128::from(e.4)).sum(),
                mid,
            )
        })
        .collect()
}

fn px(v: &Value) -> i64 {
    let s = v.to_string();
    let d: tickwire_proto::json::Decimal = s.parse().unwrap_or_else(|_| panic!("decimal {s}"));
    d.mantissa * 10i64.pow(9 - u32::from(d.scale))
}

/// REST bars as the model's tuples (notional from vwap is not exact: left 0).
fn as_model(data: &[Value]) -> Vec<ModelBar> {
    data.iter()
        .map(|b| {
            (
                b["timestamp_ns"].as_u64().expect("timestamp_ns"),
                px(&b["open"]),
                px(&b["high"]),
                px(&b["low"]),
                px(&b["close"]),
                b["volume"].as_u64().expect("volume"),
                b["trade_count"].as_u64().expect("trade_count") as u32,
                0,
                b["price_source"] == "mid",
            )
        })
        .collect()
}

fn without_notional(m: Vec<ModelBar>) -> Vec<ModelBar> {
    m.into_iter()
        .map(|mut b| {
            b.7 = 0;
            b
        })
        .collect()
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.node.dir = Some(dir.join("node"));
    c.journal.dir = Some(dir.join("journal"));
    c.synthetic.enabled = false;
    c.history.lateness = "1s".into();
    c.topics = vec![TopicConfig {
        name: TOPIC.into(),
        partitions: 4,
        capacity: 4096,
        ..TopicConfig::default()
    }];
    c
}

async fn edge(broker: &Broker, cancel: &CancellationToken) -> Edge {
    Edge::start(
        EdgeConfig {
            grpc_addr: "127.0.0.1:0".parse().expect("addr"),
            http_addr: "127.0.0.1:0".parse().expect("addr"),
            ..EdgeConfig::default()
        },
        std::sync::Arc::new(BrokerEngine::new(broker)),
        cancel.clone(),
    )
    .await
    .expect("edge")
}

/// All 1m bars of `sym` in [t0, t0 + minutes), following the cursor with
/// pages of `page`.
async fn all_bars(base: &str, sym: &str, t0: u64, minutes: u64, page: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = format!(
            "{base}/api/v1/market-data/{sym}/history?topic=md%2Fhistory&start_time={t0}&end_time={}&limit={page}{}",
            t0 + minutes * MINUTE_NS,
            cursor
                .as_ref()
                .map_or(String::new(), |c| format!("&cursor={c}"))
        );
        let (code, body) = http::Client.get(&url).await;
        assert_eq!(code, 200, "{body}");
        let data = body["data"].as_array().expect("data").clone();
        assert_eq!(body["count"].as_u64(), Some(data.len() as u64));
        assert!(data.len() <= page);
        out.extend(data);
        match body["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(body["has_more"], true);
                cursor = Some(c.to_string());
            }
            None => {
                assert_eq!(body["has_more"], false);
                return out;
            }
        }
    }
}

/// Waits until `sym` has `n` one-minute bars in the range, all complete
/// (every partition has closed their minutes: an instrument's trades and
/// quotes are built by different partitions).
async fn wait_bars(base: &str, sym: &str, t0: u64, minutes: u64, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let bars = all_bars(base, sym, t0, minutes, 10_000).await;
        let got = bars.len();
        if got >= n && bars.iter().all(|b| b["complete"] == true) {
            assert_eq!(got, n, "no more bars than minutes with events");
            return;
        }
        if std::time::Instant::now() >= deadline {
            let (_, m) = http::Client.get_text(&format!("{base}/metrics")).await;
            panic!(
                "{got} of {n} bars of {sym} built: {}",
                m.lines()
                    .filter(|l| l.starts_with("tickwire_bars") || l.starts_with("tickwire_journal"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Once built, every symbol's 1m bars over `minutes` from `t0` equal the
/// model of `all` the events sent.
async fn bars_are_the_model(base: &str, t0: u64, minutes: u64, all: &[Sent], when: &str) {
    for (i, sym) in ["SYM0", "SYM1", "SYM2"].iter().enumerate() {
        wait_bars(base, sym, t0, minutes, model(all, i, Interval::M1).len()).await;
        let got = all_bars(base, sym, t0, minutes, 10_000).await;
        assert_eq!(
            as_model(&got),
            without_notional(model(all, i, Interval::M1)),
            "{sym} {when}"
        );
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bars_over_rest_and_grpc_equal_a_model_of_the_trades_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = config(dir.path());
    // Four hours back, on the hour: every 1h bucket sent is complete.
    let now = tickwire_proto::futex::realtime_ns();
    let t0 = Interval::H1.bucket(now) - 4 * 60 * MINUTE_NS;
    let first = events(t0, 0, 150);
    let cancel = CancellationToken::new();
    let broker = Broker::start(&c).expect("broker");
    let mut ingest = broker.ingest(1);
    let r0 = &support::routes(&mut ingest, TOPIC, 1)[0];
    assert_ne!(
        r0.partition(tickwire_proto::Kind::Trade),
        r0.partition(tickwire_proto::Kind::Quote),
        "SYM0's trades and quotes go to different partitions (the default routing key has the kind)"
    );
    send(&mut ingest, &first);
    let e = edge(&broker, &cancel).await;
    let base = format!("http://{}", e.http_addr);
    for (i, sym) in ["SYM0", "SYM1", "SYM2"].iter().enumerate() {
        wait_bars(&base, sym, t0, 240, model(&first, i, Interval::M1).len()).await;
    }

    // 1m bars, paged 40 at a time, equal the model; SYM2 has mid bars.
    for (i, sym) in ["SYM0", "SYM1", "SYM2"].iter().enumerate() {
        let got = all_bars(&base, sym, t0, 240, 40).await;
        assert_eq!(
            as_model(&got),
            without_notional(model(&first, i, Interval::M1)),
            "{sym}"
        );
        assert!(got.iter().all(|b| b["complete"] == true));
    }
    let (_, sym2) = http::Client
        .get(&format!(
            "{base}/api/v1/market-data/SYM2/history?topic=md%2Fhistory&start_time={t0}&limit=1"
        ))
        .await;
    assert_eq!(sym2["data"][0]["price_source"], "mid");
    assert_eq!(sym2["data"][0]["vwap"], Value::Null);
    let (_, sym0) = http::Client
        .get(&format!(
            "{base}/api/v1/market-data/SYM0/history?topic=md%2Fhistory&start_time={t0}&limit=1"
        ))
        .await;
    let m0 = model(&first, 0, Interval::M1)[0];
    assert_eq!(
        px(&sym0["data"][0]["vwap"]),
        (m0.7 / i128::from(m0.5)) as i64,
        "vwap"
    );
    assert_eq!(sym0["exchange"], "XNAS");

    // 5m and 1h bars (Polars) equal the model's.
    for (interval, name) in [(Interval::M5, "5m"), (Interval::H1, "1h")] {
        for (i, sym) in ["SYM0", "SYM1", "SYM2"].iter().enumerate() {
            let (code, body) = http::Client
                .get(&format!(
                    "{base}/api/v1/market-data/{sym}/history?topic=md%2Fhistory&interval={name}&start_time={t0}&end_time={}&limit=1000",
                    t0 + 240 * MINUTE_NS
                ))
                .await;
            assert_eq!(code, 200, "{body}");
            let data = body["data"].as_array().expect("data");
            assert_eq!(
                as_model(data),
                without_notional(model(&first, i, interval)),
                "{sym} {name}"
            );
            // Complete: every minute closed. The builder closed through
            // the last minute with events; a later minute could still come.
            for b in data {
                let end = b["timestamp_ns"].as_u64().expect("ts") + interval.ns();
                assert_eq!(
                    b["complete"],
                    end <= t0 + 150 * MINUTE_NS,
                    "{sym} {name} {b}"
                );
            }
        }
    }

    // gRPC bars: the same as REST's.
    let mut client = pb::market_data_stream_client::MarketDataStreamClient::connect(format!(
        "http://{}",
        e.grpc_addr
    ))
    .await
    .expect("connect");
    let mut s = client
        .stream_historical_data(pb::HistoricalRequest {
            topic: TOPIC.into(),
            symbol: "SYM1".into(),
            interval: "5m".into(),
            start_time_ns: t0 as i64,
            end_time_ns: (t0 + 240 * MINUTE_NS) as i64,
            ..Default::default()
        })
        .await
        .expect("bars")
        .into_inner();
    let mut grpc = Vec::new();
    loop {
        match s.message().await.expect("stream").and_then(|m| m.kind) {
            Some(R::Bars(b)) => grpc.extend(b.bars),
            Some(R::End(end)) => {
                assert_eq!(end.reason, "complete");
                break;
            }
            other => panic!("bars then the end: {other:?}"),
        }
    }
    let want = model(&first, 1, Interval::M5);
    assert_eq!(grpc.len(), want.len());
    for (g, w) in grpc.iter().zip(&want) {
        assert_eq!(
            (
                g.start_time_ns as u64,
                g.volume as u64,
                g.trade_count as u32
            ),
            (w.0, w.5, w.6)
        );
        assert_eq!(g.symbol, "SYM1");
        assert!((g.open - w.1 as f64 / 1e9).abs() < 1e-9);
    }

    // Bad parameters: 400 naming the field, or 404.
    let h = |q: &str| format!("{base}/api/v1/market-data/SYM0/history?topic=md%2Fhistory&{q}");
    for (q, field) in [
        ("interval=2m".to_string(), "interval"),
        ("limit=0".into(), "limit"),
        ("limit=10001".into(), "limit"),
        ("limit=ten".into(), "limit"),
        (format!("start_time={}&end_time={t0}", t0 + 1), "start_time"),
        ("start_time=yesterday".into(), "start_time"),
        (
            "start_time=2026-01-01T00:00:00Z&end_time=2026-03-01T00:00:00Z".into(),
            "end_time",
        ),
        (format!("start_time={t0}&cursor=12"), "cursor"),
        ("colour=red".into(), "query"),
    ] {
        let (code, body) = http::Client.get(&h(&q)).await;
        assert_eq!(code, 400, "{q}: {body}");
        assert!(
            body.to_string().contains(field),
            "{q}: {field} named in {body}"
        );
    }
    let (code, _) = http::Client
        .get(&format!(
            "{base}/api/v1/market-data/NOPE/history?topic=md%2Fhistory"
        ))
        .await;
    assert_eq!(code, 404);
    let (code, _) = http::Client
        .get(&format!(
            "{base}/api/v1/market-data/SYM0/history?topic=no%2Fsuch"
        ))
        .await;
    assert_eq!(code, 404);

    // A late trade (its minute was written) is counted and left out.
    send(&mut ingest, &[(0, true, t0 + 3, 999 * PX, 1)]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = http::Client.get_text(&format!("{base}/metrics")).await;
        if metric(&text, "tickwire_bars_late_events_total") >= 1 {
            assert!(metric(&text, "tickwire_bars_written_total") > 0);
            assert_eq!(metric(&text, "tickwire_bars_errors_total"), 0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the late trade is counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = all_bars(&base, "SYM0", t0, 240, 10_000).await;
    assert_eq!(
        as_model(&got),
        without_notional(model(&first, 0, Interval::M1)),
        "unchanged"
    );

    // Parquet export of bars and of raw events.
    let node_dir = dir.path().join("node");
    let out = dir.path().join("sym0.parquet");
    let spec = tickwire_broker::export::ExportSpec {
        node_dir: node_dir.clone(),
        journal_dir: dir.path().join("journal"),
        topic: TOPIC.into(),
        symbols: vec!["SYM0".into()],
        exchanges: Vec::new(),
        currencies: Vec::new(),
        from_ns: t0,
        to_ns: t0 + 240 * MINUTE_NS,
        interval: Some(Interval::H1),
        out: out.clone(),
    };
    let done = tickwire_broker::export::export(&spec).expect("export bars");
    assert_eq!(done.rows, model(&first, 0, Interval::H1).len() as u64);
    let raw_out = dir.path().join("sym0-events.parquet");
    let raw = tickwire_broker::export::export(&tickwire_broker::export::ExportSpec {
        interval: None,
        to_ns: t0 + 10 * MINUTE_NS,
        out: raw_out.clone(),
        ..spec.clone()
    })
    .expect("export events");
    assert_eq!(
        raw.rows,
        first
            .iter()
            .filter(|e| e.0 == 0 && e.2 < t0 + 10 * MINUTE_NS)
            .count() as u64
    );
    assert_eq!(raw.missing, 0);
    {
        use tickwire_history::polars::prelude::{ParquetReader, SerReader};
        let df = ParquetReader::new(std::fs::File::open(&out).expect("open"))
            .finish()
            .expect("parquet");
        assert_eq!(df.height() as u64, done.rows);
        let close = df
            .column("close")
            .expect("close")
            .f64()
            .expect("f64")
            .get(0);
        let m = model(&first, 0, Interval::H1)[0];
        assert_eq!(close, Some(m.4 as f64 / 1e9));
        let ev = ParquetReader::new(std::fs::File::open(&raw_out).expect("open"))
            .finish()
            .expect("parquet");
        assert_eq!(ev.height() as u64, raw.rows);
        let seqs: Vec<u64> = ev
            .column("sequence")
            .expect("sequence")
            .u64()
            .expect("u64")
            .iter()
            .flatten()
            .collect();
        let parts: Vec<u32> = ev
            .column("partition")
            .expect("partition")
            .u32()
            .expect("u32")
            .iter()
            .flatten()
            .collect();
        // SYM0's trades and quotes: two partitions, each in sequence order.
        let mut by: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (p, q) in parts.iter().zip(&seqs) {
            by.entry(*p).or_default().push(*q);
        }
        assert_eq!(by.len(), 2, "{by:?}");
        assert!(
            by.values().all(|s| s.windows(2).all(|w| w[0] < w[1])),
            "in sequence order"
        );
    }

    // A restart: the bars stay, new minutes add to them, none doubled.
    cancel.cancel();
    drop(e);
    drop(ingest);
    broker.shutdown();
    let second = events(t0, 150, 180);
    let cancel = CancellationToken::new();
    let broker = Broker::start(&c).expect("broker again");
    let mut ingest = broker.ingest(1);
    send(&mut ingest, &second);
    let e = edge(&broker, &cancel).await;
    let base = format!("http://{}", e.http_addr);
    let all: Vec<Sent> = first.iter().chain(&second).copied().collect();
    bars_are_the_model(&base, t0, 240, &all, "after a restart").await;
    cancel.cancel();
    drop(e);
    drop(ingest);
    broker.shutdown();
}

/// The bars of `sym` in `[from, to)` once `ready` holds for them.
async fn bars_when(
    base: &str,
    sym: &str,
    interval: &str,
    from: u64,
    to: u64,
    ready: impl Fn(&[Value]) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http::Client
            .get(&format!(
                "{base}/api/v1/market-data/{sym}/history?topic=md%2Fhistory&interval={interval}&start_time={from}&end_time={to}"
            ))
            .await;
        assert_eq!(code, 200, "{body}");
        if ready(body["data"].as_array().expect("data")) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bars of {sym} never as expected: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minutes_still_open_are_served_as_they_grow_and_marked_not_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    // Nothing closes while the test runs: every bar it sees is open.
    c.history.lateness = "1h".into();
    let now = tickwire_proto::futex::realtime_ns();
    let minute = Interval::M1.bucket(now);
    let t = minute + 1;
    let earlier = minute - 2 * MINUTE_NS + 1;
    let cancel = CancellationToken::new();
    let broker = Broker::start(&c).expect("broker");
    let mut ingest = broker.ingest(1);
    let e = edge(&broker, &cancel).await;
    let base = format!("http://{}", e.http_addr);
    let mut sent: Vec<Sent> = vec![
        (1, true, earlier, 40 * PX, 5),
        (1, true, t, 10 * PX, 1),
        (1, true, t + 1, 12 * PX, 2),
        (1, true, t + 2, 11 * PX, 3),
        // SYM0's quotes only: a mid bar, from another partition.
        (0, false, t + 3, 30 * PX, 0),
    ];
    send(&mut ingest, &sent);
    let (from, to) = (minute - 5 * MINUTE_NS, minute + MINUTE_NS);
    let body = bars_when(&base, "SYM1", "1m", from, to, |d| {
        d.len() == 2 && d[1]["trade_count"] == 3
    })
    .await;
    let data = body["data"].as_array().expect("data");
    assert_eq!(
        as_model(data),
        without_notional(model(&sent, 1, Interval::M1)),
        "{body}"
    );
    assert!(data.iter().all(|b| b["complete"] == false), "{body}");
    assert!(
        body["complete_through"]
            .as_str()
            .is_none_or(|c| *c < *rfc3339(earlier)),
        "{body}"
    );
    // The open minute grows with the next trade.
    let more = (1, true, t + 4, 9 * PX, 4);
    send(&mut ingest, &[more]);
    sent.push(more);
    let body = bars_when(&base, "SYM1", "1m", from, to, |d| {
        d.len() == 2 && d[1]["trade_count"] == 4
    })
    .await;
    assert_eq!(
        as_model(body["data"].as_array().expect("data")),
        without_notional(model(&sent, 1, Interval::M1))
    );
    // Longer bars take the open minutes too.
    let five = Interval::M5.bucket(earlier);
    let body = bars_when(&base, "SYM1", "5m", five, to, |d| {
        d.iter()
            .map(|b| b["trade_count"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == 5
    })
    .await;
    let data = body["data"].as_array().expect("data");
    assert_eq!(
        as_model(data),
        without_notional(model(&sent, 1, Interval::M5)),
        "{body}"
    );
    assert!(data.iter().all(|b| b["complete"] == false), "{body}");
    // A mid bar of an instrument that only quotes.
    let body = bars_when(&base, "SYM0", "1m", from, to, |d| d.len() == 1).await;
    assert_eq!(body["data"][0]["price_source"], "mid", "{body}");
    assert_eq!(px(&body["data"][0]["close"]), 30 * PX, "{body}");
    cancel.cancel();
    drop(e);
    drop(ingest);
    broker.shutdown();
}

fn rfc3339(ns: u64) -> String {
    tickwire_proto::json::rfc3339(ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bars_past_the_retention_are_deleted_and_newer_ones_kept() {
    use tickwire_proto::bars::{Bar, BarFile, bar_path};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.history.retention = "1h".into();
    // Bars of the last three hours, one a minute, from an earlier run.
    let now = Interval::M1.bucket(tickwire_proto::futex::realtime_ns());
    let path = bar_path(&dir.path().join("journal").join("bars"), TOPIC, 7, 0);
    let mut f = BarFile::create(&path, 7).expect("bar file");
    for m in (1..=180u64).rev() {
        let start_ns = now - m * MINUTE_NS;
        let bar = Bar {
            start_ns,
            open: PX,
            high: PX,
            low: PX,
            close: PX,
            volume: 1,
            notional: i128::from(PX),
            first_ns: start_ns,
            last_ns: start_ns,
            count: 1,
            flags: 0,
        };
        f.put(&bar).expect("put");
    }
    drop(f);
    let cancel = CancellationToken::new();
    let broker = Broker::start(&c).expect("broker");
    let e = edge(&broker, &cancel).await;
    let base = format!("http://{}", e.http_addr);
    // The builder sweeps at start.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = http::Client.get_text(&format!("{base}/metrics")).await;
        if metric(&text, "tickwire_bars_expired_total") > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "a sweep at start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = BarFile::open(&path)
        .expect("open")
        .expect("the newer bars stay")
        .range(0, u64::MAX, usize::MAX)
        .expect("read");
    let cutoff = now - 60 * MINUTE_NS;
    assert!(
        left.first()
            .is_some_and(|b| b.start_ns >= cutoff - MINUTE_NS),
        "nothing older than the retention (a minute of clock slack): {:?}",
        left.first()
    );
    assert_eq!(
        left.last().map(|b| b.start_ns),
        Some(now - MINUTE_NS),
        "the newest kept"
    );
    assert!(left.len() >= 59, "{} bars left", left.len());
    assert!(
        left.windows(2)
            .all(|w| w[1].start_ns == w[0].start_ns + MINUTE_NS),
        "whole minutes, in order"
    );
    cancel.cancel();
    drop(e);
    broker.shutdown();
    // A bad retention is refused, naming the key.
    for bad in ["soon", "5m"] {
        let mut c = config(dir.path());
        c.history.retention = bad.into();
        let err = c.validate().expect_err(bad).to_string();
        assert!(err.contains("history.retention"), "{err}");
    }
}

/// A reboot empties a tmpfs node directory (rings, symbology) while the
/// journal and bars stay on disk, naming instruments by id: the ids come
/// back from the copy kept beside the journal, even when instruments
/// arrive in another order after it, so each symbol's history stays its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_that_empties_the_node_directory_keeps_each_symbols_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = config(dir.path());
    let now = tickwire_proto::futex::realtime_ns();
    let t0 = Interval::H1.bucket(now) - 2 * 60 * MINUTE_NS;
    let first = events(t0, 0, 20);
    let cancel = CancellationToken::new();
    let broker = Broker::start(&c).expect("broker");
    let mut ingest = broker.ingest(1);
    send(&mut ingest, &first);
    let e = edge(&broker, &cancel).await;
    let base = format!("http://{}", e.http_addr);
    for (i, sym) in ["SYM0", "SYM1", "SYM2"].iter().enumerate() {
        wait_bars(&base, sym, t0, 60, model(&first, i, Interval::M1).len()).await;
    }
    cancel.cancel();
    drop(e);
    drop(ingest);
    broker.shutdown();

    // The reboot.
    std::fs::remove_dir_all(dir.path().join("node")).expect("empty the node directory");
    let cancel = CancellationToken::new();
    let broker = Broker::start(&c).expect("broker after the reboot");
    let mut ingest = broker.ingest(1);
    // The instruments arrive in the opposite order this time.
    let topic = ingest.resolver().topic(TOPIC).expect("topic");
    for i in (0..3).rev() {
        let inst = tickwire_proto::symbology::Instrument {
            symbol: format!("SYM{i}"),
            exchange: "XNAS".into(),
            currency: "USD".into(),
            size_decimals: 0,
        };
        let route = ingest.resolver().route(topic, &inst).expect("route");
        assert_eq!(route.instrument_id, i + 1, "SYM{i} keeps its id");
    }
    let second = events(t0, 20, 30);
    send(&mut ingest, &second);
    let e = edge(&broker, &cancel).await;
    let base = format!("http://{}", e.http_addr);
    let all: Vec<Sent> = first.iter().chain(&second).copied().collect();
    bars_are_the_model(&base, t0, 60, &all, "after the reboot").await;
    // The new rings continued the journal's sequences: the raw events
    // from before the reboot are still read back, with the newer ones.
    let raw = tickwire_broker::export::export(&tickwire_broker::export::ExportSpec {
        node_dir: dir.path().join("node"),
        journal_dir: dir.path().join("journal"),
        topic: TOPIC.into(),
        symbols: vec!["SYM0".into()],
        exchanges: Vec::new(),
        currencies: Vec::new(),
        from_ns: t0,
        to_ns: t0 + 60 * MINUTE_NS,
        interval: None,
        out: dir.path().join("raw.parquet"),
    })
    .expect("export events");
    assert_eq!(
        (raw.rows, raw.missing),
        (all.iter().filter(|e| e.0 == 0).count() as u64, 0),
        "every SYM0 event, from before and after the reboot"
    );
    cancel.cancel();
    drop(e);
    drop(ingest);
    broker.shutdown();
}

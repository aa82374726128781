//! The WebSocket wire: a tick as a JSON `MarketDataMessage` (the same
//! names as the protobuf message), written once per event, and the
//! `WebSocketMessage` envelope around a batch of them.
//!
//! ```text
//! {"type":"data","payload":{"subscription_id":"s1","messages":[
//!   {"event_id":"aee0c001-17","timestamp":1795786108123456789,
//!    "data":{"symbol":"AAPL","exchange":"NASDAQ","currency":"USD","kind":"trade",
//!            "timestamp":"2026-11-27T13:28:28.123456789Z","timestamp_ns":1795786108123456789,
//!            "price":150.25,"volume":100},
//!    "metadata":{"topic":"market-data/normalized/equities","partition":2,"epoch":1,
//!                "sequence":1041,"message_id":"2:1:1041","ingest_time_ns":..,"send_time_ns":..,
//!                "snapshot":false,"conflated":false,"source_id":..,"source_seq":..}}]},
//!  "timestamp":"2026-11-27T13:28:28.123470000Z"}
//! ```
//!
//! Prices and sizes are exact decimals (see `tickwire_proto::json`).

use std::io::Write;

use tickwire_proto::frame::{ArchivedFrameBody, Kind};
use tickwire_proto::grpc::TickMeta;
use tickwire_proto::json::{Decimal, rfc3339};
use tickwire_proto::symbology::Entry;

fn string(buf: &mut Vec<u8>, s: &str) {
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// Appends one JSON `MarketDataMessage` for a tick.
pub fn encode_tick(
    buf: &mut Vec<u8>,
    m: &TickMeta<'_>,
    b: &ArchivedFrameBody,
    inst: Option<&Entry>,
) {
    let _ = write!(
        buf,
        r#"{{"event_id":"{:08x}-{}","timestamp":{},"data":{{"#,
        b.source_id(),
        b.source_seq(),
        b.ts_event()
    );
    if let Some(e) = inst {
        buf.extend_from_slice(br#""symbol":"#);
        string(buf, e.symbol());
        buf.extend_from_slice(br#","exchange":"#);
        string(buf, e.exchange());
        buf.extend_from_slice(br#","currency":"#);
        string(buf, e.currency());
        buf.push(b',');
    }
    let kind = b.kind();
    let _ = write!(
        buf,
        r#""kind":"{}","timestamp":"{}","timestamp_ns":{}"#,
        kind.map_or("unknown", Kind::name),
        rfc3339(b.ts_event()),
        b.ts_event()
    );
    let decimals = inst.map_or(0, Entry::size_decimals);
    let px = |buf: &mut Vec<u8>, name: &str, p: i64| {
        if let Some(d) = Decimal::price(p) {
            let _ = write!(buf, r#","{name}":{d}"#);
        }
    };
    match kind {
        Some(Kind::Quote) => {
            px(buf, "bid_price", b.px_a());
            let _ = write!(
                buf,
                r#","bid_size":{}"#,
                Decimal::size(b.size_a(), decimals)
            );
            px(buf, "ask_price", b.px_b());
            let _ = write!(
                buf,
                r#","ask_size":{}"#,
                Decimal::size(b.size_b(), decimals)
            );
        }
        _ => {
            px(buf, "price", b.px_a());
            let _ = write!(buf, r#","volume":{}"#, Decimal::size(b.size_a(), decimals));
        }
    }
    buf.extend_from_slice(br#"},"metadata":{"topic":"#);
    string(buf, m.topic);
    let _ = write!(
        buf,
        r#","partition":{p},"epoch":{e},"sequence":{s},"message_id":"{p}:{e}:{s}","ingest_time_ns":{i},"send_time_ns":{t},"snapshot":{snap},"conflated":{c},"source_id":{sid},"source_seq":{sseq}}}}}"#,
        p = m.partition,
        e = m.epoch,
        s = m.seq,
        i = b.ts_ingest(),
        t = m.send_time_ns,
        snap = m.snapshot,
        c = m.conflated,
        sid = b.source_id(),
        sseq = b.source_seq(),
    );
}

/// A `WebSocketMessage` of type `data` around `elements` (comma-separated
/// JSON messages).
pub fn data_message(subscription_id: &str, elements: &[u8], now_ns: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(elements.len() + 128);
    out.extend_from_slice(br#"{"type":"data","payload":{"subscription_id":"#);
    string(&mut out, subscription_id);
    out.extend_from_slice(br#","messages":["#);
    out.extend_from_slice(elements);
    let _ = write!(out, r#"]}},"timestamp":"{}"}}"#, rfc3339(now_ns));
    out
}

/// A `WebSocketMessage` of any type with a JSON payload.
pub fn message(kind: &str, payload: serde_json::Value, now_ns: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "type": kind,
        "payload": payload,
        "timestamp": rfc3339(now_ns),
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickwire_proto::frame::FrameBody;

    #[test]
    fn a_data_message_is_valid_json_with_exact_prices() {
        let mut body = FrameBody::trade(1, 1_795_786_108_123_456_789, 12_345_678_123_456_789, 100);
        body.source_seq = 17;
        let words = body.to_words();
        let b = ArchivedFrameBody::from_words(&words);
        let meta = TickMeta {
            topic: "t\"x",
            partition: 2,
            epoch: 1,
            seq: 1041,
            send_time_ns: 5,
            snapshot: false,
            conflated: true,
        };
        let mut el = Vec::new();
        encode_tick(&mut el, &meta, b, None);
        el.push(b',');
        encode_tick(&mut el, &meta, b, None);
        let msg = data_message("s1", &el, 1);
        let v: serde_json::Value = serde_json::from_slice(&msg).expect("valid JSON");
        assert_eq!(v["type"], "data");
        let m = &v["payload"]["messages"][1];
        assert_eq!(m["metadata"]["topic"], "t\"x");
        assert_eq!(m["metadata"]["message_id"], "2:1:1041");
        assert_eq!(m["metadata"]["conflated"], true);
        assert_eq!(m["event_id"], "00000000-17");
        let text = String::from_utf8(msg).expect("utf8");
        assert!(
            text.contains(r#""price":12345678.123456789,"volume":100"#),
            "{text}"
        );
    }
}

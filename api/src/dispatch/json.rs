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

use tickwire_proto::frame::{ArchivedFrameBody, Kind};
use tickwire_proto::grpc::{TickMeta, hex8};
use tickwire_proto::json::{Decimal, rfc3339, write_rfc3339};
use tickwire_proto::symbology::Entry;

fn string(buf: &mut Vec<u8>, s: &str) {
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

#[inline]
fn number(buf: &mut Vec<u8>, v: impl itoa::Integer) {
    buf.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// An instrument's part of the JSON `data` object (`"symbol":..,
/// "exchange":..,"currency":..,`) and its size scale, written once per
/// instrument: symbology entries never change once written.
#[derive(Debug, Clone, Default)]
pub struct JsonInstrument {
    strings: Box<[u8]>,
    size_decimals: u8,
}

impl JsonInstrument {
    /// Escapes an entry's strings once.
    pub fn new(e: &Entry) -> JsonInstrument {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(br#""symbol":"#);
        string(&mut buf, e.symbol());
        buf.extend_from_slice(br#","exchange":"#);
        string(&mut buf, e.exchange());
        buf.extend_from_slice(br#","currency":"#);
        string(&mut buf, e.currency());
        buf.push(b',');
        JsonInstrument {
            strings: buf.into_boxed_slice(),
            size_decimals: e.size_decimals(),
        }
    }
}

/// Appends one JSON `MarketDataMessage` for a tick (no allocation and no
/// formatting machinery: it runs once per event for every WebSocket
/// subscriber's batch).
pub fn encode_tick(
    buf: &mut Vec<u8>,
    m: &TickMeta<'_>,
    b: &ArchivedFrameBody,
    inst: Option<&JsonInstrument>,
) {
    buf.reserve(480 + m.topic.len() + inst.map_or(0, |i| i.strings.len()));
    buf.extend_from_slice(br#"{"event_id":""#);
    buf.extend_from_slice(&hex8(b.source_id()));
    buf.push(b'-');
    number(buf, b.source_seq());
    buf.extend_from_slice(br#"","timestamp":"#);
    number(buf, b.ts_event());
    buf.extend_from_slice(br#","data":{"#);
    if let Some(i) = inst {
        buf.extend_from_slice(&i.strings);
    }
    let kind = b.kind();
    buf.extend_from_slice(br#""kind":""#);
    buf.extend_from_slice(kind.map_or("unknown", Kind::name).as_bytes());
    buf.extend_from_slice(br#"","timestamp":""#);
    write_rfc3339(buf, b.ts_event());
    buf.extend_from_slice(br#"","timestamp_ns":"#);
    number(buf, b.ts_event());
    let decimals = inst.map_or(0, |i| i.size_decimals);
    let px = |buf: &mut Vec<u8>, name: &[u8], p: i64| {
        if let Some(d) = Decimal::price(p) {
            buf.extend_from_slice(name);
            d.write_to(buf);
        }
    };
    let size = |buf: &mut Vec<u8>, name: &[u8], raw: u32| {
        buf.extend_from_slice(name);
        Decimal::size(raw, decimals).write_to(buf);
    };
    match kind {
        Some(Kind::Quote) => {
            px(buf, br#","bid_price":"#, b.px_a());
            size(buf, br#","bid_size":"#, b.size_a());
            px(buf, br#","ask_price":"#, b.px_b());
            size(buf, br#","ask_size":"#, b.size_b());
        }
        _ => {
            px(buf, br#","price":"#, b.px_a());
            size(buf, br#","volume":"#, b.size_a());
        }
    }
    buf.extend_from_slice(br#"},"metadata":{"topic":"#);
    string(buf, m.topic);
    let (mut p, mut e, mut s) = (
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
    );
    let (p, e, s) = (
        p.format(m.partition).as_bytes(),
        e.format(m.epoch).as_bytes(),
        s.format(m.seq).as_bytes(),
    );
    for (part, text) in [
        (&br#","partition":"#[..], p),
        (br#","epoch":"#, e),
        (br#","sequence":"#, s),
        (br#","message_id":""#, p),
        (b":", e),
        (b":", s),
    ] {
        buf.extend_from_slice(part);
        buf.extend_from_slice(text);
    }
    buf.extend_from_slice(br#"","ingest_time_ns":"#);
    number(buf, b.ts_ingest());
    buf.extend_from_slice(br#","send_time_ns":"#);
    number(buf, m.send_time_ns);
    buf.extend_from_slice(if m.snapshot {
        br#","snapshot":true"#
    } else {
        br#","snapshot":false"#
    });
    buf.extend_from_slice(if m.conflated {
        br#","conflated":true"#
    } else {
        br#","conflated":false"#
    });
    buf.extend_from_slice(br#","source_id":"#);
    number(buf, b.source_id());
    buf.extend_from_slice(br#","source_seq":"#);
    number(buf, b.source_seq());
    buf.extend_from_slice(b"}}");
}

/// A `WebSocketMessage` of type `data` around `elements` (comma-separated
/// JSON messages).
pub fn data_message(subscription_id: &str, elements: &[u8], now_ns: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(elements.len() + 128);
    out.extend_from_slice(br#"{"type":"data","payload":{"subscription_id":"#);
    string(&mut out, subscription_id);
    out.extend_from_slice(br#","messages":["#);
    out.extend_from_slice(elements);
    out.extend_from_slice(br#"]},"timestamp":""#);
    write_rfc3339(&mut out, now_ns);
    out.extend_from_slice(br#""}"#);
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

    #[test]
    fn every_field_of_a_quote_is_written_as_the_spec_names_it() {
        let mut body = FrameBody::quote(
            1,
            1_795_786_108_123_456_789,
            (150_250_000_000, 1_500),
            (tickwire_proto::frame::UNDEF_PRICE, 0),
        );
        body.source_seq = 1_795_786_100_000_000_001;
        body.set_source_id(0x00ab_cdef);
        body.ts_ingest_delta = 3;
        let words = body.to_words();
        let b = ArchivedFrameBody::from_words(&words);
        let meta = TickMeta {
            topic: "market-data/normalized/equities",
            partition: 12,
            epoch: 3,
            seq: 1_000_041,
            send_time_ns: 1_795_786_108_200_000_000,
            snapshot: true,
            conflated: false,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sym =
            tickwire_proto::symbology::SymbologyWriter::open(dir.path(), 16).expect("symbology");
        let id = sym
            .resolve(&tickwire_proto::symbology::Instrument {
                symbol: "BTC-\"X\"".into(),
                exchange: "COINBASE".into(),
                currency: "USD".into(),
                size_decimals: 3,
            })
            .expect("interned");
        let reader = tickwire_proto::symbology::Symbology::open(dir.path()).expect("reader");
        let inst = JsonInstrument::new(reader.get(id).expect("entry"));
        let mut el = Vec::new();
        encode_tick(&mut el, &meta, b, Some(&inst));
        let v: serde_json::Value = serde_json::from_slice(&el).expect("valid JSON");
        assert_eq!(
            v,
            serde_json::json!({
                "event_id": "00abcdef-1795786100000000001",
                "timestamp": 1_795_786_108_123_456_789u64,
                "data": {"symbol": "BTC-\"X\"", "exchange": "COINBASE", "currency": "USD",
                    "kind": "quote", "timestamp": "2026-11-27T13:28:28.123456789Z",
                    "timestamp_ns": 1_795_786_108_123_456_789u64,
                    "bid_price": 150.25, "bid_size": 1.5, "ask_size": 0},
                "metadata": {"topic": "market-data/normalized/equities", "partition": 12,
                    "epoch": 3, "sequence": 1_000_041, "message_id": "12:3:1000041",
                    "ingest_time_ns": b.ts_ingest(), "send_time_ns": 1_795_786_108_200_000_000u64,
                    "snapshot": true, "conflated": false, "source_id": 0x00ab_cdef,
                    "source_seq": 1_795_786_100_000_000_001u64}
            })
        );
    }
}

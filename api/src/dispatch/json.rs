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
use tickwire_proto::grpc::{TickMeta, push_hex8};
use tickwire_proto::json::{Decimal, rfc3339, write_rfc3339};
use tickwire_proto::symbology::Entry;

/// `s` as a JSON string: quoted as it is when nothing in it needs an
/// escape (the usual topic name), else through serde_json.
fn string(buf: &mut String, s: &str) {
    if s.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\') {
        buf.push('"');
        buf.push_str(s);
        buf.push('"');
    } else {
        buf.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
}

#[inline]
fn number(buf: &mut String, v: impl itoa::Integer) {
    buf.push_str(itoa::Buffer::new().format(v));
}

/// An instrument's part of the JSON `data` object (`"symbol":..,
/// "exchange":..,"currency":..,`) and its size scale, written once per
/// instrument: symbology entries never change once written.
#[derive(Debug, Clone, Default)]
pub struct JsonInstrument {
    strings: Box<str>,
    size_decimals: u8,
}

impl JsonInstrument {
    /// Escapes an entry's strings once.
    pub fn new(e: &Entry) -> JsonInstrument {
        JsonInstrument::of(e.symbol(), e.exchange(), e.currency(), e.size_decimals())
    }

    /// Escapes an instrument's strings given as such.
    pub fn of(symbol: &str, exchange: &str, currency: &str, size_decimals: u8) -> JsonInstrument {
        let mut buf = String::with_capacity(64);
        buf.push_str(r#""symbol":"#);
        string(&mut buf, symbol);
        buf.push_str(r#","exchange":"#);
        string(&mut buf, exchange);
        buf.push_str(r#","currency":"#);
        string(&mut buf, currency);
        buf.push(',');
        JsonInstrument {
            strings: buf.into_boxed_str(),
            size_decimals,
        }
    }
}

/// Appends one JSON `MarketDataMessage` for a tick (no allocation and no
/// formatting machinery: it runs once per event for every WebSocket
/// subscriber's batch).
pub fn encode_tick(
    buf: &mut String,
    m: &TickMeta<'_>,
    b: &ArchivedFrameBody,
    inst: Option<&JsonInstrument>,
) {
    buf.reserve(480 + m.topic.len() + inst.map_or(0, |i| i.strings.len()));
    // Each number written twice is formatted once.
    let (mut source_seq, mut ts_event) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (source_seq, ts_event) = (
        source_seq.format(b.source_seq()),
        ts_event.format(b.ts_event()),
    );
    buf.push_str(r#"{"event_id":""#);
    push_hex8(buf, b.source_id());
    buf.push('-');
    buf.push_str(source_seq);
    buf.push_str(r#"","timestamp":"#);
    buf.push_str(ts_event);
    buf.push_str(r#","data":{"#);
    if let Some(i) = inst {
        buf.push_str(&i.strings);
    }
    let kind = b.kind();
    buf.push_str(r#""kind":""#);
    buf.push_str(kind.map_or("unknown", Kind::name));
    buf.push_str(r#"","timestamp":""#);
    write_rfc3339(buf, b.ts_event());
    buf.push_str(r#"","timestamp_ns":"#);
    buf.push_str(ts_event);
    let decimals = inst.map_or(0, |i| i.size_decimals);
    let px = |buf: &mut String, name: &str, p: i64| {
        if let Some(d) = Decimal::price(p) {
            buf.push_str(name);
            d.write_to(buf);
        }
    };
    let size = |buf: &mut String, name: &str, raw: u32| {
        buf.push_str(name);
        Decimal::size(raw, decimals).write_to(buf);
    };
    match kind {
        Some(Kind::Quote) => {
            px(buf, r#","bid_price":"#, b.px_a());
            size(buf, r#","bid_size":"#, b.size_a());
            px(buf, r#","ask_price":"#, b.px_b());
            size(buf, r#","ask_size":"#, b.size_b());
        }
        _ => {
            px(buf, r#","price":"#, b.px_a());
            size(buf, r#","volume":"#, b.size_a());
        }
    }
    buf.push_str(r#"},"metadata":{"topic":"#);
    string(buf, m.topic);
    let (mut p, mut e, mut s) = (
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
    );
    let (p, e, s) = (p.format(m.partition), e.format(m.epoch), s.format(m.seq));
    for (part, text) in [
        (r#","partition":"#, p),
        (r#","epoch":"#, e),
        (r#","sequence":"#, s),
        (r#","message_id":""#, p),
        (":", e),
        (":", s),
    ] {
        buf.push_str(part);
        buf.push_str(text);
    }
    buf.push_str(r#"","ingest_time_ns":"#);
    number(buf, b.ts_ingest());
    buf.push_str(r#","send_time_ns":"#);
    number(buf, m.send_time_ns);
    buf.push_str(if m.snapshot {
        r#","snapshot":true"#
    } else {
        r#","snapshot":false"#
    });
    buf.push_str(if m.conflated {
        r#","conflated":true"#
    } else {
        r#","conflated":false"#
    });
    if m.redeliveries > 0 {
        buf.push_str(r#","redelivery_count":"#);
        number(buf, m.redeliveries as u64);
    }
    buf.push_str(r#","source_id":"#);
    number(buf, b.source_id());
    buf.push_str(r#","source_seq":"#);
    buf.push_str(source_seq);
    buf.push_str("}}");
}

/// A `WebSocketMessage` of type `data` around `elements` (comma-separated
/// JSON messages), all at once.
pub fn data_message(subscription_id: &str, elements: &str, now_ns: u64) -> String {
    let mut b = JsonBatch::default();
    if !elements.is_empty() {
        b.push(subscription_id, elements);
    }
    b.take(subscription_id, now_ns)
}

/// A `data` message being built: its head, then each element as it comes,
/// so that sealing appends the tail and hands the text over as it is. (It
/// was a second copy of every byte of every WebSocket batch, on the
/// dispatcher's thread, which copies each event into each subscriber's
/// batch already.)
#[derive(Debug, Default)]
pub struct JsonBatch {
    buf: String,
    /// The size recent messages reached: the largest, decaying by an
    /// eighth per message. The next one's first allocation.
    recent: usize,
}

/// The head of a `data` message up to the first element.
fn data_head(buf: &mut String, subscription_id: &str) {
    buf.push_str(r#"{"type":"data","payload":{"subscription_id":"#);
    string(buf, subscription_id);
    buf.push_str(r#","messages":["#);
}

impl JsonBatch {
    /// Whether no element was pushed since the last [`JsonBatch::take`].
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends one element (a JSON `MarketDataMessage` from [`encode_tick`]).
    #[inline]
    pub fn push(&mut self, subscription_id: &str, element: &str) {
        if self.buf.is_empty() {
            // As large as recent messages: a subscriber's batches vary with
            // how far behind the dispatcher is, and growing one by
            // doubling copies what it holds again.
            self.buf
                .reserve(self.recent.clamp(1024, 4 << 20) + element.len());
            data_head(&mut self.buf, subscription_id);
        } else {
            self.buf.push(',');
        }
        self.buf.push_str(element);
    }

    /// The `data` message of what was pushed (none: an empty batch), sent
    /// at `now_ns`; the batch is empty after it.
    pub fn take(&mut self, subscription_id: &str, now_ns: u64) -> String {
        if self.buf.is_empty() {
            data_head(&mut self.buf, subscription_id);
        }
        self.buf.push_str(r#"]},"timestamp":""#);
        write_rfc3339(&mut self.buf, now_ns);
        self.buf.push_str(r#""}"#);
        let len = self.buf.len();
        self.recent = len.max(self.recent - self.recent / 8);
        // A queued message holds no more than it carries (queues are
        // bounded by length): a small batch after a large one gives the
        // rest back, which the allocator does in place.
        if self.buf.capacity() > len + len / 8 + 256 {
            self.buf.shrink_to_fit();
        }
        std::mem::take(&mut self.buf)
    }
}

/// A `WebSocketMessage` of any type with a JSON payload.
pub fn message(kind: &str, payload: serde_json::Value, now_ns: u64) -> String {
    serde_json::to_string(&serde_json::json!({
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
            redeliveries: 0,
        };
        let mut el = String::new();
        encode_tick(&mut el, &meta, b, None);
        el.push(',');
        encode_tick(&mut el, &meta, b, None);
        let mut batch = JsonBatch::default();
        batch.push("s1", &el);
        let msg = batch.take("s1", 1);
        let v: serde_json::Value = serde_json::from_str(&msg).expect("valid JSON");
        assert_eq!(v["type"], "data");
        let m = &v["payload"]["messages"][1];
        assert_eq!(m["metadata"]["topic"], "t\"x");
        assert_eq!(m["metadata"]["message_id"], "2:1:1041");
        assert_eq!(m["metadata"]["conflated"], true);
        assert_eq!(m["event_id"], "00000000-17");
        let text = msg;
        assert!(
            text.contains(r#""price":12345678.123456789,"volume":100"#),
            "{text}"
        );
    }

    #[test]
    fn a_batch_taken_is_the_data_message_of_its_elements_and_starts_again_empty() {
        let words = FrameBody::trade(1, 2, 3, 4).to_words();
        let b = ArchivedFrameBody::from_words(&words);
        let meta = |seq| TickMeta {
            topic: "t",
            partition: 0,
            epoch: 1,
            seq,
            send_time_ns: 5,
            snapshot: false,
            conflated: false,
            redeliveries: 0,
        };
        let mut batch = JsonBatch::default();
        let mut el = String::new();
        for seq in [7, 8, 9] {
            el.clear();
            encode_tick(&mut el, &meta(seq), b, None);
            batch.push("s\"1", &el);
        }
        assert!(!batch.is_empty());
        let v: serde_json::Value =
            serde_json::from_str(&batch.take("s\"1", 1)).expect("valid JSON");
        assert_eq!(v["payload"]["subscription_id"], "s\"1");
        let seqs: Vec<u64> = v["payload"]["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["metadata"]["sequence"].as_u64())
            .collect();
        assert_eq!(seqs, [7, 8, 9]);
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000000001Z");
        assert!(batch.is_empty(), "a taken batch starts again");
        el.clear();
        encode_tick(&mut el, &meta(10), b, None);
        batch.push("s", &el);
        let v: serde_json::Value = serde_json::from_str(&batch.take("s", 2)).expect("valid JSON");
        assert_eq!(v["payload"]["messages"][0]["metadata"]["sequence"], 10);
        assert_eq!(v["payload"]["messages"].as_array().map(Vec::len), Some(1));
        let big = "x".repeat(100_000);
        batch.push("s", &format!("\"{big}\""));
        assert!(batch.take("s", 3).len() > 100_000);
        batch.push("s", &el);
        let small = batch.take("s", 4);
        assert!(
            small.capacity() <= small.len() + small.len() / 8 + 256,
            "a small message after a large one holds {} bytes for {}",
            small.capacity(),
            small.len()
        );
        let empty: serde_json::Value =
            serde_json::from_str(&batch.take("s", 5)).expect("valid JSON");
        assert_eq!(empty["payload"]["messages"], serde_json::json!([]));
        // A few small batches after a large one, then a large one again:
        // it fits the buffer reserved at its first element (no regrowth,
        // which would copy it).
        for t in 6..9 {
            batch.push("s", &el);
            batch.take("s", t);
        }
        batch.push("s", &el);
        let reserved = batch.buf.capacity();
        while batch.buf.len() < 40_000 {
            batch.push("s", &el);
        }
        assert_eq!(
            batch.buf.capacity(),
            reserved,
            "a batch like a recent one grew"
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
            redeliveries: 0,
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
        let mut el = String::new();
        encode_tick(&mut el, &meta, b, Some(&inst));
        let v: serde_json::Value = serde_json::from_str(&el).expect("valid JSON");
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

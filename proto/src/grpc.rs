//! The gRPC edge's wire helpers (feature `grpc`): the codec that sends
//! pre-encoded `StreamResponse` bytes, and the one encoder of a tick as a
//! `MarketDataMessage`.
//!
//! A repeated protobuf field is the concatenation of its encoded elements,
//! so a `StreamResponse { batch: MarketDataBatch { messages } }` is:
//!
//! ```text
//!  0x0a varint(len(batch))            StreamResponse.batch (field 1, length-delimited)
//!    0x0a varint(len(m1)) m1          MarketDataBatch.messages[0]  (each element encoded once
//!    0x0a varint(len(m2)) m2          MarketDataBatch.messages[1]   by the dispatcher, then copied
//!    ...                                                            into every receiver's batch)
//! ```
//!
//! [`encode_tick`] writes one element; [`BatchBuf`] gathers elements with
//! head room for the prefix and turns them into one [`Encoded`] response
//! without another copy. Clients decode an ordinary `StreamResponse`.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::frame::{ArchivedFrameBody, Kind, PRICE_SCALE, UNDEF_PRICE};
use crate::pb;
use crate::symbology::Entry;

/// A response already in its protobuf wire form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded(pub Bytes);

impl Encoded {
    /// A prost message, encoded (notices: gaps, heartbeats, ends).
    pub fn message(m: &impl Message) -> Encoded {
        Encoded(Bytes::from(m.encode_to_vec()))
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty (an empty `StreamResponse`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Encodes [`Encoded`] by copying its bytes; decodes requests with prost.
#[derive(Debug)]
pub struct EncodedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for EncodedCodec<T, U> {
    fn default() -> Self {
        EncodedCodec(PhantomData)
    }
}

impl<U: Message + Default + Send + 'static> Codec for EncodedCodec<Encoded, U> {
    type Encode = Encoded;
    type Decode = U;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<U> {
        ProstDecoder(PhantomData)
    }
}

/// Writes pre-encoded bytes.
#[derive(Debug)]
pub struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Encoded;
    type Error = Status;

    fn encode(&mut self, item: Encoded, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item.0);
        Ok(())
    }
}

/// Decodes a request with prost.
#[derive(Debug)]
pub struct ProstDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for ProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let len = src.remaining();
        U::decode(src.copy_to_bytes(len))
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed request: {e}")))
    }
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// The low 56 bits of `x` as eight 7-bit groups, one per byte, lowest
/// first (little-endian), high bits clear.
#[inline(always)]
fn spread7(x: u64) -> u64 {
    (x & 0x7f)
        | (x << 1 & 0x7f00)
        | (x << 2 & 0x7f_0000)
        | (x << 3 & 0x7f00_0000)
        | (x << 4 & 0x7f_0000_0000)
        | (x << 5 & 0x7f00_0000_0000)
        | (x << 6 & 0x7f_0000_0000_0000)
        | (x << 7 & 0x7f00_0000_0000_0000)
}

/// Writes `v` as a varint at the start of `dst`, byte by byte (nothing
/// past its last byte is touched: for lengths patched in front of a body
/// already written), and returns its length.
#[inline]
fn varint_exact(dst: &mut [u8], mut v: u64) -> usize {
    let mut n = 0;
    while v >= 0x80 {
        dst[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    dst[n] = v as u8;
    n + 1
}

/// A cursor writing protobuf fields into a slice the caller sized with
/// [`max_element_len`]. It keeps its position in a register for a whole
/// element: a `Vec` reloads and checks its length and capacity on every
/// byte pushed, which made the encoder cost more than the data it wrote.
struct Out<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Out<'_> {
    #[inline(always)]
    fn byte(&mut self, b: u8) {
        self.buf[self.at] = b;
        self.at += 1;
    }

    #[inline(always)]
    fn slice(&mut self, s: &[u8]) {
        self.buf[self.at..self.at + s.len()].copy_from_slice(s);
        self.at += s.len();
    }

    /// A varint, stored eight bytes at a time: the 7-bit groups of up to
    /// 56 bits are spread into one word with their continuation bits set,
    /// with no loop carried from byte to byte (a nanosecond timestamp
    /// takes 9 bytes, and a tick has four). The word may write up to 7
    /// bytes past the varint, which the next field overwrites; the bound
    /// of [`max_element_len`] leaves room for that at the end.
    #[inline(always)]
    fn varint(&mut self, v: u64) {
        if v < 0x80 {
            self.byte(v as u8);
            return;
        }
        let n = varint_len(v).min(9);
        let cont = if n >= 9 {
            0x8080_8080_8080_8080
        } else {
            0x8080_8080_8080_8080u64 >> (8 * (9 - n))
        };
        self.slice(&(spread7(v) | cont).to_le_bytes());
        if n < 9 {
            self.at -= 8 - n;
            return;
        }
        // 57 bits or more: the last one or two bytes.
        let rest = v >> 56;
        if rest < 0x80 {
            self.byte(rest as u8);
        } else {
            self.byte((rest as u8) | 0x80);
            self.byte((rest >> 7) as u8);
        }
    }

    #[inline(always)]
    fn key(&mut self, field: u32, wire: u8) {
        self.varint(((field as u64) << 3) | wire as u64);
    }

    #[inline]
    fn string(&mut self, field: u32, s: &str) {
        if !s.is_empty() {
            self.key(field, 2);
            self.varint(s.len() as u64);
            self.slice(s.as_bytes());
        }
    }

    #[inline]
    fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.key(field, 0);
            self.varint(v);
        }
    }

    /// proto3 int64: a two's complement varint.
    #[inline]
    fn sint64(&mut self, field: u32, v: i64) {
        self.uint(field, v as u64);
    }

    #[inline]
    fn double(&mut self, field: u32, v: f64) {
        if v != 0.0 {
            self.key(field, 1);
            self.slice(&v.to_le_bytes());
        }
    }

    #[inline]
    fn boolean(&mut self, field: u32, v: bool) {
        if v {
            self.key(field, 0);
            self.byte(1);
        }
    }

    /// `field` as a length-delimited sub-message built by `f`, with the
    /// length patched in after (the body moves once if its length needs
    /// more than one varint byte: [`max_element_len`] leaves room for it).
    #[inline(always)]
    fn nested(&mut self, field: u32, f: impl FnOnce(&mut Self)) {
        self.key(field, 2);
        let at = self.at;
        self.at += 1;
        f(self);
        let len = self.at - at - 1;
        let n = varint_len(len as u64);
        if n > 1 {
            self.buf.copy_within(at + 1..at + 1 + len, at + n);
            self.at += n - 1;
        }
        varint_exact(&mut self.buf[at..], len as u64);
    }

    /// A string field made of `parts` joined (ids built from numbers
    /// without `format!`: no allocation, no formatting machinery per event).
    #[inline(always)]
    fn joined(&mut self, field: u32, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.key(field, 2);
        self.varint(len as u64);
        for p in parts {
            self.slice(p);
        }
    }
}

/// `v` as 8 lower-case hex digits.
#[inline]
pub fn hex8(v: u32) -> [u8; 8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 8];
    for (i, o) in out.iter_mut().enumerate() {
        *o = DIGITS[((v >> (28 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// Appends `v` as 8 lower-case hex digits to a string.
#[inline]
pub fn push_hex8(out: &mut String, v: u32) {
    for d in hex8(v) {
        out.push(char::from(d));
    }
}

/// An instrument's part of `NormalizedMarketData` (symbol, exchange,
/// currency), encoded once per instrument: symbology entries never change
/// once written, so a reader may keep this for the life of its mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstrumentFields {
    strings: Box<[u8]>,
    size_decimals: u8,
}

impl InstrumentFields {
    /// Encodes an entry's strings.
    pub fn new(e: &Entry) -> InstrumentFields {
        InstrumentFields::of(e.symbol(), e.exchange(), e.currency(), e.size_decimals())
    }

    /// Encodes an instrument's strings given as such (what
    /// [`new`](Self::new) does for a symbology entry).
    pub fn of(symbol: &str, exchange: &str, currency: &str, size_decimals: u8) -> InstrumentFields {
        // 6 bytes of key and length per string, and 8 for a varint's word.
        let mut buf = vec![0u8; symbol.len() + exchange.len() + currency.len() + 26];
        let mut o = Out {
            buf: &mut buf,
            at: 0,
        };
        o.string(1, symbol);
        o.string(2, exchange);
        o.string(3, currency);
        let len = o.at;
        buf.truncate(len);
        InstrumentFields {
            strings: buf.into_boxed_slice(),
            size_decimals,
        }
    }
}

fn price(px: i64) -> f64 {
    if px == UNDEF_PRICE {
        0.0
    } else {
        px as f64 / PRICE_SCALE as f64
    }
}

/// Where a tick was read, and how it is being sent.
#[derive(Debug, Clone, Copy)]
pub struct TickMeta<'a> {
    /// Topic name.
    pub topic: &'a str,
    /// Partition.
    pub partition: u32,
    /// Writer epoch of the partition.
    pub epoch: u64,
    /// Sequence in the partition.
    pub seq: u64,
    /// When the edge took it off the ring (ns since the Unix epoch).
    pub send_time_ns: u64,
    /// Part of an initial image.
    pub snapshot: bool,
    /// Sent in place of earlier updates that were skipped (CONFLATE).
    pub conflated: bool,
    /// Times a subscription group sent it before (at-least-once).
    pub redeliveries: u32,
}

/// The most bytes one `MarketDataBatch.messages` element of a tick can take
/// on `topic` with `inst`: every varint at its longest, room for each
/// sub-message's length to grow, the strings as they are.
pub fn max_element_len(topic: &str, inst: Option<&InstrumentFields>) -> usize {
    // Element key and length: 1 + 5; event_id 31; timestamp 11; data:
    // 1 + 5 + kind 7 + 5 varints of 11 + 2 doubles of 9; metadata:
    // 1 + 5 + topic key and length 6 + 7 varints of 11 + message id 54
    // + 2 booleans of 2. That is 290 besides the strings; 320 leaves slack.
    320 + topic.len() + inst.map_or(0, |i| i.strings.len())
}

/// Encodes one `MarketDataBatch.messages` element (key, length and a
/// `MarketDataMessage`) for a tick into `out`, which is at least
/// [`max_element_len`] long, and returns where in `out` it lies. The body
/// is written behind room for its key and length, which then go in just
/// in front of it: the body is never moved.
fn encode_element(
    out: &mut [u8],
    m: &TickMeta<'_>,
    b: &ArchivedFrameBody,
    inst: Option<&InstrumentFields>,
) -> std::ops::Range<usize> {
    let head = 1 + varint_len(out.len() as u64);
    let mut o = Out { buf: out, at: head };
    // event_id: "<source_id hex>-<source_seq>".
    let mut seq = itoa::Buffer::new();
    o.joined(
        1,
        &[
            &hex8(b.source_id()),
            b"-",
            seq.format(b.source_seq()).as_bytes(),
        ],
    );
    o.sint64(2, b.ts_event() as i64);
    o.nested(3, |o| {
        if let Some(i) = inst {
            o.slice(&i.strings);
        }
        let kind = b.kind();
        o.string(4, kind.map_or("unknown", Kind::name));
        o.sint64(5, b.ts_event() as i64);
        match kind {
            Some(Kind::Quote) => {
                o.double(8, price(b.px_a()));
                o.sint64(9, b.size_a() as i64);
                o.double(10, price(b.px_b()));
                o.sint64(11, b.size_b() as i64);
            }
            _ => {
                o.double(6, price(b.px_a()));
                o.sint64(7, b.size_a() as i64);
            }
        }
        o.uint(12, inst.map_or(0, |i| i.size_decimals as u64));
    });
    o.nested(4, |o| {
        o.string(1, m.topic);
        o.uint(2, m.partition as u64);
        o.uint(3, m.epoch);
        o.uint(4, m.seq);
        let (mut p, mut e, mut s) = (
            itoa::Buffer::new(),
            itoa::Buffer::new(),
            itoa::Buffer::new(),
        );
        o.joined(
            5,
            &[
                p.format(m.partition).as_bytes(),
                b":",
                e.format(m.epoch).as_bytes(),
                b":",
                s.format(m.seq).as_bytes(),
            ],
        );
        o.sint64(6, b.ts_ingest() as i64);
        o.sint64(7, m.send_time_ns as i64);
        o.boolean(8, m.snapshot);
        o.uint(9, b.source_id() as u64);
        o.uint(10, b.source_seq());
        o.boolean(11, m.conflated);
        o.uint(12, m.redeliveries as u64);
    });
    let end = o.at;
    // MarketDataBatch.messages: field 1, length-delimited.
    let len = (end - head) as u64;
    let start = head - 1 - varint_len(len);
    // Byte by byte: a varint's word would spill into the body.
    o.buf[start] = 0x0a;
    varint_exact(&mut o.buf[start + 1..], len);
    start..end
}

/// Appends one `MarketDataBatch.messages` element (key, length and a
/// `MarketDataMessage`) for a tick to `buf`. A loop encoding event after
/// event uses a [`TickEncoder`], which does not zero its buffer each time.
pub fn encode_tick(
    buf: &mut Vec<u8>,
    m: &TickMeta<'_>,
    b: &ArchivedFrameBody,
    inst: Option<&InstrumentFields>,
) {
    let at = buf.len();
    buf.resize(at + max_element_len(m.topic, inst), 0);
    let r = encode_element(&mut buf[at..], m, b, inst);
    buf.copy_within(at + r.start..at + r.end, at);
    buf.truncate(at + r.len());
}

/// Encodes ticks one at a time into a buffer it keeps (the hot path's
/// form of [`encode_tick`]): the element is borrowed until the next one.
#[derive(Debug, Default)]
pub struct TickEncoder {
    scratch: Vec<u8>,
    /// Where the last element lies in `scratch`.
    last: std::ops::Range<usize>,
}

impl TickEncoder {
    /// An encoder with an empty buffer (it grows to the largest element).
    pub fn new() -> TickEncoder {
        TickEncoder::default()
    }

    /// Encodes one element and returns its bytes.
    pub fn encode(
        &mut self,
        m: &TickMeta<'_>,
        b: &ArchivedFrameBody,
        inst: Option<&InstrumentFields>,
    ) -> &[u8] {
        let max = max_element_len(m.topic, inst);
        if self.scratch.len() < max {
            self.scratch.resize(max, 0);
        }
        // A slice of exactly `max`, so that the head room is the same for
        // every element of a topic, whatever the scratch grew to.
        self.last = encode_element(&mut self.scratch[..max], m, b, inst);
        &self.scratch[self.last.clone()]
    }

    /// The last element encoded.
    pub fn last(&self) -> &[u8] {
        &self.scratch[self.last.clone()]
    }
}

/// Head room kept before a batch for the `StreamResponse.batch` key and
/// length (1 + at most 5 bytes for a length below 4 GiB).
const HEAD: usize = 6;

/// Bytes a batch buffer allocates at a time; batches are cut from it.
const BLOCK: usize = 16 * 1024;

/// Elements of one `MarketDataBatch`, gathered behind head room for the
/// response prefix.
#[derive(Debug)]
pub struct BatchBuf {
    buf: BytesMut,
    events: u32,
}

impl Default for BatchBuf {
    fn default() -> Self {
        BatchBuf::new()
    }
}

impl BatchBuf {
    /// An empty batch.
    pub fn new() -> BatchBuf {
        let mut buf = BytesMut::with_capacity(BLOCK);
        buf.put_bytes(0, HEAD);
        BatchBuf { buf, events: 0 }
    }

    /// Appends one pre-encoded element (from [`encode_tick`]).
    #[inline]
    pub fn push(&mut self, element: &[u8]) {
        self.buf.put_slice(element);
        self.events += 1;
    }

    /// Events in the batch.
    pub fn events(&self) -> u32 {
        self.events
    }

    /// Bytes of the elements.
    pub fn bytes(&self) -> usize {
        self.buf.len() - HEAD
    }

    /// The batch as one `StreamResponse`, leaving this buffer empty.
    pub fn take(&mut self) -> Encoded {
        // StreamResponse.batch: field 1, length-delimited, then the length.
        let mut head = [0u8; HEAD];
        head[0] = 0x0a;
        let n = 1 + varint_exact(&mut head[1..], self.bytes() as u64);
        let start = HEAD - n;
        self.buf[start..HEAD].copy_from_slice(&head[..n]);
        // The filled part leaves; the rest of the block stays for the next
        // batches, so a small batch does not cost a block of its own (with
        // a thousand subscribers most batches are a few events).
        let mut whole = self.buf.split();
        if self.buf.capacity() < BLOCK / 4 {
            self.buf.reserve(BLOCK);
        }
        self.buf.put_bytes(0, HEAD);
        self.events = 0;
        whole.advance(start);
        Encoded(whole.freeze())
    }
}

/// `StreamResponse` notices, encoded.
pub mod notice {
    use super::*;

    fn wrap(kind: pb::stream_response::Kind) -> Encoded {
        Encoded::message(&pb::StreamResponse { kind: Some(kind) })
    }

    /// A gap of `from..=to` on a partition.
    pub fn gap(topic: &str, partition: u32, from: u64, to: u64, reason: &str) -> Encoded {
        wrap(pb::stream_response::Kind::Gap(pb::GapNotice {
            topic: topic.into(),
            partition,
            from_sequence: from,
            to_sequence: to,
            reason: reason.into(),
        }))
    }

    /// A heartbeat.
    pub fn heartbeat(time_ns: u64) -> Encoded {
        wrap(pb::stream_response::Kind::Heartbeat(pb::Heartbeat {
            time_ns: time_ns as i64,
        }))
    }

    /// The end of the initial image.
    pub fn snapshot_complete(instruments: u64) -> Encoded {
        wrap(pb::stream_response::Kind::SnapshotComplete(
            pb::SnapshotComplete { instruments },
        ))
    }

    /// A slow-consumer notice.
    pub fn slow(n: pb::SlowConsumerNotice) -> Encoded {
        wrap(pb::stream_response::Kind::SlowConsumer(n))
    }

    /// The end of the stream.
    pub fn end(reason: &str) -> Encoded {
        wrap(pb::stream_response::Kind::End(pb::StreamEnd {
            reason: reason.into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameBody;

    #[test]
    fn a_batch_of_pre_encoded_ticks_decodes_as_an_ordinary_stream_response() {
        let mut batch = BatchBuf::new();
        let mut one = Vec::new();
        let mut expected = Vec::new();
        // Enough events that the batch length needs a multi-byte varint.
        for i in 0..300u64 {
            let mut body = if i % 2 == 0 {
                FrameBody::trade(
                    0,
                    1_795_786_108_123_456_789 + i,
                    150_250_000_000,
                    100 + i as u32,
                )
            } else {
                FrameBody::quote(
                    0,
                    1_795_786_108_123_456_789 + i,
                    (150_000_000_000, 5),
                    (UNDEF_PRICE, 0),
                )
            };
            body.source_seq = i;
            // Odd ids have leading zero digits.
            let source_id = if i % 2 == 0 { 0xdead_beef } else { 0x0000_beef };
            body.set_source_id(source_id);
            let words = body.to_words();
            let b = ArchivedFrameBody::from_words(&words);
            let meta = TickMeta {
                topic: "market-data/normalized/equities",
                partition: 3,
                epoch: 2,
                seq: 1000 + i,
                send_time_ns: 7,
                snapshot: i == 0,
                conflated: false,
                redeliveries: 0,
            };
            one.clear();
            encode_tick(&mut one, &meta, b, None);
            batch.push(&one);
            expected.push((i, b.kind(), source_id));
        }
        assert_eq!(batch.events(), 300);
        let wire = batch.take();
        let decoded = pb::StreamResponse::decode(wire.0.clone()).expect("decodes");
        let Some(pb::stream_response::Kind::Batch(b)) = decoded.kind else {
            panic!("not a batch: {decoded:?}");
        };
        assert_eq!(b.messages.len(), 300);
        for (m, (i, kind, source_id)) in b.messages.iter().zip(expected) {
            let md = m.metadata.as_ref().expect("metadata");
            assert_eq!(md.sequence, 1000 + i);
            assert_eq!(md.message_id, format!("3:2:{}", 1000 + i));
            assert_eq!(md.topic, "market-data/normalized/equities");
            assert_eq!(md.snapshot, i == 0);
            assert_eq!(md.source_seq, i);
            assert_eq!(m.event_id, format!("{source_id:08x}-{i}"));
            assert_eq!(md.partition, 3);
            assert_eq!(md.epoch, 2);
            assert_eq!(m.timestamp, 1_795_786_108_123_456_789 + i as i64);
            let d = m.data.as_ref().expect("data");
            match kind {
                Some(Kind::Trade) => {
                    assert_eq!(d.kind, "trade");
                    assert_eq!(d.price, 150.25);
                    assert_eq!(d.volume, 100 + i as i64);
                }
                _ => {
                    assert_eq!(d.kind, "quote");
                    assert_eq!(d.bid_price, 150.0);
                    assert_eq!(d.bid_size, 5);
                    assert_eq!(d.ask_price, 0.0, "one-sided quote: no ask");
                }
            }
        }
        // The buffer is reusable.
        assert_eq!(batch.events(), 0);
        assert_eq!(batch.take().0.as_ref(), &[0x0a, 0x00]);
    }

    /// What prost writes for the same message: the canonical encoding.
    fn canonical(
        m: &TickMeta<'_>,
        b: &ArchivedFrameBody,
        inst: Option<(&str, &str, &str, u8)>,
    ) -> Vec<u8> {
        let (symbol, exchange, currency, size_decimals) = inst.unwrap_or_default();
        let kind = b.kind();
        let mut d = pb::NormalizedMarketData {
            symbol: symbol.into(),
            exchange: exchange.into(),
            currency: currency.into(),
            kind: kind.map_or("unknown", Kind::name).into(),
            timestamp_ns: b.ts_event() as i64,
            size_decimals: size_decimals.into(),
            ..Default::default()
        };
        if kind == Some(Kind::Quote) {
            (d.bid_price, d.bid_size) = (price(b.px_a()), b.size_a().into());
            (d.ask_price, d.ask_size) = (price(b.px_b()), b.size_b().into());
        } else {
            (d.price, d.volume) = (price(b.px_a()), b.size_a().into());
        }
        let message = pb::MarketDataMessage {
            event_id: format!("{:08x}-{}", b.source_id(), b.source_seq()),
            timestamp: b.ts_event() as i64,
            data: Some(d),
            metadata: Some(pb::MessageMetadata {
                topic: m.topic.into(),
                partition: m.partition,
                epoch: m.epoch,
                sequence: m.seq,
                message_id: format!("{}:{}:{}", m.partition, m.epoch, m.seq),
                ingest_time_ns: b.ts_ingest() as i64,
                send_time_ns: m.send_time_ns as i64,
                snapshot: m.snapshot,
                source_id: b.source_id(),
                source_seq: b.source_seq(),
                conflated: m.conflated,
                redelivery_count: m.redeliveries,
            }),
        };
        pb::MarketDataBatch {
            messages: vec![message],
        }
        .encode_to_vec()
    }

    proptest::proptest! {
        /// Every field at every size (varints of 1 to 10 bytes, strings
        /// long enough to need 2-byte lengths, absent prices, unknown
        /// kinds) encodes byte for byte as prost does, through
        /// [`encode_tick`] and through a reused [`TickEncoder`].
        #[test]
        fn an_element_is_the_canonical_encoding_of_its_message(
            ts in proptest::prop_oneof![proptest::prelude::any::<u64>(), 0u64..300],
            source_seq in proptest::prop_oneof![proptest::prelude::any::<u64>(), 0u64..300],
            px in proptest::prelude::any::<(i64, i64, bool)>(),
            sizes in proptest::prelude::any::<(u32, u32)>(),
            delta in proptest::prelude::any::<i32>(),
            kind in 0u8..4,
            source_id in proptest::prelude::any::<u32>(),
            topic in "[a-z/._-]{0,300}",
            ids in proptest::prelude::any::<(u32, u64, u64, u64, u32)>(),
            small in 0u64..200,
            flags in proptest::prelude::any::<(bool, bool)>(),
            inst in proptest::option::of(("[A-Z0-9-]{0,200}", "[A-Z]{0,20}", "[A-Z]{0,4}", proptest::prelude::any::<u8>())),
        ) {
            let mut body = FrameBody {
                ts_event: ts,
                source_seq,
                px_a: if px.2 { UNDEF_PRICE } else { px.0 },
                px_b: px.1,
                size_a: sizes.0,
                size_b: sizes.1,
                instrument_id: 1,
                ts_ingest_delta: delta,
                kind,
                ..Default::default()
            };
            body.set_source_id(source_id);
            let words = body.to_words();
            let b = ArchivedFrameBody::from_words(&words);
            let meta = TickMeta {
                topic: &topic,
                partition: ids.0,
                epoch: if ids.1 % 2 == 0 { small } else { ids.1 },
                seq: ids.2,
                send_time_ns: ids.3,
                snapshot: flags.0,
                conflated: flags.1,
                redeliveries: ids.4,
            };
            let fields = inst.as_ref().map(|(s, e, c, d)| InstrumentFields::of(s, e, c, *d));
            let expected = canonical(
                &meta,
                b,
                inst.as_ref().map(|(s, e, c, d)| (s.as_str(), e.as_str(), c.as_str(), *d)),
            );
            let mut one = vec![7u8; 3];
            encode_tick(&mut one, &meta, b, fields.as_ref());
            proptest::prop_assert_eq!(&one[..3], &[7u8; 3], "what was in the buffer stays");
            proptest::prop_assert_eq!(&one[3..], &expected[..]);
            let mut enc = TickEncoder::new();
            // A longer element first, so the reused buffer holds old bytes.
            let long = TickMeta { topic: "x".repeat(400).leak(), ..meta };
            enc.encode(&long, b, None);
            proptest::prop_assert_eq!(enc.encode(&meta, b, fields.as_ref()), &expected[..]);
            proptest::prop_assert!(expected.len() <= max_element_len(meta.topic, fields.as_ref()));
        }
    }

    #[test]
    fn an_instruments_pre_encoded_strings_decode_as_its_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = crate::symbology::SymbologyWriter::open(dir.path(), 16).expect("open");
        let id = w
            .resolve(&crate::symbology::Instrument {
                symbol: "BTC-USD".into(),
                exchange: "COINBASE".into(),
                currency: "USD".into(),
                size_decimals: 8,
            })
            .expect("interned");
        let reader = crate::symbology::Symbology::open(dir.path()).expect("reader");
        let inst = InstrumentFields::new(reader.get(id).expect("entry"));
        let words = FrameBody::trade(id, 7, 65_000_500_000_000, 12_345).to_words();
        let meta = TickMeta {
            topic: "crypto/spot",
            partition: 0,
            epoch: u64::MAX,
            seq: u64::MAX,
            send_time_ns: u64::MAX,
            snapshot: true,
            conflated: true,
            redeliveries: 0,
        };
        let mut batch = BatchBuf::new();
        let mut one = Vec::new();
        encode_tick(
            &mut one,
            &meta,
            ArchivedFrameBody::from_words(&words),
            Some(&inst),
        );
        batch.push(&one);
        let decoded = pb::StreamResponse::decode(batch.take().0).expect("decodes");
        let Some(pb::stream_response::Kind::Batch(b)) = decoded.kind else {
            panic!("not a batch");
        };
        let d = b.messages[0].data.clone().expect("data");
        assert_eq!(
            (d.symbol.as_str(), d.exchange.as_str(), d.currency.as_str()),
            ("BTC-USD", "COINBASE", "USD")
        );
        assert_eq!((d.size_decimals, d.volume, d.price), (8, 12_345, 65_000.5));
        let md = b.messages[0].metadata.clone().expect("metadata");
        assert_eq!(md.message_id, format!("0:{}:{}", u64::MAX, u64::MAX));
        assert!(md.snapshot && md.conflated);
    }

    #[test]
    fn batches_cut_from_one_block_stay_intact_while_later_ones_are_written() {
        let mut batch = BatchBuf::new();
        let mut taken = Vec::new();
        let mut seq = 0u64;
        // Enough small and large batches to fill several blocks.
        for size in (1..=60u64).chain([300, 1, 2]) {
            for _ in 0..size {
                seq += 1;
                let words = FrameBody::trade(0, seq, 1, 1).to_words();
                let meta = TickMeta {
                    topic: "t",
                    partition: 0,
                    epoch: 1,
                    seq,
                    send_time_ns: 0,
                    snapshot: false,
                    conflated: false,
                    redeliveries: 0,
                };
                let mut one = Vec::new();
                encode_tick(&mut one, &meta, ArchivedFrameBody::from_words(&words), None);
                batch.push(&one);
            }
            taken.push((size, batch.take()));
        }
        let mut expected = 0u64;
        for (size, wire) in taken {
            let decoded = pb::StreamResponse::decode(wire.0).expect("decodes");
            let Some(pb::stream_response::Kind::Batch(b)) = decoded.kind else {
                panic!("not a batch");
            };
            assert_eq!(b.messages.len() as u64, size);
            for m in b.messages {
                expected += 1;
                assert_eq!(m.metadata.map(|md| md.sequence), Some(expected));
            }
        }
    }
}

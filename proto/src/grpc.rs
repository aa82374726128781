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

#[inline]
fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
fn key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    varint(buf, ((field as u64) << 3) | wire as u64);
}

#[inline]
fn bytes_field(buf: &mut Vec<u8>, field: u32, s: &[u8]) {
    if !s.is_empty() {
        key(buf, field, 2);
        varint(buf, s.len() as u64);
        buf.extend_from_slice(s);
    }
}

#[inline]
fn string(buf: &mut Vec<u8>, field: u32, s: &str) {
    bytes_field(buf, field, s.as_bytes());
}

#[inline]
fn uint(buf: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        key(buf, field, 0);
        varint(buf, v);
    }
}

#[inline]
fn sint64(buf: &mut Vec<u8>, field: u32, v: i64) {
    // proto3 int64: two's complement varint.
    uint(buf, field, v as u64);
}

#[inline]
fn double(buf: &mut Vec<u8>, field: u32, v: f64) {
    if v != 0.0 {
        key(buf, field, 1);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

#[inline]
fn boolean(buf: &mut Vec<u8>, field: u32, v: bool) {
    if v {
        key(buf, field, 0);
        buf.push(1);
    }
}

/// Writes `field` as a length-delimited sub-message built by `f`, with the
/// length patched in after (the body is moved once if its length needs
/// more than one varint byte).
#[inline]
fn nested(buf: &mut Vec<u8>, field: u32, f: impl FnOnce(&mut Vec<u8>)) {
    key(buf, field, 2);
    let at = buf.len();
    buf.push(0);
    f(buf);
    let len = buf.len() - at - 1;
    let n = varint_len(len as u64);
    if n > 1 {
        // Shift the body right by n - 1 bytes.
        buf.resize(buf.len() + n - 1, 0);
        buf.copy_within(at + 1..at + 1 + len, at + n);
    }
    let mut v = len as u64;
    for b in &mut buf[at..at + n] {
        *b = (v as u8 & 0x7f) | 0x80;
        v >>= 7;
    }
    buf[at + n - 1] &= 0x7f;
}

/// Writes a string field made of `parts` joined (ids built from numbers
/// without `format!`: no allocation, no formatting machinery per event).
#[inline]
fn joined(buf: &mut Vec<u8>, field: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    key(buf, field, 2);
    varint(buf, len as u64);
    for p in parts {
        buf.extend_from_slice(p);
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
        let mut buf =
            Vec::with_capacity(e.symbol().len() + e.exchange().len() + e.currency().len() + 6);
        string(&mut buf, 1, e.symbol());
        string(&mut buf, 2, e.exchange());
        string(&mut buf, 3, e.currency());
        InstrumentFields {
            strings: buf.into_boxed_slice(),
            size_decimals: e.size_decimals(),
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

/// Appends one `MarketDataBatch.messages` element (key, length and a
/// `MarketDataMessage`) for a tick to `buf`.
pub fn encode_tick(
    buf: &mut Vec<u8>,
    m: &TickMeta<'_>,
    b: &ArchivedFrameBody,
    inst: Option<&InstrumentFields>,
) {
    // Room for the largest element (ids and varints at their longest,
    // about 270 bytes besides the strings), so the writes below do not
    // grow the buffer one by one.
    buf.reserve(320 + m.topic.len() + inst.map_or(0, |i| i.strings.len()));
    nested(buf, 1, |buf| {
        // event_id: "<source_id hex>-<source_seq>".
        let mut seq = itoa::Buffer::new();
        joined(
            buf,
            1,
            &[
                &hex8(b.source_id()),
                b"-",
                seq.format(b.source_seq()).as_bytes(),
            ],
        );
        sint64(buf, 2, b.ts_event() as i64);
        nested(buf, 3, |buf| {
            if let Some(i) = inst {
                buf.extend_from_slice(&i.strings);
            }
            let kind = b.kind();
            string(buf, 4, kind.map_or("unknown", Kind::name));
            sint64(buf, 5, b.ts_event() as i64);
            match kind {
                Some(Kind::Quote) => {
                    double(buf, 8, price(b.px_a()));
                    sint64(buf, 9, b.size_a() as i64);
                    double(buf, 10, price(b.px_b()));
                    sint64(buf, 11, b.size_b() as i64);
                }
                _ => {
                    double(buf, 6, price(b.px_a()));
                    sint64(buf, 7, b.size_a() as i64);
                }
            }
            uint(buf, 12, inst.map_or(0, |i| i.size_decimals as u64));
        });
        nested(buf, 4, |buf| {
            string(buf, 1, m.topic);
            uint(buf, 2, m.partition as u64);
            uint(buf, 3, m.epoch);
            uint(buf, 4, m.seq);
            let (mut p, mut e, mut s) = (
                itoa::Buffer::new(),
                itoa::Buffer::new(),
                itoa::Buffer::new(),
            );
            joined(
                buf,
                5,
                &[
                    p.format(m.partition).as_bytes(),
                    b":",
                    e.format(m.epoch).as_bytes(),
                    b":",
                    s.format(m.seq).as_bytes(),
                ],
            );
            sint64(buf, 6, b.ts_ingest() as i64);
            sint64(buf, 7, m.send_time_ns as i64);
            boolean(buf, 8, m.snapshot);
            uint(buf, 9, b.source_id() as u64);
            uint(buf, 10, b.source_seq());
            boolean(buf, 11, m.conflated);
            uint(buf, 12, m.redeliveries as u64);
        });
    });
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
        let (mut n, mut v) = (1, self.bytes() as u64);
        while v >= 0x80 {
            head[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        head[n] = v as u8;
        n += 1;
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

//! What the edge bench's clients read of each event, taken straight from
//! the wire: partition, sequence, ingest time and send time from a
//! protobuf `StreamResponse` or a WebSocket JSON `data` message, without
//! building the messages.
//!
//! The clients of all systems share one core with the publisher; building
//! every `MarketDataMessage` (prost) or parsing every JSON object
//! (serde_json) cost that core about half of itself at 3.4M events/s, so
//! the client, not the server, set the figure. The NATS client reads its
//! 16 bytes the same way. That the messages decode as whole messages is
//! checked by the edge's own tests (`api/tests/edge.rs`) and by the tests
//! below against prost and serde_json.

use memchr::memmem;

/// One event as the bench counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventMeta {
    /// Partition.
    pub partition: u32,
    /// Sequence in the partition.
    pub sequence: u64,
    /// Ingest time, ns since the Unix epoch.
    pub ingest_ns: u64,
    /// When the edge took it off the ring, ns since the Unix epoch.
    pub send_ns: u64,
    /// The writer's epoch (gRPC only).
    pub epoch: u64,
    /// The event's sequence at its source (gRPC only).
    pub source_seq: u64,
    /// Times a subscription group sent it before (gRPC only).
    pub redeliveries: u32,
    /// The event's own time, ns since the Unix epoch (gRPC only).
    pub event_ns: u64,
}

/// A gRPC client on a connection of its own (no Nagle), ready to call
/// with a [`RawCodec`]. `url` as `http://host:port`.
///
/// # Errors
/// The URL is bad or the connection fails.
pub async fn raw_client(
    url: String,
) -> Result<tonic::client::Grpc<tonic::transport::Channel>, String> {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
    grpc.ready().await.map_err(|e| e.to_string())?;
    Ok(grpc)
}

/// A client codec that encodes its requests (`E`) with prost and hands
/// each response over as its bytes, for [`grpc_response`].
pub struct RawCodec<E>(std::marker::PhantomData<fn(E)>);

impl<E> Default for RawCodec<E> {
    fn default() -> Self {
        RawCodec(std::marker::PhantomData)
    }
}

/// The response side of [`RawCodec`]: the message's bytes.
pub struct RawDecoder;

impl tonic::codec::Decoder for RawDecoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<bytes::Bytes>, tonic::Status> {
        use bytes::Buf;
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

/// The request side of [`RawCodec`]: prost.
pub struct RequestEncoder<E>(std::marker::PhantomData<fn(E)>);

impl<E: prost::Message> tonic::codec::Encoder for RequestEncoder<E> {
    type Item = E;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: E,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        item.encode(dst)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl<E: prost::Message + Send + 'static> tonic::codec::Codec for RawCodec<E> {
    type Encode = E;
    type Decode = bytes::Bytes;
    type Encoder = RequestEncoder<E>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RequestEncoder<E> {
        RequestEncoder(std::marker::PhantomData)
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// What a `StreamResponse` was, besides the events it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// Events only (one or more batches).
    None,
    /// A gap notice of `from..=to`.
    Gap { from: u64, to: u64 },
    /// A slow-consumer notice.
    Slow,
}

/// A varint at `*i`, moving `*i` past it. Eight bytes are read at once
/// where there are eight: the first byte without a continuation bit ends
/// it, and the 7-bit groups are gathered in three steps with no loop from
/// byte to byte (the edge's encoder spreads them the same way). A scan
/// reads some thirty varints per event, four of them 9-byte timestamps.
#[inline(always)]
fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let at = *i;
    let mut w = [0u8; 8];
    let Some(word) = b.get(at..at + 8) else {
        // Fewer than eight bytes left: the same, padded with zeros (which
        // end a varint), unless it runs past the end.
        let rest = b.get(at..)?;
        w[..rest.len()].copy_from_slice(rest);
        let stops = !u64::from_le_bytes(w) & 0x8080_8080_8080_8080;
        let n = stops.trailing_zeros() as usize / 8 + 1;
        if n > rest.len() {
            return None;
        }
        *i = at + n;
        return Some(gather7(u64::from_le_bytes(w) & ((1u64 << (8 * n)) - 1)));
    };
    w.copy_from_slice(word);
    let w = u64::from_le_bytes(w);
    let stops = !w & 0x8080_8080_8080_8080;
    if stops != 0 {
        let n = stops.trailing_zeros() as usize / 8 + 1;
        let x = if n == 8 {
            w
        } else {
            w & ((1u64 << (8 * n)) - 1)
        };
        *i = at + n;
        return Some(gather7(x));
    }
    // Nine or ten bytes: 56 bits here, then one or two bytes more.
    let low = gather7(w);
    let b8 = *b.get(at + 8)?;
    if b8 < 0x80 {
        *i = at + 9;
        return Some(low | u64::from(b8) << 56);
    }
    let b9 = *b.get(at + 9)?;
    if b9 > 1 {
        return None;
    }
    *i = at + 10;
    Some(low | u64::from(b8 & 0x7f) << 56 | u64::from(b9) << 63)
}

/// The 7-bit groups of eight varint bytes, continuation bits dropped.
#[inline(always)]
fn gather7(x: u64) -> u64 {
    let x = x & 0x7f7f_7f7f_7f7f_7f7f;
    let x = (x & 0x007f_007f_007f_007f) | ((x & 0x7f00_7f00_7f00_7f00) >> 1);
    let x = (x & 0x0000_3fff_0000_3fff) | ((x & 0x3fff_0000_3fff_0000) >> 2);
    (x & 0x0000_0000_0fff_ffff) | ((x & 0x0fff_ffff_0000_0000) >> 4)
}

/// The fields of a message: (field number, varint value or 0, the bytes
/// of a length-delimited field or empty). Fixed-width fields are skipped.
fn fields(b: &[u8], mut f: impl FnMut(u32, u64, &[u8]) -> Option<()>) -> Option<()> {
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => f(field, varint(b, &mut i)?, &[])?,
            1 => i += 8,
            2 => {
                let len = usize::try_from(varint(b, &mut i)?).ok()?;
                let body = b.get(i..i.checked_add(len)?)?;
                i += len;
                f(field, 0, body)?;
            }
            5 => i += 4,
            _ => return None,
        }
    }
    (i == b.len()).then_some(())
}

/// Walks a `StreamResponse`, calling `event` for each event of its batches
/// (a response may hold several batches back to back). `None` when the
/// bytes are not a `StreamResponse`.
pub fn grpc_response(b: &[u8], mut event: impl FnMut(EventMeta)) -> Option<Notice> {
    let mut notice = Notice::None;
    fields(b, |field, _, body| {
        match field {
            // MarketDataBatch { repeated MarketDataMessage messages = 1 }
            1 => fields(body, |f, _, message| {
                if f != 1 {
                    return Some(());
                }
                event(message_in_order(message).or_else(|| message_any_order(message))?);
                Some(())
            })?,
            2 => {
                let (mut from, mut to) = (0, 0);
                fields(body, |f, v, _| {
                    match f {
                        3 => from = v,
                        4 => to = v,
                        _ => {}
                    }
                    Some(())
                })?;
                notice = Notice::Gap { from, to };
            }
            4 => notice = Notice::Slow,
            _ => {}
        }
        Some(())
    })?;
    Some(notice)
}

/// A `MarketDataMessage` walked field by field, in any order.
fn message_any_order(message: &[u8]) -> Option<EventMeta> {
    let mut m = EventMeta::default();
    fields(message, |f, v, meta| {
        match f {
            // MarketDataMessage.timestamp
            2 => m.event_ns = v,
            // MarketDataMessage.metadata
            4 => fields(meta, |f, v, _| {
                match f {
                    2 => m.partition = v as u32,
                    3 => m.epoch = v,
                    4 => m.sequence = v,
                    6 => m.ingest_ns = v,
                    7 => m.send_ns = v,
                    10 => m.source_seq = v,
                    12 => m.redeliveries = v as u32,
                    _ => {}
                }
                Some(())
            })?,
            _ => {}
        }
        Some(())
    })?;
    Some(m)
}

/// Reads the bytes of a length-delimited field (its length first) at `*i`.
#[inline(always)]
fn delimited<'a>(b: &'a [u8], i: &mut usize) -> Option<&'a [u8]> {
    let len = usize::try_from(varint(b, i)?).ok()?;
    let body = b.get(*i..i.checked_add(len)?)?;
    *i += len;
    Some(body)
}

/// The varint of field `key` (a one-byte key) if it is next at `*i`.
#[inline(always)]
fn next_varint(b: &[u8], i: &mut usize, key: u8) -> Option<Option<u64>> {
    if b.get(*i) != Some(&key) {
        return Some(None);
    }
    *i += 1;
    varint(b, i).map(Some)
}

/// The length-delimited field `key` (a one-byte key) if it is next.
#[inline(always)]
fn next_delimited<'a>(b: &'a [u8], i: &mut usize, key: u8) -> Option<Option<&'a [u8]>> {
    if b.get(*i) != Some(&key) {
        return Some(None);
    }
    *i += 1;
    delimited(b, i).map(Some)
}

/// A `MarketDataMessage` whose fields come in field order, each at most
/// once, as every encoder writes them: a test per field that goes the
/// same way event after event, where a walk in any order dispatches on
/// each key (a third of the client core at 2.5M events/s). `None` for
/// anything else (then [`message_any_order`] reads it).
#[inline]
fn message_in_order(message: &[u8]) -> Option<EventMeta> {
    let mut m = EventMeta::default();
    let mut i = 0;
    let b = message;
    // 1 event_id, 2 timestamp, 3 data, 4 metadata.
    next_delimited(b, &mut i, 0x0a)?;
    m.event_ns = next_varint(b, &mut i, 0x10)?.unwrap_or(0);
    next_delimited(b, &mut i, 0x1a)?;
    let meta = next_delimited(b, &mut i, 0x22)?.unwrap_or_default();
    if i != b.len() {
        return None;
    }
    let (b, mut i) = (meta, 0);
    // 1 topic, 2 partition, 3 epoch, 4 sequence, 5 message_id, 6 ingest,
    // 7 send, 8 snapshot, 9 source_id, 10 source_seq, 11 conflated,
    // 12 redelivery count.
    next_delimited(b, &mut i, 0x0a)?;
    m.partition = next_varint(b, &mut i, 0x10)?.unwrap_or(0) as u32;
    m.epoch = next_varint(b, &mut i, 0x18)?.unwrap_or(0);
    m.sequence = next_varint(b, &mut i, 0x20)?.unwrap_or(0);
    next_delimited(b, &mut i, 0x2a)?;
    m.ingest_ns = next_varint(b, &mut i, 0x30)?.unwrap_or(0);
    m.send_ns = next_varint(b, &mut i, 0x38)?.unwrap_or(0);
    next_varint(b, &mut i, 0x40)?;
    next_varint(b, &mut i, 0x48)?;
    m.source_seq = next_varint(b, &mut i, 0x50)?.unwrap_or(0);
    next_varint(b, &mut i, 0x58)?;
    m.redeliveries = next_varint(b, &mut i, 0x60)?.unwrap_or(0) as u32;
    (i == b.len()).then_some(m)
}

/// The unsigned number right after `key` at or after `*at`; moves `*at`
/// past it. `None` when no digit follows the key or the number overflows.
fn number_after(text: &[u8], key: &memmem::Finder<'_>, at: &mut usize) -> Option<u64> {
    let start = *at + key.find(text.get(*at..)?)? + key.needle().len();
    let mut value = 0u64;
    let mut end = start;
    while let Some(d) = text
        .get(end)
        .and_then(|c| c.is_ascii_digit().then(|| c - b'0'))
    {
        value = value.checked_mul(10)?.checked_add(u64::from(d))?;
        end += 1;
    }
    *at = end;
    (end > start).then_some(value)
}

/// The keys a JSON `data` message is scanned for.
pub struct JsonKeys {
    metadata: memmem::Finder<'static>,
    partition: memmem::Finder<'static>,
    sequence: memmem::Finder<'static>,
    ingest: memmem::Finder<'static>,
    send: memmem::Finder<'static>,
}

impl Default for JsonKeys {
    fn default() -> Self {
        JsonKeys {
            metadata: memmem::Finder::new(br#""metadata":{"#),
            partition: memmem::Finder::new(br#""partition":"#),
            sequence: memmem::Finder::new(br#""sequence":"#),
            ingest: memmem::Finder::new(br#""ingest_time_ns":"#),
            send: memmem::Finder::new(br#""send_time_ns":"#),
        }
    }
}

impl JsonKeys {
    /// Calls `event` for each event of a WebSocket `data` message, as the
    /// edge writes it (its metadata keys in the documented order). `None`
    /// when the text is not a data message (notices are parsed whole) or
    /// an event's metadata does not scan.
    pub fn data(&self, text: &[u8], mut event: impl FnMut(EventMeta)) -> Option<usize> {
        if !text.starts_with(br#"{"type":"data""#) {
            return None;
        }
        let (mut at, mut n) = (0, 0);
        while let Some(found) = text.get(at..).and_then(|t| self.metadata.find(t)) {
            at += found + self.metadata.needle().len();
            let m = EventMeta {
                partition: number_after(text, &self.partition, &mut at)? as u32,
                sequence: number_after(text, &self.sequence, &mut at)?,
                ingest_ns: number_after(text, &self.ingest, &mut at)?,
                send_ns: number_after(text, &self.send, &mut at)?,
                ..EventMeta::default()
            };
            event(m);
            n += 1;
        }
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use tickwire_proto::frame::{ArchivedFrameBody, FrameBody};
    use tickwire_proto::grpc::{BatchBuf, TickMeta, encode_tick, notice};

    fn meta(seq: u64) -> TickMeta<'static> {
        TickMeta {
            topic: "bench/edge",
            partition: 3,
            epoch: 1,
            seq,
            send_time_ns: 1_795_786_108_200_000_000 + seq,
            snapshot: false,
            conflated: false,
            redeliveries: (seq % 3) as u32,
        }
    }

    /// Every length of varint, at the end of the bytes and with more
    /// behind it, reads as prost writes it; a varint cut short is `None`.
    #[test]
    fn varints_read_as_prost_writes_them_at_every_length() {
        let mut values = vec![0u64, 1, u64::MAX, u64::MAX - 1, 1 << 63];
        for k in 1..64 {
            values.extend([(1u64 << k) - 1, 1u64 << k, (1u64 << k) + 1]);
        }
        values.push(1_795_786_108_123_456_789);
        for v in values {
            let mut enc = Vec::new();
            prost::encoding::encode_varint(v, &mut enc);
            for tail in [0usize, 1, 7, 9] {
                let mut b = enc.clone();
                b.extend(std::iter::repeat_n(0xffu8, tail));
                let mut i = 0;
                assert_eq!(varint(&b, &mut i), Some(v), "{v} with {tail} bytes after");
                assert_eq!(i, enc.len(), "{v}");
                assert_eq!(
                    prost::encoding::decode_varint(&mut &b[..]).ok(),
                    Some(v),
                    "prost reads {v} back"
                );
            }
            let mut i = 0;
            assert_eq!(varint(&enc[..enc.len() - 1], &mut i), None, "{v} cut short");
        }
        // Eleven bytes of continuation, and a tenth byte above 1: no u64.
        let mut i = 0;
        assert_eq!(varint(&[0xff; 12], &mut i), None);
        let mut over = vec![0xffu8; 9];
        over.push(0x02);
        let mut i = 0;
        assert_eq!(varint(&over, &mut i), None);
        assert!(prost::encoding::decode_varint(&mut &over[..]).is_err());
    }

    #[test]
    fn the_protobuf_scan_reads_what_prost_decodes_across_merged_batches() {
        let mut batch = BatchBuf::new();
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for (round, n) in [(0u64, 300u64), (1, 2)] {
            for i in 0..n {
                let seq = round * 1000 + i + 1;
                let mut body =
                    FrameBody::trade(1, 1_795_786_108_123_456_789 + i, 150_250_000_000, 100);
                body.source_seq = 7_000 + seq;
                let body = body.to_words();
                let b = ArchivedFrameBody::from_words(&body);
                let mut one = Vec::new();
                encode_tick(&mut one, &meta(seq), b, None);
                batch.push(&one);
                expected.push(EventMeta {
                    partition: 3,
                    sequence: seq,
                    ingest_ns: b.ts_ingest(),
                    send_ns: 1_795_786_108_200_000_000 + seq,
                    epoch: 1,
                    source_seq: 7_000 + seq,
                    redeliveries: (seq % 3) as u32,
                    event_ns: b.ts_event(),
                });
            }
            wire.extend_from_slice(&batch.take().0);
        }
        // Two batches back to back: prost merges them into one.
        let decoded = tickwire_proto::pb::StreamResponse::decode(&wire[..]).expect("prost");
        let Some(tickwire_proto::pb::stream_response::Kind::Batch(b)) = decoded.kind else {
            panic!("not a batch");
        };
        let from_prost: Vec<EventMeta> = b
            .messages
            .iter()
            .map(|m| {
                let md = m.metadata.clone().unwrap_or_default();
                EventMeta {
                    partition: md.partition,
                    sequence: md.sequence,
                    ingest_ns: md.ingest_time_ns as u64,
                    send_ns: md.send_time_ns as u64,
                    epoch: md.epoch,
                    source_seq: md.source_seq,
                    redeliveries: md.redelivery_count,
                    event_ns: m.timestamp as u64,
                }
            })
            .collect();
        let mut scanned = Vec::new();
        assert_eq!(
            grpc_response(&wire, |m| scanned.push(m)),
            Some(Notice::None)
        );
        assert_eq!(scanned, from_prost);
        assert_eq!(scanned, expected);
        // A message whose fields come in another order (as another encoder
        // may write them) reads the same, through the walk in any order.
        let m = &b.messages[0];
        let one = tickwire_proto::pb::StreamResponse {
            kind: Some(tickwire_proto::pb::stream_response::Kind::Batch(
                tickwire_proto::pb::MarketDataBatch {
                    messages: vec![m.clone()],
                },
            )),
        }
        .encode_to_vec();
        let in_order = m.encode_to_vec();
        let part = |x: tickwire_proto::pb::MarketDataMessage| x.encode_to_vec();
        let mut reversed = part(tickwire_proto::pb::MarketDataMessage {
            metadata: m.metadata.clone(),
            ..Default::default()
        });
        reversed.extend(part(tickwire_proto::pb::MarketDataMessage {
            data: m.data.clone(),
            ..Default::default()
        }));
        reversed.extend(part(tickwire_proto::pb::MarketDataMessage {
            timestamp: m.timestamp,
            ..Default::default()
        }));
        reversed.extend(part(tickwire_proto::pb::MarketDataMessage {
            event_id: m.event_id.clone(),
            ..Default::default()
        }));
        assert_eq!(reversed.len(), in_order.len());
        assert_ne!(reversed, in_order);
        assert!(message_in_order(&reversed).is_none(), "not in field order");
        let at = one
            .windows(in_order.len())
            .position(|w| w == in_order.as_slice())
            .expect("the message inside its response");
        let mut shuffled = one.clone();
        shuffled[at..at + in_order.len()].copy_from_slice(&reversed);
        let mut read = Vec::new();
        assert_eq!(
            grpc_response(&shuffled, |m| read.push(m)),
            Some(Notice::None)
        );
        assert_eq!(read, vec![from_prost[0]]);
        let gap = notice::gap("bench/edge", 0, 7, 9, "overrun");
        assert_eq!(
            grpc_response(&gap.0, |_| {}),
            Some(Notice::Gap { from: 7, to: 9 })
        );
        assert_eq!(
            grpc_response(&wire[..wire.len() - 1], |_| {}),
            None,
            "cut short"
        );
    }

    #[test]
    fn the_json_scan_reads_what_serde_parses() {
        let mut elements = String::new();
        let mut expected = Vec::new();
        for seq in 1..=50u64 {
            let body = FrameBody::quote(1, 1_795_786_108_123_456_789, (1, 2), (3, 4)).to_words();
            let b = ArchivedFrameBody::from_words(&body);
            if seq > 1 {
                elements.push(',');
            }
            tickwire_api::dispatch::json::encode_tick(&mut elements, &meta(seq), b, None);
            expected.push((3u64, seq, b.ts_ingest(), 1_795_786_108_200_000_000 + seq));
        }
        let text = tickwire_api::dispatch::json::data_message("s1", &elements, 1);
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let parsed: Vec<(u64, u64, u64, u64)> = v["payload"]["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| {
                let md = &m["metadata"];
                let n = |k: &str| md[k].as_u64().unwrap_or(u64::MAX);
                (
                    n("partition"),
                    n("sequence"),
                    n("ingest_time_ns"),
                    n("send_time_ns"),
                )
            })
            .collect();
        let mut scanned = Vec::new();
        let n = JsonKeys::default().data(text.as_bytes(), |m| {
            scanned.push((u64::from(m.partition), m.sequence, m.ingest_ns, m.send_ns))
        });
        assert_eq!(n, Some(50));
        assert_eq!(scanned, parsed);
        assert_eq!(scanned, expected);
        assert_eq!(
            JsonKeys::default().data(br#"{"type":"error"}"#, |_| {}),
            None
        );
    }
}

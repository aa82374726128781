//! The 64-byte slot and the 56-byte frame body every tick travels in.
//!
//! ```text
//!  slot (64 bytes, one cache line, 64-byte aligned)
//!  +--------+------------------------------------------------------------+
//!  | 0..8   | stamp: u64  commit marker = sequence (>= 1); 0 = empty;    |
//!  |        |        seq | WRITING_BIT while the writer fills the body   |
//!  +--------+------------------------------------------------------------+
//!  | 8..64  | body: ArchivedFrameBody (56 bytes, little-endian)          |
//!  +--------+------------------------------------------------------------+
//!
//!  body (offsets within the body; add 8 for the slot offset)
//!   0  ts_event         u64  event time, UTC ns since the Unix epoch
//!   8  source_seq       u64  the source's own sequence (dedup key, with source_id)
//!  16  px_a             i64  trade: price      quote: bid price   (1e-9 fixed point)
//!  24  px_b             i64  trade: UNDEF      quote: ask price   (1e-9 fixed point)
//!                           UNDEF = i64::MAX (0x7fff_ffff_ffff_ffff): no price on that side
//!  32  size_a           u32  trade: size       quote: bid size    (raw, see symbology scale)
//!  36  size_b           u32  trade: 0          quote: ask size
//!  40  instrument_id    u32  symbology id (symbol + exchange + currency); 0 = unknown
//!  44  ts_ingest_delta  i32  ingest time - ts_event, ns, saturating (as DBN's ts_in_delta)
//!  48  kind             u8   Kind: 1 = trade, 2 = quote (others: skip the frame)
//!  49  flags            u8   bit 0 snapshot, bit 1 redelivered, bit 2 buyer aggressor,
//!                            bit 3 seller aggressor (trades); others zero
//!  50  source_id        u16  which source produced it, low half
//!  52  source_id_hi     u16  high half of the 32-bit source id (layout 1.1; 0 before)
//!  54  reserved         [u8; 2]  zero; a minor layout version may give them meaning
//! ```
//!
//! The body is defined with rkyv: [`FrameBody`] is the native value and
//! [`ArchivedFrameBody`] is its archived form, which *is* the documented
//! layout (rkyv's `little_endian` + `aligned` formats, `#[repr(C)]`, no
//! relative pointers). Every 56-byte pattern is a valid `ArchivedFrameBody`,
//! so a reader uses it in place with no validation and no decoding; another
//! language can read it from this table alone.

use rkyv::{Archive, Deserialize, Serialize};

use crate::shm::ShmSafe;

/// Size of one slot in a tick ring.
pub const SLOT_SIZE: usize = 64;
/// Size of the frame body that follows the stamp.
pub const BODY_SIZE: usize = 56;
/// Body size in 64-bit words.
pub const BODY_WORDS: usize = BODY_SIZE / 8;

/// Fixed-point price scale: a price of 150.25 is stored as `150_250_000_000`.
pub const PRICE_SCALE: i64 = 1_000_000_000;
/// "No price" (a one-sided quote, the unused price of a trade).
pub const UNDEF_PRICE: i64 = i64::MAX;

/// The trade or quote came from a snapshot or replay, not a live update.
pub const FLAG_SNAPSHOT: u8 = 1 << 0;
/// The source delivered this event more than once (a redelivery after a failover).
pub const FLAG_REDELIVERED: u8 = 1 << 1;
/// Trade aggressor was the buyer (trades only; neither bit = unknown).
pub const FLAG_BUY_AGGRESSOR: u8 = 1 << 2;
/// Trade aggressor was the seller (trades only).
pub const FLAG_SELL_AGGRESSOR: u8 = 1 << 3;

/// What a frame carries.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A trade: `price`, `size`.
    Trade = 1,
    /// A top-of-book quote: bid/ask price and size.
    Quote = 2,
}

impl Kind {
    /// All kinds, in code order.
    pub const ALL: [Kind; 2] = [Kind::Trade, Kind::Quote];

    /// The wire code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The kind for a wire code, if it is one this version knows.
    pub const fn from_code(code: u8) -> Option<Kind> {
        match code {
            1 => Some(Kind::Trade),
            2 => Some(Kind::Quote),
            _ => None,
        }
    }

    /// Lower-case name, as used in routing keys and JSON (`trade`, `quote`).
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Trade => "trade",
            Kind::Quote => "quote",
        }
    }

    /// Parses `trade`/`trades` or `quote`/`quotes` (any case).
    pub fn parse(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "trade" | "trades" => Some(Kind::Trade),
            "quote" | "quotes" => Some(Kind::Quote),
            _ => None,
        }
    }
}

/// The native form of a frame body. Build one with [`FrameBody::trade`] or
/// [`FrameBody::quote`]; the writer stores its archived form in a slot.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
#[repr(C)]
pub struct FrameBody {
    /// Event time, UTC nanoseconds since the Unix epoch.
    pub ts_event: u64,
    /// The source's own sequence number.
    pub source_seq: u64,
    /// Trade price or bid price, 1e-9 fixed point, [`UNDEF_PRICE`] if absent.
    pub px_a: i64,
    /// Ask price (quotes), [`UNDEF_PRICE`] for trades.
    pub px_b: i64,
    /// Trade size or bid size, raw units (see [`crate::symbology::Instrument::size_decimals`]).
    pub size_a: u32,
    /// Ask size (quotes).
    pub size_b: u32,
    /// Symbology id.
    pub instrument_id: u32,
    /// Ingest time minus `ts_event` in ns, saturating at the i32 range.
    pub ts_ingest_delta: i32,
    /// [`Kind`] code.
    pub kind: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Source identity, low 16 bits (with `source_seq`, the dedup key
    /// across redeliveries); see [`FrameBody::set_source_id`].
    pub source_id: u16,
    /// Source identity, high 16 bits (layout 1.1).
    pub source_id_hi: u16,
    /// Zero.
    pub reserved: [u8; 2],
}

// The archived form is the documented layout: check every offset.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<ArchivedFrameBody>() == BODY_SIZE);
    assert!(align_of::<ArchivedFrameBody>() <= 8);
    assert!(offset_of!(ArchivedFrameBody, ts_event) == 0);
    assert!(offset_of!(ArchivedFrameBody, source_seq) == 8);
    assert!(offset_of!(ArchivedFrameBody, px_a) == 16);
    assert!(offset_of!(ArchivedFrameBody, px_b) == 24);
    assert!(offset_of!(ArchivedFrameBody, size_a) == 32);
    assert!(offset_of!(ArchivedFrameBody, size_b) == 36);
    assert!(offset_of!(ArchivedFrameBody, instrument_id) == 40);
    assert!(offset_of!(ArchivedFrameBody, ts_ingest_delta) == 44);
    assert!(offset_of!(ArchivedFrameBody, kind) == 48);
    assert!(offset_of!(ArchivedFrameBody, flags) == 49);
    assert!(offset_of!(ArchivedFrameBody, source_id) == 50);
    assert!(offset_of!(ArchivedFrameBody, source_id_hi) == 52);
    assert!(offset_of!(ArchivedFrameBody, reserved) == 54);
    assert!(size_of::<FrameBody>() == BODY_SIZE);
};

// SAFETY: `ArchivedFrameBody` is `#[repr(C)]`, 56 bytes, made only of
// little-endian integers and a byte array: no pointers, no padding, every bit
// pattern valid, self-contained.
unsafe impl ShmSafe for ArchivedFrameBody {}

impl FrameBody {
    /// A trade frame.
    pub fn trade(instrument_id: u32, ts_event: u64, price: i64, size: u32) -> FrameBody {
        FrameBody {
            ts_event,
            instrument_id,
            px_a: price,
            px_b: UNDEF_PRICE,
            size_a: size,
            kind: Kind::Trade.code(),
            ..FrameBody::default()
        }
    }

    /// A quote frame.
    pub fn quote(instrument_id: u32, ts_event: u64, bid: (i64, u32), ask: (i64, u32)) -> FrameBody {
        FrameBody {
            ts_event,
            instrument_id,
            px_a: bid.0,
            px_b: ask.0,
            size_a: bid.1,
            size_b: ask.1,
            kind: Kind::Quote.code(),
            ..FrameBody::default()
        }
    }

    /// Sets the 32-bit source id (both halves).
    #[inline]
    pub fn set_source_id(&mut self, id: u32) {
        self.source_id = id as u16;
        self.source_id_hi = (id >> 16) as u16;
    }

    /// The native body of seven stored words: the inverse of
    /// [`to_words`](Self::to_words).
    pub fn from_words(words: &[u64; BODY_WORDS]) -> FrameBody {
        match rkyv::deserialize::<FrameBody, rkyv::rancor::Infallible>(
            ArchivedFrameBody::from_words(words),
        ) {
            Ok(b) => b,
            Err(never) => match never {},
        }
    }

    /// The body as the seven little-endian words the writer stores, i.e.
    /// exactly the bytes of its archived form.
    #[inline]
    pub fn to_words(&self) -> [u64; BODY_WORDS] {
        let tail = (self.kind as u64)
            | (self.flags as u64) << 8
            | (self.source_id as u64) << 16
            | (self.source_id_hi as u64) << 32
            | (u16::from_le_bytes(self.reserved) as u64) << 48;
        [
            self.ts_event,
            self.source_seq,
            self.px_a as u64,
            self.px_b as u64,
            self.size_a as u64 | (self.size_b as u64) << 32,
            self.instrument_id as u64 | (self.ts_ingest_delta as u32 as u64) << 32,
            tail,
        ]
    }
}

impl ArchivedFrameBody {
    /// Views seven words (as copied out of a slot) as a frame body.
    #[inline(always)]
    pub fn from_words(words: &[u64; BODY_WORDS]) -> &ArchivedFrameBody {
        const _: () = assert!(core::mem::size_of::<[u64; BODY_WORDS]>() == BODY_SIZE);
        // SAFETY: `[u64; 7]` is 56 bytes aligned to 8, `ArchivedFrameBody`
        // is 56 bytes with alignment <= 8 and every bit pattern is valid
        // (see the `ShmSafe` impl); on a little-endian machine the words'
        // bytes are the archived layout.
        unsafe { &*(words as *const [u64; BODY_WORDS] as *const ArchivedFrameBody) }
    }

    /// The body as its seven little-endian words (checksums, raw copies).
    #[inline(always)]
    pub fn words(&self) -> &[u64; BODY_WORDS] {
        const _: () = assert!(core::mem::align_of::<ArchivedFrameBody>() == 8);
        // SAFETY: same size (56) and alignment (8, asserted), and any bytes
        // are valid u64s.
        unsafe { &*(self as *const ArchivedFrameBody as *const [u64; BODY_WORDS]) }
    }

    /// The kind, or `None` for a kind code this version does not know.
    #[inline]
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_code(self.kind)
    }

    /// The symbology id.
    #[inline]
    pub fn instrument_id(&self) -> u32 {
        self.instrument_id.to_native()
    }

    /// Event time, UTC ns.
    #[inline]
    pub fn ts_event(&self) -> u64 {
        self.ts_event.to_native()
    }

    /// Ingest time, UTC ns (`ts_event` + the stored delta).
    #[inline]
    pub fn ts_ingest(&self) -> u64 {
        self.ts_event
            .to_native()
            .wrapping_add_signed(self.ts_ingest_delta.to_native() as i64)
    }

    /// The source's sequence number.
    #[inline]
    pub fn source_seq(&self) -> u64 {
        self.source_seq.to_native()
    }

    /// The 32-bit source id (its high half is 0 in frames written before
    /// layout 1.1).
    #[inline]
    pub fn source_id(&self) -> u32 {
        u32::from(self.source_id_hi.to_native()) << 16 | u32::from(self.source_id.to_native())
    }

    /// Flag bits.
    #[inline]
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Trade price or bid price (fixed point, may be [`UNDEF_PRICE`]).
    #[inline]
    pub fn px_a(&self) -> i64 {
        self.px_a.to_native()
    }

    /// Ask price (fixed point, may be [`UNDEF_PRICE`]).
    #[inline]
    pub fn px_b(&self) -> i64 {
        self.px_b.to_native()
    }

    /// Trade size or bid size (raw units).
    #[inline]
    pub fn size_a(&self) -> u32 {
        self.size_a.to_native()
    }

    /// Ask size (raw units).
    #[inline]
    pub fn size_b(&self) -> u32 {
        self.size_b.to_native()
    }

    /// The price a price-range filter looks at: a trade's price; a quote's
    /// mid when both sides are set, else the side that is; `None` if none.
    #[inline]
    pub fn reference_price(&self) -> Option<i64> {
        let (a, b) = (self.px_a(), self.px_b());
        match (self.kind(), a != UNDEF_PRICE, b != UNDEF_PRICE) {
            (Some(Kind::Trade), true, _) => Some(a),
            (Some(Kind::Quote), true, true) => Some(a / 2 + b / 2 + (a % 2 + b % 2) / 2),
            (Some(Kind::Quote), true, false) => Some(a),
            (Some(Kind::Quote), false, true) => Some(b),
            _ => None,
        }
    }

    /// The size a minimum-volume filter looks at: a trade's size, the larger
    /// side of a quote.
    #[inline]
    pub fn reference_size(&self) -> u32 {
        match self.kind() {
            Some(Kind::Quote) => self.size_a().max(self.size_b()),
            _ => self.size_a(),
        }
    }
}

/// Converts a decimal price to fixed point, rounding to the nearest 1e-9.
/// `None` for NaN, infinities and values outside the i64 range.
pub fn price_from_f64(price: f64) -> Option<i64> {
    if !price.is_finite() {
        return None;
    }
    let scaled = (price * PRICE_SCALE as f64).round();
    if scaled >= i64::MAX as f64 || scaled <= i64::MIN as f64 {
        return None;
    }
    Some(scaled as i64)
}

/// Converts a fixed-point price to a decimal; `None` for [`UNDEF_PRICE`].
pub fn price_to_f64(price: i64) -> Option<f64> {
    (price != UNDEF_PRICE).then(|| price as f64 / PRICE_SCALE as f64)
}

/// Saturating `ingest - event` in ns, for [`FrameBody::ts_ingest_delta`].
pub fn ingest_delta(ts_event: u64, ts_ingest: u64) -> i32 {
    let d = ts_ingest as i128 - ts_event as i128;
    d.clamp(i32::MIN as i128, i32::MAX as i128) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_the_rkyv_archived_bytes() {
        let mut body =
            FrameBody::quote(7, 1_700_000_000_123_456_789, (-5, 10), (150_250_000_000, 3));
        body.source_seq = 0xdead_beef_0102_0304;
        body.flags = FLAG_SNAPSHOT | FLAG_REDELIVERED;
        body.set_source_id(0x5678_1234);
        body.ts_ingest_delta = -77;
        body.reserved = [3, 4];
        let archived = rkyv::to_bytes::<rkyv::rancor::Error>(&body).expect("serialize");
        let words = body.to_words();
        let mut ours = Vec::new();
        for w in words {
            ours.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&archived[..], &ours[..]);
        let view = ArchivedFrameBody::from_words(&words);
        assert_eq!(view.instrument_id(), 7);
        assert_eq!(view.px_b(), 150_250_000_000);
        assert_eq!(view.ts_ingest(), body.ts_event - 77);
        assert_eq!(view.source_id(), 0x5678_1234);
        assert_eq!(view.kind(), Some(Kind::Quote));
        let back: FrameBody =
            rkyv::deserialize::<FrameBody, rkyv::rancor::Error>(view).expect("de");
        assert_eq!(back, body);
        assert_eq!(FrameBody::from_words(&words), body);
    }

    #[test]
    fn prices_convert_exactly() {
        assert_eq!(price_from_f64(150.25), Some(150_250_000_000));
        assert_eq!(price_to_f64(150_250_000_000), Some(150.25));
        assert_eq!(price_from_f64(f64::NAN), None);
        assert_eq!(price_from_f64(1e12), None);
        assert_eq!(price_to_f64(UNDEF_PRICE), None);
    }

    #[test]
    fn reference_price_of_quotes() {
        let q = FrameBody::quote(1, 0, (99, 1), (101, 2));
        let w = q.to_words();
        assert_eq!(
            ArchivedFrameBody::from_words(&w).reference_price(),
            Some(100)
        );
        let q = FrameBody::quote(1, 0, (UNDEF_PRICE, 0), (101, 2));
        let w = q.to_words();
        assert_eq!(
            ArchivedFrameBody::from_words(&w).reference_price(),
            Some(101)
        );
        assert_eq!(ArchivedFrameBody::from_words(&w).reference_size(), 2);
    }
}

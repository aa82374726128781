//! A tick as remote users see it: the JSON object `tickwire tail --json`
//! prints, and the edge and history APIs will send (feature `json`).
//!
//! ```text
//!  {"type":"tick","topic":"market-data/normalized/equities","partition":2,"sequence":1041,
//!   "symbol":"AAPL","exchange":"NASDAQ","currency":"USD","instrument_id":1,"kind":"trade",
//!   "ts_event":"2026-11-27T13:28:28.123456789Z","ts_event_ns":1795786108123456789,
//!   "ts_ingest_ns":1795786108123460000,"source_id":2920110593,"source_seq":1795786100000000001,
//!   "flags":4,"price":150.25,"size":100}
//! ```
//!
//! - `price`, `size` (trades) or `bid_price`, `bid_size`, `ask_price`,
//!   `ask_size` (quotes) are JSON numbers written as exact decimals: the
//!   frame's fixed-point value (prices at 1e-9, sizes at the instrument's
//!   `size_decimals`) printed digit for digit, never through a float, so
//!   12345678.123456789 stays exactly that. A side with no price is absent.
//! - `ts_event` is RFC 3339 UTC with nanoseconds; `ts_event_ns` and
//!   `ts_ingest_ns` are ns since the Unix epoch.
//! - `source_id` (32 bits) with `source_seq` identifies the event at its
//!   source: the same pair is the same event (a redelivery).
//! - `symbol`, `exchange` and `currency` are null when the instrument id
//!   does not resolve in the node's symbology.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::frame::{ArchivedFrameBody, Kind, PRICE_SCALE, UNDEF_PRICE};
use crate::symbology::Entry;

/// An exact decimal: `mantissa / 10^scale`, serialized as a JSON number
/// with exactly those digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    /// The digits.
    pub mantissa: i64,
    /// Digits after the point (0..=18).
    pub scale: u8,
}

impl Decimal {
    /// A frame price (1e-9 fixed point); `None` for [`UNDEF_PRICE`].
    pub fn price(px: i64) -> Option<Decimal> {
        (px != UNDEF_PRICE).then_some(Decimal {
            mantissa: px,
            scale: 9,
        })
    }

    /// A raw size with its instrument's decimal places.
    pub fn size(raw: u32, decimals: u8) -> Decimal {
        Decimal {
            mantissa: raw as i64,
            scale: decimals.min(18),
        }
    }

    /// The value as an `f64` (lossy; for display and comparisons).
    pub fn to_f64(self) -> f64 {
        self.mantissa as f64 / 10f64.powi(self.scale as i32)
    }
}

impl Decimal {
    /// Appends the decimal's digits (as [`Display`](std::fmt::Display)
    /// writes them) without allocating: the edge writes two per event.
    pub fn write_to(self, out: &mut String) {
        let scale = self.scale.min(18);
        let unit = 10u64.pow(scale as u32);
        let abs = self.mantissa.unsigned_abs();
        let (int, frac) = (abs / unit, abs % unit);
        if self.mantissa < 0 {
            out.push('-');
        }
        out.push_str(itoa::Buffer::new().format(int));
        if frac != 0 {
            let mut digits = itoa::Buffer::new();
            let digits = digits.format(frac);
            out.push('.');
            for _ in digits.len()..scale as usize {
                out.push('0');
            }
            out.push_str(digits.trim_end_matches('0'));
        }
    }
}

impl std::fmt::Display for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = String::with_capacity(24);
        self.write_to(&mut out);
        f.write_str(&out)
    }
}

impl std::str::FromStr for Decimal {
    type Err = String;
    fn from_str(s: &str) -> Result<Decimal, String> {
        let bad = || format!("{s:?} is not a decimal number");
        let (neg, body) = s.strip_prefix('-').map_or((false, s), |b| (true, b));
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        if int.is_empty()
            || frac.len() > 18
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let digits: i128 = format!("{int}{frac}").parse().map_err(|_| bad())?;
        let mantissa = i64::try_from(if neg { -digits } else { digits }).map_err(|_| bad())?;
        Ok(Decimal {
            mantissa,
            scale: frac.len() as u8,
        })
    }
}

impl Serialize for Decimal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw = RawValue::from_string(self.to_string()).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Decimal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        let raw: Box<RawValue> = Deserialize::deserialize(d)?;
        raw.get().parse().map_err(serde::de::Error::custom)
    }
}

/// One tick, as JSON users see it (see the module docs for the fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TickJson {
    /// Always `"tick"`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Topic name.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Sequence in the partition.
    pub sequence: u64,
    /// Symbol, if the instrument resolves.
    pub symbol: Option<String>,
    /// Exchange.
    pub exchange: Option<String>,
    /// Currency.
    pub currency: Option<String>,
    /// The node-local instrument id.
    pub instrument_id: u32,
    /// `trade`, `quote` or `unknown`.
    pub kind: String,
    /// Event time, RFC 3339 UTC.
    pub ts_event: String,
    /// Event time, ns since the Unix epoch.
    pub ts_event_ns: u64,
    /// Ingest time, ns since the Unix epoch.
    pub ts_ingest_ns: u64,
    /// Source identity.
    pub source_id: u32,
    /// The source's sequence.
    pub source_seq: u64,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Trade price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Decimal>,
    /// Trade size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Decimal>,
    /// Bid price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bid_price: Option<Decimal>,
    /// Bid size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bid_size: Option<Decimal>,
    /// Ask price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ask_price: Option<Decimal>,
    /// Ask size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ask_size: Option<Decimal>,
}

/// RFC 3339 UTC with nanoseconds for a time in ns since the Unix epoch.
pub fn rfc3339(ns: u64) -> String {
    let mut out = String::with_capacity(30);
    write_rfc3339(&mut out, ns);
    out
}

/// Appends `ns` (since the Unix epoch) as RFC 3339 UTC with nine fraction
/// digits, `2026-11-27T13:28:28.123456789Z`, without allocating (the edge
/// writes one per event). A u64 of ns ends in 2554: the year always has
/// four digits.
///
/// The text up to the seconds is kept per thread for the last second
/// written: events come in time order, so most of them only write their
/// nine fraction digits (the civil date and the digit-by-digit division
/// were an eighth of a WebSocket dispatcher's time).
pub fn write_rfc3339(out: &mut String, ns: u64) {
    thread_local! {
        /// (second, "YYYY-MM-DDTHH:MM:SS.") of the last second written.
        static LAST: std::cell::Cell<(u64, [u8; 20])> = const { std::cell::Cell::new((u64::MAX, [0; 20])) };
    }
    let secs = ns / 1_000_000_000;
    let nanos = (ns % 1_000_000_000) as u32;
    let mut text = [0u8; 30];
    let (last, prefix) = LAST.get();
    if last == secs {
        text[..20].copy_from_slice(&prefix);
    } else {
        seconds_prefix(secs, &mut text);
        let mut prefix = [0u8; 20];
        prefix.copy_from_slice(&text[..20]);
        LAST.set((secs, prefix));
    }
    let mut v = nanos;
    for d in text[20..29].iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    text[29] = b'Z';
    // Every byte is an ASCII digit or one of "-T:.Z".
    out.push_str(std::str::from_utf8(&text).unwrap_or_default());
}

/// `YYYY-MM-DDTHH:MM:SS.` of `secs` since the Unix epoch into `text[..20]`.
fn seconds_prefix(secs: u64, text: &mut [u8; 30]) {
    let days = (secs / 86_400) as i64;
    let rem = (secs % 86_400) as u32;
    // Days to a civil date (H. Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
    let mut at = 0;
    let mut digits = |v: u32, n: u32, after: u8| {
        for i in (0..n).rev() {
            text[at] = b'0' + (v / 10u32.pow(i) % 10) as u8;
            at += 1;
        }
        text[at] = after;
        at += 1;
    };
    digits(year, 4, b'-');
    digits(month, 2, b'-');
    digits(day, 2, b'T');
    digits(rem / 3600, 2, b':');
    digits(rem / 60 % 60, 2, b':');
    digits(rem % 60, 2, b'.');
}

impl TickJson {
    /// The JSON form of a frame read from `topic`'s `partition` at `seq`,
    /// with its instrument's symbology entry when it resolves.
    pub fn new(
        topic: &str,
        partition: u32,
        seq: u64,
        b: &ArchivedFrameBody,
        inst: Option<&Entry>,
    ) -> TickJson {
        let decimals = inst.map_or(0, Entry::size_decimals);
        let size = |raw: u32| Some(Decimal::size(raw, decimals));
        let mut t = TickJson {
            type_: "tick".into(),
            topic: topic.into(),
            partition,
            sequence: seq,
            symbol: inst.map(|e| e.symbol().to_string()),
            exchange: inst.map(|e| e.exchange().to_string()),
            currency: inst.map(|e| e.currency().to_string()),
            instrument_id: b.instrument_id(),
            kind: b.kind().map_or("unknown", Kind::name).into(),
            ts_event: rfc3339(b.ts_event()),
            ts_event_ns: b.ts_event(),
            ts_ingest_ns: b.ts_ingest(),
            source_id: b.source_id(),
            source_seq: b.source_seq(),
            flags: b.flags(),
            price: None,
            size: None,
            bid_price: None,
            bid_size: None,
            ask_price: None,
            ask_size: None,
        };
        match b.kind() {
            Some(Kind::Quote) => {
                t.bid_price = Decimal::price(b.px_a());
                t.bid_size = size(b.size_a());
                t.ask_price = Decimal::price(b.px_b());
                t.ask_size = size(b.size_b());
            }
            _ => {
                t.price = Decimal::price(b.px_a());
                t.size = size(b.size_a());
            }
        }
        t
    }
}

const _: () = assert!(PRICE_SCALE == 1_000_000_000);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameBody;

    #[test]
    fn prices_and_sizes_are_exact_decimals() {
        let d = |m, s| {
            Decimal {
                mantissa: m,
                scale: s,
            }
            .to_string()
        };
        assert_eq!(d(150_250_000_000, 9), "150.25");
        assert_eq!(d(12_345_678_123_456_789, 9), "12345678.123456789");
        assert_eq!(d(1, 9), "0.000000001");
        assert_eq!(d(-500_000_000, 9), "-0.5");
        assert_eq!(d(i64::MIN, 9), "-9223372036.854775808");
        assert_eq!(d(20_000, 6), "0.02");
        assert_eq!(d(100, 0), "100");
        let body = FrameBody::trade(7, 1, 12_345_678_123_456_789, 20_000).to_words();
        let t = TickJson::new("t", 0, 1, ArchivedFrameBody::from_words(&body), None);
        let text = serde_json::to_string(&t).expect("json");
        assert!(
            text.contains("\"price\":12345678.123456789,\"size\":20000"),
            "{text}"
        );
        let back: TickJson = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, t);
        assert_eq!(
            "12345678.123456789".parse::<Decimal>(),
            Ok(Decimal {
                mantissa: 12_345_678_123_456_789,
                scale: 9
            })
        );
        assert!("1e5".parse::<Decimal>().is_err());
    }

    proptest::proptest! {
        #[test]
        fn decimals_write_the_digits_of_exact_division(mantissa: i64, scale in 0u8..=18) {
            let text = Decimal { mantissa, scale }.to_string();
            let unit = 10i128.pow(scale as u32);
            let (v, int, frac) = (mantissa as i128, (mantissa as i128).abs() / unit, (mantissa as i128).abs() % unit);
            let mut expected = format!("{}{int}", if v < 0 { "-" } else { "" });
            if frac != 0 {
                let digits = format!("{frac:0width$}", width = scale as usize);
                expected = format!("{expected}.{}", digits.trim_end_matches('0'));
            }
            proptest::prop_assert_eq!(&text, &expected);
        }

        #[test]
        fn rfc3339_is_humantimes_format(ns: u64) {
            let expected = humantime::format_rfc3339_nanos(
                std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns),
            )
            .to_string();
            proptest::prop_assert_eq!(rfc3339(ns), expected);
        }
    }

    #[test]
    fn rfc3339_of_times_in_the_same_second_and_back_again_is_each_times_own() {
        // The kept second must not leak into another one: forwards within
        // a second, across a day, and back to an earlier second.
        let base = 1_795_786_108_000_000_000u64;
        for ns in [
            base,
            base + 999_999_999,
            base + 1,
            base + 86_400_000_000_000,
            base - 1,
            base,
            0,
            u64::MAX,
        ] {
            let expected = humantime::format_rfc3339_nanos(
                std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns),
            )
            .to_string();
            assert_eq!(rfc3339(ns), expected, "{ns}");
        }
    }

    #[test]
    fn rfc3339_at_the_edges_of_days_months_and_leap_years() {
        for (ns, text) in [
            (0, "1970-01-01T00:00:00.000000000Z"),
            (951_782_400_000_000_000, "2000-02-29T00:00:00.000000000Z"),
            (1_795_786_108_123_456_789, "2026-11-27T13:28:28.123456789Z"),
            (4_107_542_399_999_999_999, "2100-02-28T23:59:59.999999999Z"),
            (u64::MAX, "2554-07-21T23:34:33.709551615Z"),
        ] {
            assert_eq!(rfc3339(ns), text);
        }
    }
}

//! Message payloads: JSON `NormalizedMarketData` (the spec's field names) or
//! its protobuf form, parsed and validated into a [`MarketEvent`]. A bad
//! payload becomes a [`Reject`] whose reason goes to the dead-letter topic.

use serde::Deserialize;
use tickwire_proto::Kind;
use tickwire_proto::frame::{UNDEF_PRICE, price_from_f64};
use tickwire_proto::symbology::Instrument;

/// The protobuf types (generated once, in `tickwire-proto`).
pub use tickwire_proto::pb;

/// Payload encodings the bridge accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JSON `NormalizedMarketData`.
    Json,
    /// Protobuf `tickwire.v1.NormalizedMarketData`.
    Protobuf,
}

/// Limits on what is accepted.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest payload, bytes.
    pub max_payload_bytes: usize,
    /// How far in the future an event time may lie, ns.
    pub max_future_ns: u64,
    /// When not empty, the only exchanges accepted.
    pub exchanges: Vec<String>,
}

/// A validated event, ready for the broker's router.
#[derive(Debug, Clone, PartialEq)]
pub struct MarketEvent {
    /// Instrument (symbol, exchange, currency, size decimals).
    pub instrument: Instrument,
    /// Trade or quote.
    pub kind: Kind,
    /// Event time, UTC ns.
    pub ts_event: u64,
    /// Trade price or bid (1e-9 fixed point, may be UNDEF).
    pub px_a: i64,
    /// Ask (quotes).
    pub px_b: i64,
    /// Trade size or bid size, raw.
    pub size_a: u32,
    /// Ask size, raw.
    pub size_b: u32,
}

/// Why a payload was refused. `code()` is the dead-letter `reason` property.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// Larger than the limit.
    #[error("payload of {size} bytes exceeds the {limit}-byte limit")]
    Oversized {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not valid JSON / protobuf for the schema.
    #[error("payload does not decode: {0}")]
    Decode(String),
    /// A required field is absent or empty.
    #[error("missing field {0}")]
    Missing(&'static str),
    /// A price is NaN, infinite, negative or out of range.
    #[error("invalid {field}: {value}")]
    Price {
        /// Field.
        field: &'static str,
        /// What it was.
        value: String,
    },
    /// A size is negative or too large for its scale.
    #[error("invalid {field}: {value}")]
    Size {
        /// Field.
        field: &'static str,
        /// What it was.
        value: String,
    },
    /// The event time is too far ahead of now.
    #[error("timestamp {ts_ns} ns is {ahead_ms} ms in the future (limit {limit_ms} ms)")]
    Future {
        /// The time.
        ts_ns: u64,
        /// How far ahead.
        ahead_ms: u64,
        /// The limit.
        limit_ms: u64,
    },
    /// A timestamp that cannot be read.
    #[error("invalid timestamp: {0}")]
    Timestamp(String),
    /// Exchange not in the configured list.
    #[error("unknown exchange {0:?}")]
    UnknownExchange(String),
    /// A name is too long or has control characters, or kind is unknown.
    #[error("invalid {0}")]
    Invalid(String),
}

impl Reject {
    /// The short, stable reason code put in the dead-letter message's
    /// `reason` property (the full text goes in `detail`).
    pub fn code(&self) -> &'static str {
        match self {
            Reject::Oversized { .. } => "oversized",
            Reject::Decode(_) => "decode",
            Reject::Missing(_) => "missing_field",
            Reject::Price { .. } => "invalid_price",
            Reject::Size { .. } => "invalid_volume",
            Reject::Future { .. } => "future_timestamp",
            Reject::Timestamp(_) => "invalid_timestamp",
            Reject::UnknownExchange(_) => "unknown_exchange",
            Reject::Invalid(_) => "invalid_field",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonData {
    symbol: Option<String>,
    exchange: Option<String>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    timestamp: Option<serde_json::Value>,
    #[serde(default)]
    timestamp_ns: Option<u64>,
    #[serde(default)]
    price: Option<f64>,
    #[serde(default)]
    volume: Option<f64>,
    #[serde(default)]
    bid_price: Option<f64>,
    #[serde(default)]
    bid_size: Option<f64>,
    #[serde(default)]
    ask_price: Option<f64>,
    #[serde(default)]
    ask_size: Option<f64>,
    #[serde(default)]
    size_decimals: Option<u8>,
}

/// Everything but the encoding: the same checks for JSON and protobuf.
struct Fields {
    symbol: String,
    exchange: String,
    currency: String,
    kind: String,
    ts_event: Option<u64>,
    price: Option<f64>,
    volume: Option<f64>,
    bid_price: Option<f64>,
    bid_size: Option<f64>,
    ask_price: Option<f64>,
    ask_size: Option<f64>,
    size_decimals: u8,
    /// Sizes are already raw integers (protobuf) rather than real units (JSON).
    sizes_raw: bool,
}

/// Parses `data` as a JSON and as a protobuf payload under the default
/// limits: the fuzz target `payload` and its corpus replay run this. It
/// must return (with a [`Reject`] or an event) for every input.
pub fn parse_both_formats(data: &[u8]) {
    let limits = crate::BridgeConfig::default().limits();
    let now = 1_800_000_000_000_000_000;
    for format in [Format::Json, Format::Protobuf] {
        if let Ok(e) = parse(format, data, &limits, now) {
            assert!(
                e.instrument.validate().is_ok(),
                "an accepted event has a valid instrument"
            );
        }
    }
}

/// Parses and validates one payload. `now_ns` is the current UTC time.
///
/// # Errors
/// A [`Reject`] naming what was wrong.
pub fn parse(
    format: Format,
    payload: &[u8],
    limits: &Limits,
    now_ns: u64,
) -> Result<MarketEvent, Reject> {
    if payload.len() > limits.max_payload_bytes {
        return Err(Reject::Oversized {
            size: payload.len(),
            limit: limits.max_payload_bytes,
        });
    }
    let f = match format {
        Format::Json => {
            let j: JsonData =
                serde_json::from_slice(payload).map_err(|e| Reject::Decode(e.to_string()))?;
            let ts_event = match (j.timestamp_ns, &j.timestamp) {
                (Some(ns), _) => Some(ns),
                (None, Some(serde_json::Value::String(s))) => {
                    let t = humantime_rfc3339(s)
                        .ok_or_else(|| Reject::Timestamp(format!("{s:?} is not RFC 3339")))?;
                    Some(t)
                }
                (None, Some(serde_json::Value::Number(n))) => {
                    // Integer milliseconds since the epoch, as JSON producers usually send.
                    let ms = n.as_u64().ok_or_else(|| {
                        Reject::Timestamp(format!(
                            "{n} is not a non-negative integer of milliseconds"
                        ))
                    })?;
                    Some(
                        ms.checked_mul(1_000_000)
                            .ok_or_else(|| Reject::Timestamp(format!("{ms} ms overflows")))?,
                    )
                }
                (None, Some(other)) => {
                    return Err(Reject::Timestamp(format!(
                        "{other} is neither RFC 3339 text nor milliseconds"
                    )));
                }
                (None, None) => None,
            };
            Fields {
                symbol: j.symbol.unwrap_or_default(),
                exchange: j.exchange.unwrap_or_default(),
                currency: j.currency.unwrap_or_else(|| "USD".into()),
                kind: j.kind.unwrap_or_else(|| "trade".into()),
                ts_event,
                price: j.price,
                volume: j.volume,
                bid_price: j.bid_price,
                bid_size: j.bid_size,
                ask_price: j.ask_price,
                ask_size: j.ask_size,
                size_decimals: j.size_decimals.unwrap_or(0),
                sizes_raw: false,
            }
        }
        Format::Protobuf => {
            let m = <pb::NormalizedMarketData as prost::Message>::decode(payload)
                .map_err(|e| Reject::Decode(e.to_string()))?;
            let opt = |v: f64| (v != 0.0 || v.is_nan()).then_some(v);
            let opt_i = |v: i64| (v != 0).then_some(v as f64);
            Fields {
                symbol: m.symbol,
                exchange: m.exchange,
                currency: if m.currency.is_empty() {
                    "USD".into()
                } else {
                    m.currency
                },
                kind: if m.kind.is_empty() {
                    "trade".into()
                } else {
                    m.kind
                },
                ts_event: match m.timestamp_ns {
                    0 => None,
                    t if t < 0 => return Err(Reject::Timestamp(format!("{t} is negative"))),
                    t => Some(t as u64),
                },
                price: opt(m.price),
                volume: opt_i(m.volume),
                bid_price: opt(m.bid_price),
                bid_size: opt_i(m.bid_size),
                ask_price: opt(m.ask_price),
                ask_size: opt_i(m.ask_size),
                size_decimals: u8::try_from(m.size_decimals)
                    .map_err(|_| Reject::Invalid(format!("size_decimals {}", m.size_decimals)))?,
                sizes_raw: true,
            }
        }
    };
    validate(f, limits, now_ns)
}

fn validate(f: Fields, limits: &Limits, now_ns: u64) -> Result<MarketEvent, Reject> {
    if f.symbol.trim().is_empty() {
        return Err(Reject::Missing("symbol"));
    }
    if f.exchange.trim().is_empty() {
        return Err(Reject::Missing("exchange"));
    }
    if !limits.exchanges.is_empty() && !limits.exchanges.contains(&f.exchange) {
        return Err(Reject::UnknownExchange(f.exchange));
    }
    let kind = Kind::parse(&f.kind)
        .ok_or_else(|| Reject::Invalid(format!("kind {:?} (trade or quote)", f.kind)))?;
    let instrument = Instrument {
        symbol: f.symbol,
        exchange: f.exchange,
        currency: f.currency,
        size_decimals: f.size_decimals,
    };
    instrument
        .validate()
        .map_err(|e| Reject::Invalid(e.to_string()))?;
    let ts_event = f.ts_event.ok_or(Reject::Missing("timestamp"))?;
    if ts_event > now_ns.saturating_add(limits.max_future_ns) {
        return Err(Reject::Future {
            ts_ns: ts_event,
            ahead_ms: (ts_event - now_ns) / 1_000_000,
            limit_ms: limits.max_future_ns / 1_000_000,
        });
    }
    let price = |field: &'static str, v: Option<f64>, required: bool| -> Result<i64, Reject> {
        match v {
            None if required => Err(Reject::Missing(field)),
            None => Ok(UNDEF_PRICE),
            Some(p) if !p.is_finite() || p < 0.0 => Err(Reject::Price {
                field,
                value: p.to_string(),
            }),
            Some(p) => price_from_f64(p).ok_or(Reject::Price {
                field,
                value: p.to_string(),
            }),
        }
    };
    let scale = if f.sizes_raw {
        1.0
    } else {
        10f64.powi(f.size_decimals as i32)
    };
    let size = |field: &'static str, v: Option<f64>| -> Result<u32, Reject> {
        let Some(s) = v else { return Ok(0) };
        let raw = (s * scale).round();
        if !s.is_finite() || s < 0.0 || raw > u32::MAX as f64 {
            return Err(Reject::Size {
                field,
                value: s.to_string(),
            });
        }
        Ok(raw as u32)
    };
    let (px_a, px_b, size_a, size_b) = match kind {
        Kind::Trade => (
            price("price", f.price, true)?,
            UNDEF_PRICE,
            size("volume", f.volume)?,
            0,
        ),
        Kind::Quote => {
            let (bid, ask) = (
                price("bid_price", f.bid_price, false)?,
                price("ask_price", f.ask_price, false)?,
            );
            if bid == UNDEF_PRICE && ask == UNDEF_PRICE {
                return Err(Reject::Missing("bid_price or ask_price"));
            }
            (
                bid,
                ask,
                size("bid_size", f.bid_size)?,
                size("ask_size", f.ask_size)?,
            )
        }
    };
    Ok(MarketEvent {
        instrument,
        kind,
        ts_event,
        px_a,
        px_b,
        size_a,
        size_b,
    })
}

/// RFC 3339 (`2025-06-21T09:30:00.200Z`, offsets allowed) to UTC ns.
fn humantime_rfc3339(s: &str) -> Option<u64> {
    // Normalise an explicit offset to Z: humantime reads only UTC.
    let (base, offset_s) = split_offset(s)?;
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    let ns = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos() as i128
        - offset_s as i128 * 1_000_000_000;
    u64::try_from(ns).ok()
}

fn split_offset(s: &str) -> Option<(&str, i64)> {
    if let Some(b) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        return Some((b, 0));
    }
    let tpos = s.find('T')?;
    let idx = s[tpos..].rfind(['+', '-']).map(|i| i + tpos)?;
    let (base, off) = s.split_at(idx);
    let sign = if off.starts_with('-') { -1 } else { 1 };
    let (h, m) = off[1..].split_once(':')?;
    // RFC 3339: exactly two digits each, hours 00..=23, minutes 00..=59
    // (anything else, however long, is not an offset: found by fuzzing).
    let two_digits = |v: &str, max: i64| {
        (v.len() == 2 && v.bytes().all(|b| b.is_ascii_digit()))
            .then(|| v.parse::<i64>().ok())
            .flatten()
            .filter(|&n| n <= max)
    };
    let (h, m) = (two_digits(h, 23)?, two_digits(m, 59)?);
    Some((base, sign * (h * 3600 + m * 60)))
}

/// Encodes a protobuf payload (for producers and tests).
pub fn encode(m: &pb::NormalizedMarketData, buf: &mut Vec<u8>) {
    // Encoding into a Vec cannot run out of space.
    let _ = prost::Message::encode(m, buf);
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_absurd_utc_offset_is_a_timestamp_reject_not_an_overflow() {
        let limits = crate::BridgeConfig::default().limits();
        for ts in [
            "2026-11-27T13:28:28+99999999999999999:00",
            "2026-11-27T13:28:28+24:00",
            "2026-11-27T13:28:28+01:60",
            "2026-11-27T13:28:28+1:00",
        ] {
            let p = format!(
                r#"{{"symbol":"AAPL","exchange":"NASDAQ","timestamp":"{ts}","price":1,"volume":1}}"#
            );
            match parse(
                Format::Json,
                p.as_bytes(),
                &limits,
                1_800_000_000_000_000_000,
            ) {
                Err(Reject::Timestamp(_)) => {}
                other => panic!("{ts}: {other:?}"),
            }
        }
        let p = r#"{"symbol":"AAPL","exchange":"NASDAQ","timestamp":"2026-11-27T14:28:28+01:00","price":1,"volume":1}"#;
        let e = parse(
            Format::Json,
            p.as_bytes(),
            &limits,
            1_800_000_000_000_000_000,
        )
        .expect("valid offset");
        assert_eq!(Some(e.ts_event), humantime_rfc3339("2026-11-27T13:28:28Z"));
    }

    use super::*;

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 1024,
            max_future_ns: 60_000_000_000,
            exchanges: vec![],
        }
    }
    const NOW: u64 = 1_750_000_000_000_000_000;

    fn json(s: &str) -> Result<MarketEvent, Reject> {
        parse(Format::Json, s.as_bytes(), &limits(), NOW)
    }

    #[test]
    fn the_spec_example_parses() {
        let e = json(r#"{"symbol":"AAPL","exchange":"NASDAQ","timestamp":"2025-06-15T15:06:40.200Z","price":150.25,"volume":1000}"#).expect("valid");
        assert_eq!(e.instrument.symbol, "AAPL");
        assert_eq!(e.px_a, 150_250_000_000);
        assert_eq!(e.size_a, 1000);
        assert_eq!(e.kind, Kind::Trade);
        let e2 = json(r#"{"symbol":"AAPL","exchange":"NASDAQ","timestamp":"2025-06-15T17:06:40.200+02:00","price":150.25,"volume":1000}"#).expect("offset");
        assert_eq!(e.ts_event, e2.ts_event);
    }

    #[test]
    fn every_kind_of_bad_input_is_named() {
        let cases = [
            ("{", "decode"),
            (
                r#"{"exchange":"X","timestamp_ns":1,"price":1}"#,
                "missing_field",
            ),
            (
                r#"{"symbol":"A","exchange":"X","timestamp_ns":1,"price":-1}"#,
                "invalid_price",
            ),
            (
                r#"{"symbol":"A","exchange":"X","timestamp_ns":1,"price":1,"volume":-5}"#,
                "invalid_volume",
            ),
            (
                r#"{"symbol":"A","exchange":"X","timestamp_ns":1,"price":1,"volume":1e12}"#,
                "invalid_volume",
            ),
            (
                r#"{"symbol":"A","exchange":"X","timestamp_ns":1850000000000000000,"price":1}"#,
                "future_timestamp",
            ),
            (
                r#"{"symbol":"A","exchange":"X","timestamp":"yesterday","price":1}"#,
                "invalid_timestamp",
            ),
            (
                r#"{"symbol":"A","exchange":"X","timestamp_ns":1,"price":1,"kind":"bar"}"#,
                "invalid_field",
            ),
            (
                r#"{"symbol":"A","exchange":"X","timestamp_ns":1,"price":1,"colour":"red"}"#,
                "decode",
            ),
        ];
        for (payload, code) in cases {
            let r = json(payload).expect_err(payload);
            assert_eq!(r.code(), code, "{payload}: {r}");
        }
        let nan = parse(
            Format::Protobuf,
            &prost::Message::encode_to_vec(&pb::NormalizedMarketData {
                symbol: "A".into(),
                exchange: "X".into(),
                timestamp_ns: 1,
                price: f64::NAN,
                ..Default::default()
            }),
            &limits(),
            NOW,
        );
        assert_eq!(nan.expect_err("nan").code(), "invalid_price");
        let big = vec![b' '; 2000];
        assert_eq!(
            parse(Format::Json, &big, &limits(), NOW)
                .expect_err("big")
                .code(),
            "oversized"
        );
        let strict = Limits {
            exchanges: vec!["NASDAQ".into()],
            ..limits()
        };
        let r = parse(
            Format::Json,
            br#"{"symbol":"A","exchange":"X","timestamp_ns":1,"price":1}"#,
            &strict,
            NOW,
        );
        assert_eq!(r.expect_err("strict").code(), "unknown_exchange");
    }

    #[test]
    fn protobuf_quotes_parse() {
        let m = pb::NormalizedMarketData {
            symbol: "BTC-USD".into(),
            exchange: "COINBASE".into(),
            kind: "quote".into(),
            timestamp_ns: 5,
            bid_price: 100.5,
            bid_size: 2,
            ask_price: 100.6,
            ask_size: 3,
            size_decimals: 2,
            ..Default::default()
        };
        let e = parse(
            Format::Protobuf,
            &prost::Message::encode_to_vec(&m),
            &limits(),
            NOW,
        )
        .expect("quote");
        assert_eq!(
            (e.kind, e.px_a, e.px_b, e.size_a, e.size_b),
            (Kind::Quote, 100_500_000_000, 100_600_000_000, 2, 3)
        );
    }
}

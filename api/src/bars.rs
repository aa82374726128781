//! Bars for REST history and gRPC `StreamHistoricalData`: one-minute bars
//! read from the bar store the broker builds from the journal
//! ([`tickwire_proto::bars`]), and 5m/1h/1d bars computed from them by a
//! [`Resampler`] (Polars, in `tickwire-history`, which the broker plugs
//! in; a build without it serves 1m bars only).
//!
//! A query asks for the bars whose start lies in `[from, to)`; each covers
//! its whole interval. Intervals are aligned to the Unix epoch (days are
//! UTC days). Only closed minutes are in the store; the minutes the
//! builder still holds open come from it ([`OpenBars`]), so the current
//! minute's bar so far is served too. [`complete_through`] says up to
//! where bars are final, and [`is_complete`] whether a bar has all its
//! minutes closed.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use tickwire_proto::bars::{Bar, BarFile, Interval, MINUTE_NS, OpenMinutes, bar_files, merge_bars};
use tickwire_proto::json::Decimal;
use tickwire_proto::symbology::{Entry, Symbology};

use crate::error::ApiError;

/// Computes bars of a longer interval from one-minute bars.
pub trait Resampler: Send + Sync + 'static {
    /// `minutes` are one instrument's one-minute bars, oldest first;
    /// returns its bars of `interval` (aligned to the epoch), oldest
    /// first. A bucket with trades takes only its trade bars; one with
    /// none is a mid bar.
    ///
    /// # Errors
    /// What went wrong, for the log (the caller answers 500).
    fn resample(&self, minutes: &[Bar], interval: Interval) -> Result<Vec<Bar>, String>;
}

/// The minutes the bar builder holds open (not in the store yet), so a
/// query that reaches the current minute gets its bar so far, marked not
/// complete.
pub trait OpenBars: Send + Sync + 'static {
    /// `topic`'s partitions the builder reads, with their open minutes.
    fn open_minutes(&self, topic: &str) -> Vec<(u32, Arc<OpenMinutes>)>;
}

/// The most bars one page may hold.
pub const MAX_BARS: usize = 10_000;
/// Bars per page when the request sets no limit.
pub const DEFAULT_BARS: usize = 1_000;

/// The longest range one request may cover, per interval (what a
/// resampled query reads: one-minute bars for the whole range).
pub const fn max_range_ns(interval: Interval) -> u64 {
    match interval {
        Interval::M1 => 31 * 1440 * MINUTE_NS,
        Interval::M5 => 93 * 1440 * MINUTE_NS,
        Interval::H1 | Interval::D1 => 366 * 1440 * MINUTE_NS,
    }
}

/// A checked bar query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarQuery {
    /// Interval.
    pub interval: Interval,
    /// Bars starting at or after this (UTC ns).
    pub from_ns: u64,
    /// Bars starting before this.
    pub to_ns: u64,
    /// Most bars.
    pub limit: usize,
}

/// One page of bars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarPage {
    /// The bars, oldest first.
    pub bars: Vec<Bar>,
    /// More bars in the range after these: ask again from `next_ns`.
    pub next_ns: Option<u64>,
}

/// A time as users write it: RFC 3339 (`2026-12-02T09:30:00Z`, or with an
/// offset) or UTC nanoseconds since 1970; as UTC ns.
///
/// # Errors
/// Why it is not a time.
pub fn parse_time(v: &str) -> Result<u64, String> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse::<u64>().map_err(|_| {
            format!(
                "{}: nanoseconds out of range",
                tickwire_proto::symbology::quoted(v)
            )
        });
    }
    let t = humantime::parse_rfc3339_weak(v).map_err(|e| {
        format!(
            "{} is not an RFC 3339 time such as 2026-12-02T09:30:00Z, nor UTC ns: {e}",
            tickwire_proto::symbology::quoted(v)
        )
    })?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .ok_or_else(|| format!("{} is before 1970", tickwire_proto::symbology::quoted(v)))
}

/// The bar store of a journal root.
pub fn bar_dir(journal_root: &Path) -> PathBuf {
    journal_root.join(tickwire_proto::bars::BARS_DIR)
}

fn align_up(t: u64, every: u64) -> u64 {
    t.div_ceil(every).saturating_mul(every)
}

/// One page of `instrument`'s bars in `topic`: closed minutes from the
/// store in `dir`, open ones from `open`.
///
/// # Errors
/// [`ApiError::Unimplemented`] for 5m/1h/1d without a resampler;
/// [`ApiError::Internal`] for a bar file that cannot be read (named in
/// the log).
pub fn query(
    dir: &Path,
    topic: &str,
    instrument: u32,
    q: &BarQuery,
    resampler: Option<&dyn Resampler>,
    open: Option<&dyn OpenBars>,
) -> Result<BarPage, ApiError> {
    let bad = |e: tickwire_proto::Error| {
        tracing::warn!(error = %e, "a bar file cannot be read");
        ApiError::internal(format!("bars of {topic} cannot be read"))
    };
    let open = open.map_or_else(Vec::new, |o| o.open_minutes(topic));
    // One file per partition that had the instrument's events, read up to
    // where the partition's open minutes begin.
    let mut files = Vec::new();
    for (partition, path) in bar_files(dir, topic, instrument) {
        if let Some(f) = BarFile::open(&path).map_err(bad)? {
            let upto = open
                .iter()
                .find(|(p, _)| *p == partition)
                .map_or(u64::MAX, |(_, o)| o.from);
            files.push((f, upto));
        }
    }
    let read = |from: u64, to: u64, n: usize| {
        let mut lists = files
            .iter()
            .map(|(f, upto)| f.range(from, to.min(*upto), n))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        lists.extend(open.iter().map(|(_, o)| {
            let mut l = o.range(instrument, from.max(o.from), to);
            l.truncate(n);
            l
        }));
        Ok::<_, ApiError>(merge_bars(lists))
    };
    let mut bars = match q.interval {
        Interval::M1 => read(q.from_ns, q.to_ns, q.limit + 1)?,
        long => {
            let Some(r) = resampler else {
                return Err(ApiError::Unimplemented(format!(
                    "interval {}: this tickwire was built without the history feature (Polars); it serves 1m bars only",
                    long.name()
                )));
            };
            let every = long.ns();
            let lo = align_up(q.from_ns, every);
            // The buckets starting before `to`, whole, but no more than a page.
            let hi = align_up(q.to_ns, every).min(lo.saturating_add(every * (q.limit as u64 + 1)));
            let minutes = read(lo, hi, usize::MAX)?;
            r.resample(&minutes, long).map_err(|e| {
                tracing::warn!(error = %e, interval = long.name(), "resampling failed");
                ApiError::internal(format!("{} bars could not be computed", long.name()))
            })?
        }
    };
    let next_ns = (bars.len() > q.limit).then(|| bars[q.limit].start_ns);
    bars.truncate(q.limit);
    Ok(BarPage { bars, next_ns })
}

/// Up to where a topic's bars are final: every minute before it is
/// closed in every partition (the oldest partition's closed-through
/// minute). `None` before the builder has closed any.
pub fn complete_through(dir: &Path, topic: &str) -> Option<u64> {
    let prefix = format!("{}.", topic.replace('/', "~"));
    let mut least: Option<u64> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(part) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".state"))
        else {
            continue;
        };
        if part.parse::<u32>().is_err() {
            continue;
        }
        let closed = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|t| t.split_ascii_whitespace().nth(1)?.parse::<u64>().ok());
        if let Some(c) = closed {
            least = Some(least.map_or(c, |l| l.min(c)));
        }
    }
    least
}

/// The instruments of the symbology that `symbol` (and `exchange`,
/// `currency` when given) names: (id, entry).
pub fn instruments<'a>(
    sym: &'a Symbology,
    symbol: &str,
    exchange: Option<&str>,
    currency: Option<&str>,
) -> Vec<(u32, &'a Entry)> {
    let ids = if symbol.is_empty() {
        (1..=sym.count()).collect()
    } else {
        sym.ids_of(symbol)
    };
    ids.into_iter()
        .filter_map(|id| sym.get(id).map(|e| (id, e)))
        .filter(|(_, e)| {
            exchange.is_none_or(|x| x == e.exchange()) && currency.is_none_or(|c| c == e.currency())
        })
        .collect()
}

/// Whether a bar of `interval` starting at `start_ns` is final: every
/// minute of it is closed (see [`complete_through`]). A 5m/1h/1d bar of
/// the current period is not: it grows as minutes close.
pub fn is_complete(start_ns: u64, interval: Interval, complete_through: Option<u64>) -> bool {
    complete_through.is_some_and(|c| start_ns.saturating_add(interval.ns()) <= c)
}

/// Appends a bar as REST returns it (prices and volume as exact
/// decimals), without building a JSON tree: a day of 1m bars is 1440 of
/// them per request.
pub fn write_bar_json(out: &mut String, b: &Bar, size_decimals: u8, complete: bool) {
    let px = |out: &mut String, p: i64| match Decimal::price(p) {
        Some(d) => d.write_to(out),
        None => out.push_str("null"),
    };
    out.push_str("{\"timestamp\":\"");
    tickwire_proto::json::write_rfc3339(out, b.start_ns);
    out.push_str("\",\"timestamp_ns\":");
    out.push_str(itoa::Buffer::new().format(b.start_ns));
    for (name, p) in [
        ("open", b.open),
        ("high", b.high),
        ("low", b.low),
        ("close", b.close),
    ] {
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        px(out, p);
    }
    out.push_str(",\"volume\":");
    Decimal {
        mantissa: i64::try_from(b.volume).unwrap_or(i64::MAX),
        scale: size_decimals.min(18),
    }
    .write_to(out);
    out.push_str(",\"trade_count\":");
    out.push_str(itoa::Buffer::new().format(if b.is_mid() { 0 } else { b.count }));
    out.push_str(",\"vwap\":");
    match b.vwap() {
        Some(v) => px(out, v),
        None => out.push_str("null"),
    }
    out.push_str(if b.is_mid() {
        ",\"price_source\":\"mid\""
    } else {
        ",\"price_source\":\"trades\""
    });
    out.push_str(if complete {
        ",\"complete\":true}"
    } else {
        ",\"complete\":false}"
    });
}

/// A bar as gRPC streams it.
pub fn bar_pb(b: &Bar, e: &Entry, interval: Interval, complete: bool) -> tickwire_proto::pb::Bar {
    let px = |p: i64| tickwire_proto::frame::price_to_f64(p).unwrap_or(0.0);
    tickwire_proto::pb::Bar {
        symbol: e.symbol().into(),
        exchange: e.exchange().into(),
        currency: e.currency().into(),
        interval: interval.name().into(),
        start_time_ns: b.start_ns as i64,
        open: px(b.open),
        high: px(b.high),
        low: px(b.low),
        close: px(b.close),
        volume: i64::try_from(b.volume).unwrap_or(i64::MAX),
        size_decimals: u32::from(e.size_decimals()),
        trade_count: if b.is_mid() { 0 } else { u64::from(b.count) },
        vwap: b.vwap().map_or(0.0, px),
        mid: b.is_mid(),
        complete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_nanoseconds() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1_000_000_000));
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z"), Ok(1_500_000_000));
        assert_eq!(parse_time("42"), Ok(42));
        for bad in [
            "",
            "yesterday",
            "99999999999999999999999",
            "2026-13-01T00:00:00Z",
        ] {
            let e = parse_time(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn a_bar_is_valid_json_with_exact_decimals() {
        let b = Bar {
            start_ns: 60_000_000_000,
            open: 1_500_000_000,
            high: 2_000_000_000,
            low: 1_000_000_000,
            close: 1_250_000_000,
            volume: 1234,
            notional: 1234 * 1_500_000_000,
            first_ns: 60_000_000_001,
            last_ns: 60_000_000_002,
            count: 3,
            flags: 0,
        };
        let mut s = String::new();
        write_bar_json(&mut s, &b, 2, true);
        let v: serde_json::Value = serde_json::from_str(&s).expect("json");
        assert_eq!(v["timestamp"], "1970-01-01T00:01:00.000000000Z");
        assert_eq!(v["open"].to_string(), "1.5");
        assert_eq!(v["volume"].to_string(), "12.34");
        assert_eq!(v["vwap"].to_string(), "1.5");
        assert_eq!(v["trade_count"], 3);
        assert_eq!(v["complete"], true);
        let mut s = String::new();
        write_bar_json(
            &mut s,
            &Bar {
                volume: 0,
                flags: tickwire_proto::bars::BAR_MID,
                ..b
            },
            0,
            false,
        );
        let v: serde_json::Value = serde_json::from_str(&s).expect("json");
        assert_eq!(
            (
                v["vwap"].clone(),
                v["price_source"].clone(),
                v["trade_count"].clone()
            ),
            (serde_json::Value::Null, "mid".into(), 0.into())
        );
    }

    #[test]
    fn alignment_rounds_up_to_the_next_bucket() {
        assert_eq!(align_up(0, 10), 0);
        assert_eq!(align_up(1, 10), 10);
        assert_eq!(align_up(10, 10), 10);
        assert_eq!(align_up(u64::MAX, 10), u64::MAX, "saturates");
    }
}

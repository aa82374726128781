//! History with Polars: 5m/1h/1d bars computed from one-minute bars, and
//! Parquet export of bars and raw events.
//!
//! This crate is the only one that builds Polars (a long cold build): the
//! hot path's crates (`proto`, `shm-client`, the broker's shards) and
//! their benchmarks never depend on it. The broker uses it behind its
//! default `history` feature; without it, it serves 1m bars only.
//!
//! Resampling groups one instrument's one-minute bars by interval with
//! `group_by_dynamic` on a lazy frame: windows aligned to the epoch (days
//! are UTC days), each bucket the bars whose start is in it. A bucket that
//! has trade bars takes only those (open of the first, high, low, close of
//! the last, volumes, notional and trade counts summed); one without is a
//! mid bar from its quote mid prices.

use std::fs::File;
use std::path::Path;

use polars::prelude::*;
use tickwire_proto::bars::{BAR_MID, Bar, Interval};

/// The Polars this crate builds with, for tools and tests that read what
/// it writes.
pub use polars;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Polars refused (a bug, or memory).
    #[error("polars: {0}")]
    Polars(#[from] PolarsError),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// One-minute bars as a frame: one row per bar, in start order.
pub fn bars_frame(bars: &[Bar]) -> PolarsResult<DataFrame> {
    let c = |f: fn(&Bar) -> i64| bars.iter().map(f).collect::<Vec<i64>>();
    let u = |f: fn(&Bar) -> u64| bars.iter().map(f).collect::<Vec<u64>>();
    DataFrame::new(
        bars.len(),
        vec![
            Column::new("start".into(), c(|b| b.start_ns as i64)),
            Column::new("open".into(), c(|b| b.open)),
            Column::new("high".into(), c(|b| b.high)),
            Column::new("low".into(), c(|b| b.low)),
            Column::new("close".into(), c(|b| b.close)),
            Column::new("volume".into(), u(|b| b.volume)),
            Column::new(
                "notional".into(),
                bars.iter().map(|b| b.notional).collect::<Vec<i128>>(),
            ),
            Column::new("first".into(), u(|b| b.first_ns)),
            Column::new("last".into(), u(|b| b.last_ns)),
            Column::new("count".into(), u(|b| u64::from(b.count))),
            Column::new(
                "mid".into(),
                bars.iter().map(Bar::is_mid).collect::<Vec<bool>>(),
            ),
        ],
    )
}

/// Bars of `interval` from one instrument's one-minute bars (oldest
/// first; they must be in start order, as the bar store keeps them).
///
/// # Errors
/// [`HistoryError::Polars`].
pub fn resample(minutes: &[Bar], interval: Interval) -> Result<Vec<Bar>, HistoryError> {
    if minutes.is_empty() {
        return Ok(Vec::new());
    }
    if interval == Interval::M1 {
        return Ok(minutes.to_vec());
    }
    let every = Duration::parse(interval.name());
    let trade = col("mid").not();
    // A bucket's value: from its trade bars when it has any, else from all
    // (then all are mid bars).
    let pick = |name: &str| {
        when(col("has_trades"))
            .then(col(format!("t_{name}")))
            .otherwise(col(format!("m_{name}")))
            .alias(name)
    };
    let both = |name: &str, f: fn(Expr) -> Expr| {
        [
            f(col(name).filter(col("mid").not())).alias(format!("t_{name}")),
            f(col(name)).alias(format!("m_{name}")),
        ]
    };
    let mut aggs = vec![trade.any(true).alias("has_trades")];
    for (name, f) in [
        ("open", Expr::first as fn(Expr) -> Expr),
        ("high", Expr::max),
        ("low", Expr::min),
        ("close", Expr::last),
        ("volume", Expr::sum),
        ("notional", Expr::sum),
        ("first", Expr::min),
        ("last", Expr::max),
        ("count", Expr::sum),
    ] {
        aggs.extend(both(name, f));
    }
    let out = bars_frame(minutes)?
        .lazy()
        .with_column(
            col("start")
                .cast(DataType::Datetime(TimeUnit::Nanoseconds, None))
                .alias("t"),
        )
        .group_by_dynamic(
            col("t"),
            [],
            DynamicGroupOptions {
                every,
                period: every,
                offset: Duration::parse("0ns"),
                label: Label::Left,
                include_boundaries: false,
                closed_window: ClosedWindow::Left,
                start_by: StartBy::WindowBound,
                ..Default::default()
            },
        )
        .agg(aggs)
        .select([
            col("t").cast(DataType::Int64).alias("start"),
            col("has_trades"),
            pick("open"),
            pick("high"),
            pick("low"),
            pick("close"),
            pick("volume"),
            pick("notional"),
            pick("first"),
            pick("last"),
            pick("count"),
        ])
        .collect()?;
    let i64s = |n: &str| -> PolarsResult<Vec<i64>> {
        Ok(out
            .column(n)?
            .cast(&DataType::Int64)?
            .i64()?
            .iter()
            .map(|v| v.unwrap_or(0))
            .collect())
    };
    let u64s = |n: &str| -> PolarsResult<Vec<u64>> {
        Ok(out
            .column(n)?
            .cast(&DataType::UInt64)?
            .u64()?
            .iter()
            .map(|v| v.unwrap_or(0))
            .collect())
    };
    let start = i64s("start")?;
    let (open, high, low, close) = (i64s("open")?, i64s("high")?, i64s("low")?, i64s("close")?);
    let (volume, first, last, count) = (
        u64s("volume")?,
        u64s("first")?,
        u64s("last")?,
        u64s("count")?,
    );
    let notional: Vec<i128> = out
        .column("notional")?
        .cast(&DataType::Int128)?
        .i128()?
        .iter()
        .map(|v| v.unwrap_or(0))
        .collect();
    let trades: Vec<bool> = out
        .column("has_trades")?
        .bool()?
        .iter()
        .map(|v| v.unwrap_or(false))
        .collect();
    Ok((0..out.height())
        .map(|i| Bar {
            start_ns: start[i] as u64,
            open: open[i],
            high: high[i],
            low: low[i],
            close: close[i],
            volume: volume[i],
            notional: notional[i],
            first_ns: first[i],
            last_ns: last[i],
            count: u32::try_from(count[i]).unwrap_or(u32::MAX),
            flags: if trades[i] { 0 } else { BAR_MID },
        })
        .collect())
}

/// A bar row for Parquet: the instrument it belongs to, and the bar.
#[derive(Debug, Clone)]
pub struct BarRow {
    /// Symbol.
    pub symbol: String,
    /// Venue.
    pub exchange: String,
    /// Currency.
    pub currency: String,
    /// Real size = raw / 10^size_decimals.
    pub size_decimals: u8,
    /// The bar.
    pub bar: Bar,
}

/// A raw event row for Parquet.
#[derive(Debug, Clone)]
pub struct EventRow {
    /// Partition.
    pub partition: u32,
    /// Sequence in the partition.
    pub sequence: u64,
    /// Symbol.
    pub symbol: String,
    /// Venue.
    pub exchange: String,
    /// Currency.
    pub currency: String,
    /// `trade` or `quote`.
    pub kind: &'static str,
    /// Event time, UTC ns.
    pub ts_event: u64,
    /// Trade price or bid (decimal; `None` when unset).
    pub price_a: Option<f64>,
    /// Ask (quotes).
    pub price_b: Option<f64>,
    /// Trade size or bid size, real units.
    pub size_a: f64,
    /// Ask size, real units.
    pub size_b: f64,
}

fn price(p: i64) -> Option<f64> {
    tickwire_proto::frame::price_to_f64(p)
}

fn bar_rows_frame(rows: &[BarRow], interval: Interval) -> PolarsResult<DataFrame> {
    let s = |f: fn(&BarRow) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
    let f = |g: fn(&BarRow) -> Option<f64>| rows.iter().map(g).collect::<Vec<Option<f64>>>();
    let ts: Vec<i64> = rows.iter().map(|r| r.bar.start_ns as i64).collect();
    DataFrame::new(
        rows.len(),
        vec![
            Column::new("symbol".into(), s(|r| &r.symbol)),
            Column::new("exchange".into(), s(|r| &r.exchange)),
            Column::new("currency".into(), s(|r| &r.currency)),
            Column::new("interval".into(), vec![interval.name(); rows.len()]),
            Column::new("start".into(), ts).cast(&DataType::Datetime(
                TimeUnit::Nanoseconds,
                Some(TimeZone::UTC),
            ))?,
            Column::new("open".into(), f(|r| price(r.bar.open))),
            Column::new("high".into(), f(|r| price(r.bar.high))),
            Column::new("low".into(), f(|r| price(r.bar.low))),
            Column::new("close".into(), f(|r| price(r.bar.close))),
            Column::new(
                "volume".into(),
                rows.iter()
                    .map(|r| r.bar.volume as f64 / 10f64.powi(i32::from(r.size_decimals)))
                    .collect::<Vec<f64>>(),
            ),
            Column::new(
                "trade_count".into(),
                rows.iter()
                    .map(|r| if r.bar.is_mid() { 0 } else { r.bar.count })
                    .collect::<Vec<u32>>(),
            ),
            Column::new("vwap".into(), f(|r| r.bar.vwap().and_then(price))),
            Column::new(
                "mid".into(),
                rows.iter().map(|r| r.bar.is_mid()).collect::<Vec<bool>>(),
            ),
        ],
    )
}

fn event_rows_frame(rows: &[EventRow]) -> PolarsResult<DataFrame> {
    let s = |f: fn(&EventRow) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
    let ts: Vec<i64> = rows.iter().map(|r| r.ts_event as i64).collect();
    DataFrame::new(
        rows.len(),
        vec![
            Column::new(
                "partition".into(),
                rows.iter().map(|r| r.partition).collect::<Vec<u32>>(),
            ),
            Column::new(
                "sequence".into(),
                rows.iter().map(|r| r.sequence).collect::<Vec<u64>>(),
            ),
            Column::new("symbol".into(), s(|r| &r.symbol)),
            Column::new("exchange".into(), s(|r| &r.exchange)),
            Column::new("currency".into(), s(|r| &r.currency)),
            Column::new("kind".into(), s(|r| r.kind)),
            Column::new("ts_event".into(), ts).cast(&DataType::Datetime(
                TimeUnit::Nanoseconds,
                Some(TimeZone::UTC),
            ))?,
            Column::new(
                "price".into(),
                rows.iter().map(|r| r.price_a).collect::<Vec<Option<f64>>>(),
            ),
            Column::new(
                "ask_price".into(),
                rows.iter().map(|r| r.price_b).collect::<Vec<Option<f64>>>(),
            ),
            Column::new(
                "size".into(),
                rows.iter().map(|r| r.size_a).collect::<Vec<f64>>(),
            ),
            Column::new(
                "ask_size".into(),
                rows.iter().map(|r| r.size_b).collect::<Vec<f64>>(),
            ),
        ],
    )
}

/// A Parquet file written in row groups (an export of any size in
/// bounded memory).
pub struct ParquetOut {
    path: String,
    writer: Option<polars::io::parquet::write::BatchedWriter<File>>,
    rows: u64,
}

impl std::fmt::Debug for ParquetOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetOut")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .finish()
    }
}

impl ParquetOut {
    /// Creates (or truncates) `path`.
    ///
    /// # Errors
    /// [`HistoryError::Io`].
    pub fn create(path: &Path) -> Result<ParquetOut, HistoryError> {
        // Created now, so a path that cannot be written fails before any work.
        File::create(path).map_err(|source| HistoryError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(ParquetOut {
            path: path.display().to_string(),
            writer: None,
            rows: 0,
        })
    }

    fn write(&mut self, mut df: DataFrame) -> Result<(), HistoryError> {
        if df.height() == 0 {
            return Ok(());
        }
        if self.writer.is_none() {
            let file = File::create(&self.path).map_err(|source| HistoryError::Io {
                path: self.path.clone(),
                source,
            })?;
            let schema = df.schema().clone();
            self.writer = Some(
                ParquetWriter::new(file)
                    .with_compression(ParquetCompression::Zstd(None))
                    .batched(&schema)?,
            );
        }
        if let Some(w) = self.writer.as_mut() {
            df.rechunk_mut();
            w.write_batch(&df)?;
        }
        self.rows += df.height() as u64;
        Ok(())
    }

    /// Appends bars.
    ///
    /// # Errors
    /// Polars or the file refused.
    pub fn write_bars(&mut self, rows: &[BarRow], interval: Interval) -> Result<(), HistoryError> {
        self.write(bar_rows_frame(rows, interval)?)
    }

    /// Appends events.
    ///
    /// # Errors
    /// Polars or the file refused.
    pub fn write_events(&mut self, rows: &[EventRow]) -> Result<(), HistoryError> {
        self.write(event_rows_frame(rows)?)
    }

    /// Finishes the file; returns the rows written. A file with no rows
    /// is left empty (zero bytes) rather than as a Parquet file.
    ///
    /// # Errors
    /// Polars or the file refused.
    pub fn finish(self) -> Result<u64, HistoryError> {
        if let Some(w) = self.writer {
            w.finish()?;
        }
        Ok(self.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tickwire_proto::bars::MINUTE_NS;

    /// A plain model: buckets by start, trade bars only when there are any.
    fn model(minutes: &[Bar], interval: Interval) -> Vec<Bar> {
        let mut out: Vec<Bar> = Vec::new();
        let mut i = 0;
        while i < minutes.len() {
            let b0 = interval.bucket(minutes[i].start_ns);
            let mut j = i;
            while j < minutes.len() && interval.bucket(minutes[j].start_ns) == b0 {
                j += 1;
            }
            let group = &minutes[i..j];
            let trades: Vec<&Bar> = group.iter().filter(|b| !b.is_mid()).collect();
            let use_: Vec<&Bar> = if trades.is_empty() {
                group.iter().collect()
            } else {
                trades
            };
            out.push(Bar {
                start_ns: b0,
                open: use_[0].open,
                high: use_.iter().map(|b| b.high).max().unwrap_or(0),
                low: use_.iter().map(|b| b.low).min().unwrap_or(0),
                close: use_[use_.len() - 1].close,
                volume: use_.iter().map(|b| b.volume).sum(),
                notional: use_.iter().map(|b| b.notional).sum(),
                first_ns: use_.iter().map(|b| b.first_ns).min().unwrap_or(0),
                last_ns: use_.iter().map(|b| b.last_ns).max().unwrap_or(0),
                count: use_.iter().map(|b| b.count).sum(),
                flags: if use_.iter().all(|b| b.is_mid()) {
                    BAR_MID
                } else {
                    0
                },
            });
            i = j;
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Polars' 5m/1h/1d bars equal the plain model's, mid bars included.
        #[test]
        fn resampled_bars_equal_a_plain_model(
            steps in proptest::collection::vec((1u64..200, 1i64..1_000_000, 0i64..1000, 0u64..1_000_000, 1u32..50, any::<bool>()), 1..300),
        ) {
            let mut m = 20_000 * 1440;
            let mut minutes = Vec::new();
            for &(gap, px, spread, vol, count, mid) in &steps {
                m += gap;
                let px = px * 1_000;
                minutes.push(Bar {
                    start_ns: m * MINUTE_NS,
                    open: px,
                    high: px + spread,
                    low: px - spread,
                    close: px + spread / 2,
                    volume: if mid { 0 } else { vol },
                    notional: if mid { 0 } else { i128::from(px) * i128::from(vol) * 3 },
                    first_ns: m * MINUTE_NS + 5,
                    last_ns: m * MINUTE_NS + 50,
                    count,
                    flags: if mid { BAR_MID } else { 0 },
                });
            }
            for interval in [Interval::M5, Interval::H1, Interval::D1] {
                let got = resample(&minutes, interval).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got, model(&minutes, interval), "{}", interval.name());
            }
        }
    }

    #[test]
    fn parquet_files_hold_what_was_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bars.parquet");
        let mut out = ParquetOut::create(&path).expect("create");
        let bar = Bar {
            start_ns: 1_700_000_040_000_000_000,
            open: 100_000_000_000,
            high: 101_000_000_000,
            low: 99_000_000_000,
            close: 100_500_000_000,
            volume: 300,
            notional: 300 * 100_200_000_000,
            first_ns: 1_700_000_040_000_000_001,
            last_ns: 1_700_000_099_000_000_000,
            count: 3,
            flags: 0,
        };
        let row = BarRow {
            symbol: "AAPL".into(),
            exchange: "NASDAQ".into(),
            currency: "USD".into(),
            size_decimals: 0,
            bar,
        };
        out.write_bars(&[row.clone(), row], Interval::M1)
            .expect("write");
        assert_eq!(out.finish().expect("finish"), 2);
        let df = ParquetReader::new(File::open(&path).expect("open"))
            .finish()
            .expect("read");
        assert_eq!(df.height(), 2);
        let vwap = df.column("vwap").expect("vwap").f64().expect("f64").get(0);
        assert_eq!(vwap, Some(100.2));
        let sym = df
            .column("symbol")
            .expect("symbol")
            .str()
            .expect("str")
            .get(1);
        assert_eq!(sym, Some("AAPL"));
    }
}

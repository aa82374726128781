//! `tickwire export`: a time range of a topic's raw events (from the
//! journal) or bars (from the bar store, resampled with Polars) to a
//! Parquet file. It reads the files directly, so it works with the broker
//! running or stopped, and never touches the rings.
//!
//! Raw events: each partition from its first event at or after `from` up
//! to its first event at or after `to`, in sequence order (the
//! `StreamHistoricalData` rule), partition by partition. Bars: those whose
//! start is in `[from, to)`, instrument by instrument.

use std::path::{Path, PathBuf};

use tickwire_history::{BarRow, EventRow, ParquetOut};
use tickwire_proto::bars::{BarFile, Interval, bar_files, merge_bars};
use tickwire_proto::frame::{ArchivedFrameBody, BODY_WORDS, price_to_f64};
use tickwire_proto::journal::{JournalRead, JournalReader};
use tickwire_proto::symbology::{Entry, Symbology};

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// The node directory (symbology).
    pub node_dir: PathBuf,
    /// The journal root (the bar store is its `bars` directory).
    pub journal_dir: PathBuf,
    /// Topic.
    pub topic: String,
    /// Only these symbols (empty: all).
    pub symbols: Vec<String>,
    /// Only these venues (empty: all).
    pub exchanges: Vec<String>,
    /// Only these currencies (empty: all).
    pub currencies: Vec<String>,
    /// From (UTC ns).
    pub from_ns: u64,
    /// To (UTC ns), not included.
    pub to_ns: u64,
    /// `None`: raw events; else bars of this interval.
    pub interval: Option<Interval>,
    /// The Parquet file.
    pub out: PathBuf,
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// Rows written.
    pub rows: u64,
    /// Sequences the journal no longer held inside the range (raw only).
    pub missing: u64,
}

fn wanted(s: &ExportSpec, e: &Entry) -> bool {
    let any = |list: &[String], v: &str| list.is_empty() || list.iter().any(|x| x == v);
    any(&s.symbols, e.symbol())
        && any(&s.exchanges, e.exchange())
        && any(&s.currencies, e.currency())
}

/// Rows per Parquet row group.
const ROWS: usize = 256 * 1024;

/// Runs an export.
///
/// # Errors
/// A message naming what could not be read or written.
pub fn export(s: &ExportSpec) -> Result<Exported, String> {
    // The node directory's table, else (a reboot emptied it) the copy the
    // broker keeps beside the journal.
    let sym = Symbology::open(&s.node_dir)
        .or_else(|e| Symbology::open(&s.journal_dir).map_err(|_| e))
        .map_err(|e| format!("the node's symbology (instrument names) cannot be read: {e}"))?;
    let mut out = ParquetOut::create(&s.out).map_err(|e| e.to_string())?;
    let done = match s.interval {
        None => events(s, &sym, &mut out),
        Some(i) => bars(s, &sym, i, &mut out),
    }
    .and_then(|done| {
        let rows = out.finish().map_err(|e| e.to_string())?;
        Ok(Exported { rows, ..done })
    });
    if done.is_err() {
        // No half-written file left behind to be taken for an export.
        let _ = std::fs::remove_file(&s.out);
    }
    done
}

/// The partitions of `topic` that have a journal: (partition, directory).
fn partitions(root: &Path, topic: &str) -> Result<Vec<(u32, PathBuf)>, String> {
    if !root.is_dir() {
        return Err(format!("the journal {} cannot be read", root.display()));
    }
    let enc = topic.replace('/', "~");
    let parts: Vec<(u32, PathBuf)> = tickwire_proto::journal::partition_dirs(root)
        .into_iter()
        .filter(|(t, _, _)| *t == enc)
        .map(|(_, p, path)| (p, path))
        .collect();
    if parts.is_empty() {
        return Err(format!(
            "topic {topic:?} has no journal in {} (is it the node's journal directory, and the topic's name right?)",
            root.display()
        ));
    }
    Ok(parts)
}

fn events(s: &ExportSpec, sym: &Symbology, out: &mut ParquetOut) -> Result<Exported, String> {
    let mut rows: Vec<EventRow> = Vec::with_capacity(ROWS);
    let mut missing = 0u64;
    for (partition, dir) in partitions(&s.journal_dir, &s.topic)? {
        let err = |e: tickwire_proto::Error| format!("partition {partition}: {e}");
        let Some(mut r) = JournalReader::open(&dir).map_err(err)? else {
            continue;
        };
        let Some(mut seq) = r.seek_time(s.from_ns).map_err(err)? else {
            continue;
        };
        'read: loop {
            match r.load(seq).map_err(err)? {
                JournalRead::End => break,
                JournalRead::Missing { to } => {
                    missing += to + 1 - seq;
                    seq = to + 1;
                }
                JournalRead::Frame => {
                    for f in r.buffered(seq) {
                        let Ok(words) = <&[u64; BODY_WORDS]>::try_from(&f[1..]) else {
                            break 'read;
                        };
                        let b = ArchivedFrameBody::from_words(words);
                        if b.ts_event() >= s.to_ns {
                            break 'read;
                        }
                        if let Some(e) = sym.get(b.instrument_id()).filter(|e| wanted(s, e)) {
                            let scale = 10f64.powi(i32::from(e.size_decimals()));
                            rows.push(EventRow {
                                partition,
                                sequence: seq,
                                symbol: e.symbol().into(),
                                exchange: e.exchange().into(),
                                currency: e.currency().into(),
                                kind: b.kind().map_or("unknown", tickwire_proto::Kind::name),
                                ts_event: b.ts_event(),
                                price_a: price_to_f64(b.px_a()),
                                price_b: price_to_f64(b.px_b()),
                                size_a: f64::from(b.size_a()) / scale,
                                size_b: f64::from(b.size_b()) / scale,
                            });
                        }
                        seq += 1;
                    }
                    if rows.len() >= ROWS {
                        out.write_events(&rows).map_err(|e| e.to_string())?;
                        rows.clear();
                    }
                }
            }
        }
    }
    out.write_events(&rows).map_err(|e| e.to_string())?;
    Ok(Exported { rows: 0, missing })
}

fn bars(
    s: &ExportSpec,
    sym: &Symbology,
    interval: Interval,
    out: &mut ParquetOut,
) -> Result<Exported, String> {
    let dir = s.journal_dir.join(tickwire_proto::bars::BARS_DIR);
    let every = interval.ns();
    let (lo, hi) = (
        s.from_ns.div_ceil(every).saturating_mul(every),
        s.to_ns.div_ceil(every).saturating_mul(every),
    );
    let mut rows: Vec<BarRow> = Vec::new();
    for id in 1..=sym.count() {
        let Some(e) = sym.get(id).filter(|e| wanted(s, e)) else {
            continue;
        };
        let mut lists = Vec::new();
        for (_, path) in bar_files(&dir, &s.topic, id) {
            if let Some(f) = BarFile::open(&path).map_err(|e| e.to_string())? {
                lists.push(f.range(lo, hi, usize::MAX).map_err(|e| e.to_string())?);
            }
        }
        let minutes = merge_bars(lists);
        let bars = tickwire_history::resample(&minutes, interval).map_err(|e| e.to_string())?;
        rows.extend(
            bars.into_iter()
                .filter(|b| b.start_ns < s.to_ns)
                .map(|bar| BarRow {
                    symbol: e.symbol().into(),
                    exchange: e.exchange().into(),
                    currency: e.currency().into(),
                    size_decimals: e.size_decimals(),
                    bar,
                }),
        );
        if rows.len() >= ROWS {
            out.write_bars(&rows, interval).map_err(|e| e.to_string())?;
            rows.clear();
        }
    }
    out.write_bars(&rows, interval).map_err(|e| e.to_string())?;
    Ok(Exported {
        rows: 0,
        missing: 0,
    })
}

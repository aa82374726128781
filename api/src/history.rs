//! `StreamHistoricalData`: the raw events of a time range, read from the
//! journal (and the ring for what the journal is about to write), encoded
//! as the live stream's batches, then a `StreamEnd` with reason `complete`.
//!
//! A range is a position in each partition's stream: from its first event
//! at or after `start_time_ns` up to, not including, its first event at or
//! after `end_time_ns` (or what was published when the request came, if
//! that is sooner), in sequence order. Event times within a partition are
//! close to ordered, not strictly: an event stamped inside the range but
//! committed after the end's first event is not included, and one stamped
//! outside it but committed inside is. Gaps (what retention deleted, what
//! the journal never had) come as gap notices with reason `not_journaled`.
//!
//! With `interval` 1m, 5m, 1h or 1d it streams bars instead
//! ([`start_bars`]): the bars whose start is in the range, instrument by
//! instrument, as `BarBatch` messages, then the same `StreamEnd`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use shm_client::{Event, Filter, Start, Subscriber};
use tickwire_proto::futex::realtime_ns;
use tickwire_proto::grpc::{BatchBuf, Encoded, InstrumentFields, TickMeta, encode_tick, notice};
use tickwire_proto::pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// The most events one request may ask for.
pub const MAX_LIMIT: u32 = 10_000_000;
/// Events when the request sets no limit.
pub const DEFAULT_LIMIT: u32 = 1_000_000;

/// A checked `HistoricalRequest` for raw events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSpec {
    /// Topic.
    pub topic: String,
    /// Only this symbol (any venue); empty: every symbol.
    pub symbol: String,
    /// Only this venue; empty: every venue.
    pub exchange: String,
    /// Only this currency; empty: every currency.
    pub currency: String,
    /// From the first event at or after this time (UTC ns).
    pub start_ns: u64,
    /// Up to the first event at or after this time (UTC ns).
    pub end_ns: u64,
    /// Most events.
    pub limit: u32,
}

impl RangeSpec {
    /// Checks a request; `topic` is the topic it names or the default.
    ///
    /// # Errors
    /// [`ApiError::Invalid`] naming the field; [`ApiError::Unimplemented`]
    /// for bars.
    pub fn from_request(r: &pb::HistoricalRequest, topic: String) -> Result<RangeSpec, ApiError> {
        match r.interval.as_str() {
            "" | "raw" | "tick" => {}
            "1m" | "5m" | "1h" | "1d" => {
                return Err(ApiError::invalid(
                    "interval",
                    format!(
                        "{:?} asks for bars, not raw events (see BarSpec)",
                        r.interval
                    ),
                ));
            }
            other => {
                return Err(ApiError::invalid(
                    "interval",
                    format!(
                        "{} is not an interval (raw, 1m, 5m, 1h, 1d)",
                        tickwire_proto::symbology::quoted(other)
                    ),
                ));
            }
        }
        if r.start_time_ns <= 0 {
            return Err(ApiError::invalid(
                "start_time_ns",
                format!(
                    "{} is not a time: UTC nanoseconds since 1970",
                    r.start_time_ns
                ),
            ));
        }
        let end = if r.end_time_ns == 0 {
            realtime_ns()
        } else {
            r.end_time_ns.max(0) as u64
        };
        if end <= r.start_time_ns as u64 {
            return Err(ApiError::invalid(
                "end_time_ns",
                format!(
                    "{} is not after start_time_ns {}",
                    r.end_time_ns, r.start_time_ns
                ),
            ));
        }
        if r.limit > MAX_LIMIT {
            return Err(ApiError::invalid(
                "limit",
                format!(
                    "{} is above the most one request may ask for, {MAX_LIMIT}",
                    r.limit
                ),
            ));
        }
        for (field, v) in [
            ("symbol", &r.symbol),
            ("exchange", &r.exchange),
            ("currency", &r.currency),
        ] {
            if v.len() > 64 {
                return Err(ApiError::invalid(field, "longer than 64 bytes"));
            }
        }
        Ok(RangeSpec {
            topic,
            symbol: r.symbol.clone(),
            exchange: r.exchange.clone(),
            currency: r.currency.clone(),
            start_ns: r.start_time_ns as u64,
            end_ns: end,
            limit: if r.limit == 0 { DEFAULT_LIMIT } else { r.limit },
        })
    }
}

/// Starts reading the range on a blocking thread; its batches come on the
/// returned channel (bounded: a slow client slows the reading, nothing is
/// dropped), then the end notice. Dropping the receiver stops it.
///
/// # Errors
/// [`ApiError::NotFound`] for a topic without rings; [`ApiError::Unavailable`].
pub fn start(
    node_dir: PathBuf,
    spec: RangeSpec,
    max_batch: u32,
    cancel: CancellationToken,
) -> Result<mpsc::Receiver<Encoded>, ApiError> {
    let mut filter = Filter::default();
    if !spec.symbol.is_empty() {
        filter = filter.symbols([spec.symbol.clone()]);
    }
    if !spec.exchange.is_empty() {
        filter = filter.exchanges([spec.exchange.clone()]);
    }
    if !spec.currency.is_empty() {
        filter = filter.currencies([spec.currency.clone()]);
    }
    let sub = Subscriber::builder(spec.topic.clone())
        .node_dir(&node_dir)
        .start(Start::Time(spec.start_ns))
        .filter(filter)
        .open()
        .map_err(|e| crate::dispatch::open_error(&spec.topic, "a historical stream", e))?;
    let (tx, rx) = mpsc::channel(16);
    std::thread::Builder::new()
        .name("tickwire-history".into())
        .spawn(move || read_range(sub, spec, max_batch.max(1), tx, cancel))
        .map_err(ApiError::internal)?;
    Ok(rx)
}

fn read_range(
    mut sub: Subscriber,
    spec: RangeSpec,
    max_batch: u32,
    tx: mpsc::Sender<Encoded>,
    cancel: CancellationToken,
) {
    // Where each partition stops: what was published when asked.
    let mut until: HashMap<u32, u64> = sub
        .published()
        .into_iter()
        .map(|(p, s)| (p, s + 1))
        .collect();
    let epochs: HashMap<u32, Vec<(u64, u64)>> = sub
        .partitions()
        .into_iter()
        .map(|p| (p, sub.epochs(p)))
        .collect();
    let mut wires: HashMap<u32, InstrumentFields> = HashMap::new();
    let mut batch = BatchBuf::new();
    let mut elem = Vec::new();
    let mut sent = 0u64;
    let mut notices: Vec<Encoded> = Vec::new();
    let topic = spec.topic.clone();
    let mut idle = 0u32;
    let send = |e: Encoded| tx.blocking_send(e).is_ok();
    loop {
        if cancel.is_cancelled() || tx.is_closed() {
            return;
        }
        let positions: HashMap<u32, u64> = sub.positions().into_iter().collect();
        // A partition is done at its limit position or once it passed the end.
        until.retain(|p, u| positions.get(p).is_some_and(|&c| c < *u));
        if until.is_empty() || sent >= u64::from(spec.limit) {
            break;
        }
        let now = realtime_ns();
        let n = sub.poll(4096, |e| match e {
            Event::Tick(t) => {
                let Some(&stop) = until.get(&t.partition) else {
                    return;
                };
                if t.seq >= stop || sent >= u64::from(spec.limit) {
                    return;
                }
                if t.body.ts_event() >= spec.end_ns {
                    // The first at or after the end: this partition is done.
                    until.insert(t.partition, t.seq);
                    return;
                }
                let id = t.body.instrument_id();
                let inst = match wires.get(&id) {
                    Some(w) => Some(w),
                    None => t
                        .instrument()
                        .map(|e| &*wires.entry(id).or_insert_with(|| InstrumentFields::new(e))),
                };
                let meta = TickMeta {
                    topic: &topic,
                    partition: t.partition,
                    epoch: epochs
                        .get(&t.partition)
                        .and_then(|e| tickwire_proto::journal::epoch_of(e, t.seq))
                        .unwrap_or(0),
                    seq: t.seq,
                    send_time_ns: now,
                    snapshot: false,
                    conflated: false,
                    redeliveries: 0,
                };
                elem.clear();
                encode_tick(&mut elem, &meta, t.body, inst);
                batch.push(&elem);
                sent += 1;
            }
            Event::Gap {
                partition,
                from,
                to,
            } => {
                // In stream order: the events before the gap, then the gap.
                if batch.events() > 0 {
                    notices.push(batch.take());
                }
                notices.push(notice::gap(&topic, partition, from, to, "not_journaled"));
            }
            _ => {}
        });
        if batch.events() >= max_batch || (n == 0 && batch.events() > 0) || !notices.is_empty() {
            // What came before (batches cut at gaps, the gaps), then the rest.
            for e in notices.drain(..) {
                if !send(e) {
                    return;
                }
            }
            if batch.events() > 0 && !send(batch.take()) {
                return;
            }
        }
        let moved = sub
            .positions()
            .into_iter()
            .any(|(p, c)| positions.get(&p) != Some(&c));
        if n == 0 && !moved {
            idle += 1;
            // Everything asked for was published, so it is in the ring or
            // the journal: nothing for a second means it never comes.
            if idle > 2_000 {
                tracing::warn!(topic = %topic, left = ?until, "historical read made no progress for 1 s; ending it");
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        } else {
            idle = 0;
        }
    }
    if batch.events() > 0 && !send(batch.take()) {
        return;
    }
    let _ = send(notice::end("complete"));
}

/// A checked `HistoricalRequest` for bars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarSpec {
    /// Topic.
    pub topic: String,
    /// Only this symbol; empty: every symbol.
    pub symbol: String,
    /// Only this venue.
    pub exchange: Option<String>,
    /// Only this currency.
    pub currency: Option<String>,
    /// The bars: interval, range (`limit` is the most in all).
    pub query: crate::bars::BarQuery,
}

impl BarSpec {
    /// Checks a request whose interval names bars; `None` when it asks for
    /// raw events.
    ///
    /// # Errors
    /// [`ApiError::Invalid`] naming the field.
    pub fn from_request(
        r: &pb::HistoricalRequest,
        topic: String,
    ) -> Result<Option<BarSpec>, ApiError> {
        let Some(interval) = tickwire_proto::bars::Interval::parse(&r.interval) else {
            return Ok(None);
        };
        // The same checks as raw events: times, limit, symbol.
        let raw = RangeSpec::from_request(
            &pb::HistoricalRequest {
                interval: String::new(),
                ..r.clone()
            },
            topic,
        )?;
        let most = crate::bars::max_range_ns(interval);
        if raw.end_ns - raw.start_ns > most {
            return Err(ApiError::invalid(
                "end_time_ns",
                format!(
                    "the range is longer than one request may cover with {} bars ({})",
                    interval.name(),
                    humantime::format_duration(Duration::from_nanos(most))
                ),
            ));
        }
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Ok(Some(BarSpec {
            topic: raw.topic,
            symbol: raw.symbol,
            exchange: opt(&r.exchange),
            currency: opt(&r.currency),
            query: crate::bars::BarQuery {
                interval,
                from_ns: raw.start_ns,
                to_ns: raw.end_ns,
                limit: raw.limit as usize,
            },
        }))
    }
}

/// Streams the bars of `spec` from the bar store `dir` on a blocking
/// thread: `BarBatch` messages of at most `max_batch` bars, instrument by
/// instrument (symbology order), then `StreamEnd` `complete` (or `error`,
/// logged, when a bar file cannot be read).
///
/// # Errors
/// [`ApiError::NotFound`] when no instrument matches.
pub fn start_bars(
    dir: PathBuf,
    symbology: std::sync::Arc<tickwire_proto::symbology::Symbology>,
    resampler: Option<std::sync::Arc<dyn crate::bars::Resampler>>,
    open: Option<std::sync::Arc<dyn crate::bars::OpenBars>>,
    spec: BarSpec,
    max_batch: u32,
    cancel: CancellationToken,
) -> Result<mpsc::Receiver<Encoded>, ApiError> {
    use tickwire_proto::bars::Interval;
    let ids: Vec<u32> = crate::bars::instruments(
        &symbology,
        &spec.symbol,
        spec.exchange.as_deref(),
        spec.currency.as_deref(),
    )
    .into_iter()
    .map(|(id, _)| id)
    .collect();
    if ids.is_empty() {
        return Err(ApiError::NotFound {
            what: "symbol",
            name: spec.symbol,
        });
    }
    if spec.query.interval != Interval::M1 && resampler.is_none() {
        return Err(ApiError::Unimplemented(format!(
            "interval {}: this tickwire was built without the history feature (Polars); it serves 1m bars only",
            spec.query.interval.name()
        )));
    }
    let (tx, rx) = mpsc::channel(16);
    let max_batch = (max_batch.max(1) as usize).min(crate::bars::MAX_BARS);
    std::thread::Builder::new()
        .name("tickwire-bars-read".into())
        .spawn(move || {
            let send = |e: Encoded| tx.blocking_send(e).is_ok();
            let mut left = spec.query.limit;
            let complete = crate::bars::complete_through(&dir, &spec.topic);
            for id in ids {
                let Some(entry) = symbology.get(id) else {
                    continue;
                };
                let mut from = spec.query.from_ns;
                while left > 0 {
                    if cancel.is_cancelled() {
                        return;
                    }
                    let q = crate::bars::BarQuery {
                        from_ns: from,
                        limit: left.min(max_batch),
                        ..spec.query
                    };
                    let page = match crate::bars::query(
                        &dir,
                        &spec.topic,
                        id,
                        &q,
                        resampler.as_deref(),
                        open.as_deref(),
                    ) {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!(topic = %spec.topic, error = %e, "a bar stream ends early");
                            let _ = send(notice::end("error"));
                            return;
                        }
                    };
                    left -= page.bars.len();
                    if !page.bars.is_empty() {
                        let bars = page
                            .bars
                            .iter()
                            .map(|b| {
                                let done = crate::bars::is_complete(
                                    b.start_ns,
                                    spec.query.interval,
                                    complete,
                                );
                                crate::bars::bar_pb(b, entry, spec.query.interval, done)
                            })
                            .collect();
                        let m = pb::StreamResponse {
                            kind: Some(pb::stream_response::Kind::Bars(pb::BarBatch { bars })),
                        };
                        if !send(Encoded::message(&m)) {
                            return;
                        }
                    }
                    match page.next_ns {
                        Some(n) => from = n,
                        None => break,
                    }
                }
            }
            let _ = send(notice::end("complete"));
        })
        .map_err(ApiError::internal)?;
    Ok(rx)
}

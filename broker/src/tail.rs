//! `tickwire tail`: print a topic's events, as kcat or `pulsar-client consume` would.

use std::io::Write;

use shm_client::{CloseReason, Event, Kind, Tick};
use tickwire_proto::frame::price_to_f64;

/// Formats a UTC-ns timestamp as RFC 3339 with nanoseconds.
pub fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_nanos(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns))
        .to_string()
}

/// One event as a JSON object (one line).
pub fn event_json(topic: &str, event: &Event<'_>) -> serde_json::Value {
    match event {
        Event::Tick(t) => tick_json(topic, t),
        Event::Gap {
            partition,
            from,
            to,
        } => serde_json::json!({
            "type": "gap", "topic": topic, "partition": partition, "from": from, "to": to, "lost": to - from + 1,
        }),
        Event::Untethered { partition } => {
            serde_json::json!({"type": "untethered", "topic": topic, "partition": partition})
        }
        Event::Closed { partition, reason } => {
            serde_json::json!({"type": "closed", "topic": topic, "partition": partition, "reason": close_reason(*reason)})
        }
        Event::Reopened { partition, epoch } => {
            serde_json::json!({"type": "reopened", "topic": topic, "partition": partition, "epoch": epoch})
        }
        Event::Replaced { partition, removed } => {
            serde_json::json!({"type": "replaced", "topic": topic, "partition": partition, "removed": removed})
        }
        other => {
            serde_json::json!({"type": "unknown", "topic": topic, "debug": format!("{other:?}")})
        }
    }
}

fn close_reason(r: CloseReason) -> &'static str {
    match r {
        CloseReason::EndOfStream => "end_of_stream",
        CloseReason::WriterDied => "writer_died",
    }
}

fn tick_json(topic: &str, t: &Tick<'_>) -> serde_json::Value {
    let b = t.body;
    let inst = t.instrument();
    let size = |raw: u32| inst.map_or(raw as f64, |e| e.real_size(raw));
    let mut v = serde_json::json!({
        "type": "tick",
        "topic": topic,
        "partition": t.partition,
        "sequence": t.seq,
        "symbol": inst.map(|e| e.symbol()),
        "exchange": inst.map(|e| e.exchange()),
        "currency": inst.map(|e| e.currency()),
        "instrument_id": b.instrument_id(),
        "kind": b.kind().map_or("unknown", Kind::name),
        "ts_event": rfc3339(b.ts_event()),
        "ts_event_ns": b.ts_event(),
        "ts_ingest_ns": b.ts_ingest(),
        "source_id": b.source_id(),
        "source_seq": b.source_seq(),
        "flags": b.flags(),
    });
    match b.kind() {
        Some(Kind::Quote) => {
            v["bid_price"] = serde_json::json!(price_to_f64(b.px_a()));
            v["bid_size"] = serde_json::json!(size(b.size_a()));
            v["ask_price"] = serde_json::json!(price_to_f64(b.px_b()));
            v["ask_size"] = serde_json::json!(size(b.size_b()));
        }
        _ => {
            v["price"] = serde_json::json!(price_to_f64(b.px_a()));
            v["size"] = serde_json::json!(size(b.size_a()));
        }
    }
    v
}

/// One event as a human-readable line.
pub fn event_line(event: &Event<'_>) -> String {
    match event {
        Event::Tick(t) => {
            let b = t.body;
            let inst = t.instrument();
            let name = inst.map_or_else(
                || format!("#{}", b.instrument_id()),
                |e| format!("{} {} {}", e.symbol(), e.exchange(), e.currency()),
            );
            let px = |p: i64| price_to_f64(p).map_or("-".to_string(), |v| v.to_string());
            let sz = |s: u32| inst.map_or(s as f64, |e| e.real_size(s)).to_string();
            let what = match b.kind() {
                Some(Kind::Quote) => format!(
                    "quote {} x {} / {} x {}",
                    px(b.px_a()),
                    sz(b.size_a()),
                    px(b.px_b()),
                    sz(b.size_b())
                ),
                Some(Kind::Trade) => format!("trade {} x {}", px(b.px_a()), sz(b.size_a())),
                None => format!("kind {}", b.kind),
            };
            format!(
                "p{} #{} {} {} {}",
                t.partition,
                t.seq,
                rfc3339(b.ts_event()),
                name,
                what
            )
        }
        Event::Gap {
            partition,
            from,
            to,
        } => format!("p{partition} GAP {from}..={to} ({} lost)", to - from + 1),
        Event::Untethered { partition } => format!("p{partition} UNTETHERED"),
        Event::Closed { partition, reason } => {
            format!("p{partition} CLOSED ({})", close_reason(*reason))
        }
        Event::Reopened { partition, epoch } => format!("p{partition} REOPENED epoch {epoch}"),
        Event::Replaced { partition, removed } => format!(
            "p{partition} {}",
            if *removed { "REMOVED" } else { "REPLACED" }
        ),
        other => format!("{other:?}"),
    }
}

/// Writes an event.
///
/// # Errors
/// The write's error (a closed pipe is `BrokenPipe`).
pub fn write_event(
    out: &mut impl Write,
    topic: &str,
    event: &Event<'_>,
    json: bool,
) -> std::io::Result<()> {
    if json {
        writeln!(out, "{}", event_json(topic, event))
    } else {
        writeln!(out, "{}", event_line(event))
    }
}

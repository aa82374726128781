//! `tickwire tail`: print a topic's events, as kcat or `pulsar-client consume` would.

use std::io::Write;

use shm_client::{CloseReason, Event, Kind};

pub use tickwire_proto::json::rfc3339;
use tickwire_proto::json::{Decimal, TickJson};

/// One event as a JSON object, as one line of text (a tick is a
/// [`TickJson`], whose prices and sizes are exact decimals).
pub fn event_json(topic: &str, event: &Event<'_>) -> String {
    match event {
        Event::Tick(t) => {
            let record = TickJson::new(topic, t.partition, t.seq, t.body, t.instrument());
            serde_json::to_string(&record).unwrap_or_default()
        }
        other => notice_json(topic, other).to_string(),
    }
}

fn notice_json(topic: &str, event: &Event<'_>) -> serde_json::Value {
    match event {
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
            let px = |p: i64| Decimal::price(p).map_or("-".to_string(), |v| v.to_string());
            let decimals = inst.map_or(0, |e| e.size_decimals());
            let sz = |s: u32| Decimal::size(s, decimals).to_string();
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

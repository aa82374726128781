//! A subscriber's bounded queue of wire-ready frames, between the
//! dispatcher thread (which fills it) and the connection's writer task
//! (which empties it onto the socket).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

/// A frame's bytes as the wire takes them.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A protobuf `StreamResponse`.
    Binary(Bytes),
    /// A WebSocket JSON message, kept a `String` from the dispatcher to
    /// the socket so that the writer never checks its UTF-8 again.
    Text(String),
}

impl Payload {
    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.as_ref().len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes (no copy).
    pub fn into_bytes(self) -> Bytes {
        match self {
            Payload::Binary(b) => b,
            Payload::Text(t) => Bytes::from(t),
        }
    }
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        match self {
            Payload::Binary(b) => b,
            Payload::Text(t) => t.as_bytes(),
        }
    }
}

/// One message ready for the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Protobuf `StreamResponse` or WebSocket JSON text.
    pub bytes: Payload,
    /// Events it carries (0 for notices).
    pub events: u32,
    /// Ingest time of its oldest event (ns since the Unix epoch), 0 if none.
    pub oldest_ingest_ns: u64,
}

/// Why a subscriber's stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// Too slow under the DISCONNECT policy.
    SlowConsumer(String),
    /// The topic was deleted or its rings replaced.
    TopicGone(String),
    /// The subscription was deleted by an administrator.
    Deleted,
    /// The edge is shutting down.
    Shutdown,
    /// A subscription group removed this consumer (it did not acknowledge
    /// in time, or its subscription was reset).
    Removed(String),
}

impl Closed {
    /// What the client is told.
    pub fn reason(&self) -> String {
        match self {
            Closed::SlowConsumer(s) => format!("slow consumer: {s}"),
            Closed::TopicGone(s) => s.clone(),
            Closed::Deleted => "subscription deleted".into(),
            Closed::Shutdown => "the broker is shutting down".into(),
            Closed::Removed(s) => s.clone(),
        }
    }
}

/// Counters of one subscriber, read by stats.
#[derive(Debug, Default)]
pub struct SubCounters {
    /// Events handed to the transport.
    pub delivered: AtomicU64,
    /// Events skipped (slow consumer, paused) or lost to ring overrun.
    pub dropped: AtomicU64,
    /// Gap notices sent.
    pub gaps: AtomicU64,
    /// Events replaced by a later one of the same instrument (CONFLATE).
    pub conflated: AtomicU64,
    /// Last time something was sent (ns since the Unix epoch).
    pub last_activity_ns: AtomicU64,
}

/// A queue holding less than this is never refused for the edge's
/// budget: a subscriber that keeps up holds a frame or two, and must not
/// lose events because others stalled.
pub const BUDGET_FLOOR: usize = 64 * 1024;

/// The bytes queued for all the edge's subscribers together, with a
/// ceiling (`edge.queue_bytes_total`). Past it, a subscriber holding at
/// least [`BUDGET_FLOOR`] is full (its slow-consumer policy acts), so the
/// edge's memory stays bounded (by the ceiling plus the floor per
/// subscriber) however many subscribers stall at once, while one that
/// keeps up always gets its frames.
#[derive(Debug)]
pub struct QueueBudget {
    max: usize,
    used: AtomicUsize,
}

impl QueueBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<QueueBudget> {
        Arc::new(QueueBudget {
            max: max.max(1),
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes queued now, for all subscribers.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The ceiling.
    pub fn max(&self) -> usize {
        self.max
    }

    fn over(&self, more: usize) -> bool {
        self.used() + more > self.max
    }

    fn add(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Frame>,
    events: usize,
    bytes: usize,
    closed: Option<Closed>,
    /// Whether the last frame refused was refused for the edge's budget.
    over_budget: bool,
}

/// The bounded queue.
#[derive(Debug)]
pub struct Outbox {
    q: Mutex<Queue>,
    notify: Arc<Notify>,
    max_events: usize,
    max_bytes: usize,
    budget: Arc<QueueBudget>,
    /// Counters.
    pub counters: SubCounters,
}

/// What the writer gets next.
#[derive(Debug)]
pub enum Next {
    /// A frame to send.
    Frame(Frame),
    /// Nothing for the heartbeat interval.
    Idle,
    /// The stream is over.
    Closed(Closed),
}

impl Outbox {
    /// A queue bounded in events and bytes, and by the edge's `budget`,
    /// waking its writer through `notify` (shared by all subscriptions of
    /// one WebSocket connection).
    pub fn new(
        max_events: usize,
        max_bytes: usize,
        budget: Arc<QueueBudget>,
        notify: Arc<Notify>,
    ) -> Outbox {
        Outbox {
            q: Mutex::new(Queue::default()),
            notify,
            max_events: max_events.max(1),
            max_bytes: max_bytes.max(1),
            budget,
            counters: SubCounters::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a data frame if it fits within the limits; gives it back if not.
    ///
    /// # Errors
    /// The frame, when the queue is full (or closed).
    pub fn try_push(&self, f: Frame) -> Result<(), Frame> {
        let mut q = self.lock();
        if q.closed.is_some() {
            return Err(f);
        }
        if !q.frames.is_empty() {
            let own = q.events + f.events as usize > self.max_events
                || q.bytes + f.bytes.len() > self.max_bytes;
            if own || (q.bytes >= BUDGET_FLOOR && self.budget.over(f.bytes.len())) {
                q.over_budget = !own;
                return Err(f);
            }
        }
        q.events += f.events as usize;
        q.bytes += f.bytes.len();
        self.budget.add(f.bytes.len());
        q.frames.push_back(f);
        drop(q);
        self.notify.notify_one();
        Ok(())
    }

    /// Queues a data frame past the limits: for a subscription group,
    /// whose consumers' credit windows bound what is queued.
    pub fn push(&self, f: Frame) {
        let mut q = self.lock();
        if q.closed.is_some() {
            return;
        }
        q.events += f.events as usize;
        q.bytes += f.bytes.len();
        self.budget.add(f.bytes.len());
        q.frames.push_back(f);
        drop(q);
        self.notify.notify_one();
    }

    /// Queues a notice (gap, slow consumer, snapshot end) past the limits:
    /// notices are small and the dispatcher sends at most a few per
    /// partition before data flows again.
    pub fn push_notice(&self, f: Frame) {
        let mut q = self.lock();
        if q.closed.is_some() {
            return;
        }
        q.bytes += f.bytes.len();
        self.budget.add(f.bytes.len());
        q.frames.push_back(f);
        drop(q);
        self.notify.notify_one();
    }

    /// Whether the queue is at most half full, and the edge's budget less
    /// than 90% used (room to resume after a stall).
    pub fn has_room(&self) -> bool {
        let q = self.lock();
        q.events * 2 <= self.max_events
            && q.bytes * 2 <= self.max_bytes
            && self.budget.used() < self.budget.max / 10 * 9
    }

    /// What is full when a frame is refused: this queue, or the edge's
    /// budget for all queues.
    pub fn full(&self) -> &'static str {
        if self.lock().over_budget {
            "the edge's queues are full (edge.queue_bytes_total)"
        } else {
            "queue full"
        }
    }

    /// (events, bytes) queued.
    pub fn depth(&self) -> (usize, usize) {
        let q = self.lock();
        (q.events, q.bytes)
    }

    /// Ends the stream; what is queued is still sent first.
    pub fn close(&self, why: Closed) {
        let mut q = self.lock();
        if q.closed.is_none() {
            q.closed = Some(why);
        }
        drop(q);
        self.notify.notify_one();
        // A WebSocket writer shares the notify with other subscriptions:
        // wake it for sure.
        self.notify.notify_waiters();
    }

    /// Whether it was closed.
    pub fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// The next frame, without waiting: `Some(Next::Closed)` once drained
    /// and closed, `None` when there is nothing now.
    pub fn pop(&self) -> Option<Next> {
        let mut q = self.lock();
        match q.frames.pop_front() {
            Some(f) => {
                q.events -= f.events as usize;
                q.bytes -= f.bytes.len();
                self.budget.sub(f.bytes.len());
                drop(q);
                Some(Next::Frame(self.taken(f)))
            }
            None => q.closed.clone().map(Next::Closed),
        }
    }

    /// The next frame if it carries events (not a notice) and is at most
    /// `max_bytes`: what a writer may append to the data frame it holds
    /// without reordering anything.
    pub fn pop_data(&self, max_bytes: usize) -> Option<Frame> {
        let mut q = self.lock();
        let next = q.frames.front()?;
        if next.events == 0 || next.bytes.len() > max_bytes {
            return None;
        }
        let f = q.frames.pop_front()?;
        q.events -= f.events as usize;
        q.bytes -= f.bytes.len();
        self.budget.sub(f.bytes.len());
        drop(q);
        Some(self.taken(f))
    }

    fn taken(&self, f: Frame) -> Frame {
        self.counters
            .delivered
            .fetch_add(f.events as u64, Ordering::Relaxed);
        self.counters
            .last_activity_ns
            .store(tickwire_proto::futex::realtime_ns(), Ordering::Relaxed);
        f
    }

    /// The next frame, waiting up to `idle` for one.
    pub async fn next(&self, idle: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + idle;
        loop {
            let notified = self.notify.notified();
            if let Some(n) = self.pop() {
                return n;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.pop().unwrap_or(Next::Idle);
            }
        }
    }
}

impl Drop for Outbox {
    /// What a subscriber that went away left queued goes back to the budget.
    fn drop(&mut self) {
        let q = self.q.get_mut().unwrap_or_else(|p| p.into_inner());
        self.budget.sub(q.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(events: u32, len: usize) -> Frame {
        Frame {
            bytes: Payload::Binary(Bytes::from(vec![0u8; len])),
            events,
            oldest_ingest_ns: 0,
        }
    }

    #[test]
    fn the_queue_is_bounded_in_events_and_bytes() {
        let o = Outbox::new(
            10,
            1000,
            QueueBudget::new(usize::MAX),
            Arc::new(Notify::new()),
        );
        assert!(o.try_push(frame(6, 100)).is_ok());
        assert!(o.try_push(frame(6, 100)).is_err(), "12 events > 10");
        assert!(o.try_push(frame(4, 100)).is_ok());
        let o = Outbox::new(
            100,
            1000,
            QueueBudget::new(usize::MAX),
            Arc::new(Notify::new()),
        );
        assert!(o.try_push(frame(1, 900)).is_ok());
        assert!(o.try_push(frame(1, 200)).is_err(), "1100 bytes > 1000");
        // One frame larger than the limit still goes into an empty queue.
        let o = Outbox::new(
            10,
            10,
            QueueBudget::new(usize::MAX),
            Arc::new(Notify::new()),
        );
        assert!(o.try_push(frame(50, 5000)).is_ok());
        assert!(matches!(o.pop(), Some(Next::Frame(f)) if f.events == 50));
        assert_eq!(o.counters.delivered.load(Ordering::Relaxed), 50);
        o.close(Closed::Shutdown);
        assert!(matches!(o.pop(), Some(Next::Closed(Closed::Shutdown))));
    }

    #[test]
    fn pop_data_takes_data_frames_within_the_size_and_stops_at_a_notice() {
        let o = Outbox::new(
            100,
            100_000,
            QueueBudget::new(usize::MAX),
            Arc::new(Notify::new()),
        );
        assert!(o.try_push(frame(2, 100)).is_ok());
        assert!(o.try_push(frame(3, 300)).is_ok());
        o.push_notice(frame(0, 10));
        assert!(o.try_push(frame(4, 100)).is_ok());
        assert_eq!(o.pop_data(50).map(|f| f.events), None, "100 bytes > 50");
        assert_eq!(o.pop_data(1000).map(|f| f.events), Some(2));
        assert_eq!(o.pop_data(1000).map(|f| f.events), Some(3));
        assert_eq!(o.pop_data(1000).map(|f| f.events), None, "a notice is next");
        assert!(matches!(o.pop(), Some(Next::Frame(f)) if f.events == 0));
        assert_eq!(o.pop_data(1000).map(|f| f.events), Some(4));
        assert_eq!(o.depth(), (0, 0));
        assert_eq!(o.counters.delivered.load(Ordering::Relaxed), 9);
    }

    #[test]
    fn the_edge_budget_bounds_all_queues_together_and_never_a_subscriber_that_keeps_up() {
        const K: usize = BUDGET_FLOOR;
        let budget = QueueBudget::new(10 * K);
        let new = || Outbox::new(1000, 100 * K, budget.clone(), Arc::new(Notify::new()));
        let (stalled, other, keeps_up) = (new(), new(), new());
        assert!(stalled.try_push(frame(1, 4 * K)).is_ok());
        assert!(stalled.try_push(frame(1, 4 * K)).is_ok());
        assert_eq!(budget.used(), 8 * K);
        // Under the floor a queue is never refused for the budget.
        assert!(other.try_push(frame(1, K / 2)).is_ok());
        assert!(
            other.try_push(frame(1, 3 * K)).is_ok(),
            "K/2 queued: under the floor"
        );
        assert_eq!(budget.used(), 23 * K / 2);
        // Past it, and over the budget: refused, far under its own limits.
        assert!(
            other.try_push(frame(1, K)).is_err(),
            "over the edge's budget"
        );
        assert!(other.full().contains("edge.queue_bytes_total"));
        assert!(stalled.try_push(frame(1, K)).is_err());
        assert!(
            !stalled.has_room() && !other.has_room(),
            "past 90% of the budget"
        );
        // One that keeps up still gets its frames.
        assert!(keeps_up.try_push(frame(1, K / 4)).is_ok());
        assert!(keeps_up.try_push(frame(1, K / 4)).is_ok());
        assert!(matches!(keeps_up.pop(), Some(Next::Frame(_))));
        assert_eq!(stalled.pop_data(usize::MAX).map(|f| f.events), Some(1));
        // 23K/2 + K/2 in, K/4 and 4K out.
        assert_eq!(budget.used(), 31 * K / 4);
        assert!(other.has_room(), "under 90% again");
        // A subscriber that goes away gives back what it left queued.
        drop(stalled);
        drop(other);
        drop(keeps_up);
        assert_eq!(budget.used(), 0);
    }
}

//! The read path allocates nothing: a counting global allocator records zero
//! allocations while a subscriber reads 1M events (ticks and a gap).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use shm_client::testing::TopicWriter;
use shm_client::{Event, Filter, Kind, Start, Subscriber};
use tickwire_proto::FrameBody;

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn reading_a_million_events_allocates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n: u64 = 1_000_000;
    let mut w = TopicWriter::create(dir.path(), "alloc/test", 2, 1 << 20).expect("writer");
    let aapl = w.instrument("AAPL", "NASDAQ", "USD").expect("id");
    let vod = w.instrument("VOD", "LSE", "GBP").expect("id");
    for i in 1..=n / 2 {
        w.publish(0, &FrameBody::trade(aapl, i, 100, 10));
        w.publish(1, &FrameBody::quote(vod, i, (99, 5), (101, 7)));
    }
    w.flush();
    let mut sub = Subscriber::builder("alloc/test")
        .node_dir(dir.path())
        .start(Start::Earliest)
        .filter(
            Filter::default()
                .exchanges(["NASDAQ", "LSE"])
                .kinds([Kind::Trade, Kind::Quote])
                .min_volume(1),
        )
        .open()
        .expect("sub");
    let before = ALLOCS.load(Ordering::Relaxed);
    let mut ticks = 0u64;
    let mut sum = 0u64;
    while ticks < n {
        sub.poll(1024, |e| {
            if let Event::Tick(t) = e {
                ticks += 1;
                sum = sum.wrapping_add(t.body.size_a() as u64);
            }
        });
    }
    // try_recv and a gap take no allocation either.
    for i in 0..(1u64 << 20) + 10 {
        w.publish(0, &FrameBody::trade(aapl, i, 100, 10));
    }
    w.flush();
    let mut gaps = 0;
    while let Some(e) = sub.try_recv() {
        if matches!(e, Event::Gap { .. }) {
            gaps += 1;
        }
    }
    let after = ALLOCS.load(Ordering::Relaxed);
    assert_eq!(ticks, n);
    assert!(gaps >= 1);
    assert_eq!(
        sum,
        (n / 2) * 10 + (n / 2) * 5,
        "trade sizes + quote bid sizes"
    );
    assert_eq!(after - before, 0, "allocations on the read path");
}

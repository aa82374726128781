//! Model-checks the real ring protocol (`src/ring.rs`, compiled against
//! loom's atomics through `src/sync.rs`): one writer and two readers, one of
//! them tethered, at capacity 4, covering laps, tether timeout and reclaim.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p tickwire-proto --release --test loom_ring`.
//! With `--cfg tickwire_mutant_relaxed_stamp` added (the commit marker stored
//! Relaxed), `no_torn_frame_even_when_lapped` must fail: `.ci/run` checks it does.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use tickwire_proto::layout::{ReaderSlot, RegistryBlock, Slot, WaiterBlock, WriterBlock};
use tickwire_proto::ring::{
    Clock, Liveness, Read, ReaderCore, ReaderRegistration, RingRef, Tether, WriterCore, WriterStats,
};

struct Parts {
    writer: WriterBlock,
    waiter: WaiterBlock,
    registry: RegistryBlock,
    readers: Vec<ReaderSlot>,
    slots: Vec<Slot>,
    locks: Vec<AtomicBool>,
}

fn a64() -> AtomicU64 {
    AtomicU64::new(0)
}

impl Parts {
    /// Leaked per model iteration (a few KiB), so that the writer can be
    /// recovered on the main thread and then moved into its own, as the
    /// broker opens a ring before its shard starts.
    fn new(capacity: usize, readers: usize) -> &'static Parts {
        Box::leak(Box::new(Parts {
            writer: WriterBlock {
                epoch: a64(),
                published: a64(),
                epoch_start_seq: a64(),
                writer_pid: a64(),
                state: a64(),
            },
            waiter: WaiterBlock {
                word: AtomicU32::new(0),
            },
            registry: RegistryBlock { generation: a64() },
            readers: (0..readers)
                .map(|_| ReaderSlot {
                    state_gen: a64(),
                    cursor: a64(),
                    tether_budget_ns: a64(),
                    pid: a64(),
                    group_id: a64(),
                    member: AtomicU32::new(0),
                    selector: AtomicU32::new(0),
                    acked_cursor: a64(),
                    untethered_count: a64(),
                })
                .collect(),
            slots: (0..capacity)
                .map(|_| Slot {
                    stamp: a64(),
                    body: std::array::from_fn(|_| a64()),
                })
                .collect(),
            locks: (0..readers).map(|_| AtomicBool::new(false)).collect(),
        }))
    }

    fn ring(&'static self) -> RingRef<'static> {
        RingRef::new(
            &self.writer,
            &self.waiter,
            &self.registry,
            &self.readers,
            &self.slots,
        )
    }
}

/// Liveness locks as flags; "dying" is dropping the lock without cleaning up.
struct Locks<'a>(&'a [AtomicBool]);

impl Liveness for Locks<'_> {
    fn try_lock(&self, index: usize) -> bool {
        self.0[index]
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
    fn unlock(&self, index: usize) {
        self.0[index].store(false, Ordering::Release);
    }
}

/// Logical time: every look at the clock advances it by one.
struct Ticks(std::cell::Cell<u64>);

impl Clock for Ticks {
    fn now_ns(&self) -> u64 {
        let t = self.0.get() + 1;
        self.0.set(t);
        t
    }
}

fn body(seq: u64) -> [u64; 7] {
    [seq; 7]
}

/// Recovers the writer on the calling thread, as the broker opens a ring
/// before its shard starts (recovered inside the spawned thread, the model
/// never schedules its commits ahead of a reader).
fn recover_writer(parts: &'static Parts) -> WriterCore<'static, Locks<'static>, Ticks> {
    match WriterCore::recover(parts.ring(), Locks(&parts.locks), Ticks(Default::default())) {
        Ok(w) => w,
        Err(e) => panic!("a fresh ring is refused: {e}"),
    }
}

/// Publishes sequences 1..=5 on a new thread, flushes, returns its stats.
fn spawn_publishing(
    mut w: WriterCore<'static, Locks<'static>, Ticks>,
) -> loom::thread::JoinHandle<WriterStats> {
    loom::thread::spawn(move || {
        for seq in 1..=5 {
            w.publish(&body(seq));
        }
        w.flush();
        w.stats()
    })
}

fn spawn_writer(parts: &'static Parts) -> loom::thread::JoinHandle<WriterStats> {
    spawn_publishing(recover_writer(parts))
}

/// Preemption bound 2 by default (`LOOM_MAX_PREEMPTIONS` overrides).
fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    b
}

/// An untethered reader racing a writer that laps it: every delivered frame
/// is whole and in order, and ticks plus reported losses cover the sequence
/// with no hole and no overlap.
#[test]
fn no_torn_frame_even_when_lapped() {
    builder().check(|| {
        let parts = Parts::new(4, 2);
        let writer = spawn_writer(parts);
        let mut r = ReaderCore::new(parts.ring(), 1);
        r.set_slack(0);
        let mut next = 1;
        let mut buf = [0u64; 7];
        for _ in 0..2 {
            match r.try_read(&mut buf) {
                Read::Frame(seq) => {
                    assert_eq!(seq, next);
                    assert_eq!(buf, body(seq), "torn frame delivered for seq {seq}");
                    next += 1;
                }
                Read::Lapped { from, to } => {
                    assert_eq!(from, next);
                    assert!(to >= from);
                    next = to + 1;
                }
                Read::Empty => loom::thread::yield_now(),
            }
        }
        writer.join().expect("writer");
    });
}

/// A tethered reader that keeps reading loses nothing while an untethered
/// one reads beside it.
#[test]
fn a_tethered_reader_loses_nothing() {
    builder().check(|| {
        let parts = Parts::new(4, 2);
        let reg =
            ReaderRegistration::claim(parts.ring(), Locks(&parts.locks), 1, true, u64::MAX, 1)
                .expect("slot");
        let writer = spawn_writer(parts);
        let other = loom::thread::spawn(move || {
            let mut r = ReaderCore::new(parts.ring(), 5);
            let mut buf = [0u64; 7];
            if let Read::Frame(seq) = r.try_read(&mut buf) {
                assert_eq!(buf, body(seq));
            }
        });
        let mut r = ReaderCore::new(parts.ring(), 1);
        let mut buf = [0u64; 7];
        let mut next = 1;
        while next <= 5 {
            match r.try_read(&mut buf) {
                Read::Frame(seq) => {
                    assert_eq!((seq, buf), (next, body(next)));
                    next += 1;
                    reg.store_cursor(next);
                }
                Read::Lapped { from, to } => panic!("tethered reader lapped: {from}..={to}"),
                Read::Empty => loom::thread::yield_now(),
            }
        }
        assert_eq!(writer.join().expect("writer").untethered, 0);
        other.join().expect("other");
    });
}

/// A tethered reader that stops reading holds the writer for its budget
/// only: then it is untethered (and sees that), and the writer finishes.
#[test]
fn a_stalled_tethered_reader_is_untethered_after_its_budget() {
    builder().check(|| {
        let parts = Parts::new(4, 2);
        let mut reg = ReaderRegistration::claim(parts.ring(), Locks(&parts.locks), 1, true, 3, 1)
            .expect("slot");
        let writer = spawn_writer(parts);
        let stats = writer.join().expect("writer");
        assert_eq!(stats.untethered, 1);
        assert_eq!(stats.reclaimed, 0);
        assert_eq!(reg.check(), Tether::Untethered);
        assert_eq!(reg.check(), Tether::Unchanged);
        // Lapped now, and told exactly what it lost.
        let mut r = ReaderCore::new(parts.ring(), 1);
        r.set_slack(0);
        let mut buf = [0u64; 7];
        assert_eq!(r.try_read(&mut buf), Read::Lapped { from: 1, to: 1 });
        assert_eq!(r.try_read(&mut buf), Read::Frame(2));
    });
}

/// A tethered reader whose process dies (its liveness lock drops, its slot
/// still says TETHERED) never holds the writer: the slot is reclaimed.
#[test]
fn a_dead_tethered_reader_is_reclaimed() {
    builder().check(|| {
        let parts = Parts::new(4, 2);
        let reg =
            ReaderRegistration::claim(parts.ring(), Locks(&parts.locks), 1, true, u64::MAX, 1)
                .expect("slot");
        let index = reg.index();
        std::mem::forget(reg);
        let w = recover_writer(parts);
        let dier = loom::thread::spawn(move || parts.locks[index].store(false, Ordering::Release));
        let writer = spawn_publishing(w);
        dier.join().expect("dier");
        let stats = writer.join().expect("writer");
        assert_eq!(stats.reclaimed, 1);
        assert_eq!(stats.untethered, 0);
        let (_, state) = tickwire_proto::layout::unpack_state(
            parts.readers[index].state_gen.load(Ordering::Acquire),
        );
        assert_eq!(state, tickwire_proto::layout::STATE_FREE);
    });
}

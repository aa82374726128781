//! The ring protocol: one writer, any number of readers, over a [`RingRef`].
//!
//! This is the Disruptor/Aeron broadcast pattern:
//!
//! - The writer fills slot `seq & mask`: it marks the stamp `seq | WRITING_BIT`
//!   (Relaxed), stores the body words (Release each: a plain store on x86)
//!   and finally stores the stamp `seq` with Release: the commit marker.
//! - A reader wanting `seq` loads the stamp with Acquire; if it equals `seq`
//!   it copies the body, issues an Acquire fence and loads the stamp again: a
//!   seqlock. A changed stamp means the writer lapped it, and the reader
//!   reports the exact range it lost. A torn copy is never delivered.
//! - Untethered readers are never waited for. A tethered reader publishes its
//!   cursor once per poll; the writer caches `min(cursor) + capacity` as its
//!   gate (Disruptor gating) and only looks at the readers again when it
//!   reaches the gate. A tethered reader that holds the writer back longer
//!   than its budget is untethered with a CAS on its `state_gen` word, and
//!   sees that on its next poll. A dead reader (its liveness lock is free) is
//!   reclaimed instead.
//! - The writer publishes the header's sequence and wakes blocked readers at
//!   most once per batch ([`WriterCore::flush`]).
//!
//! Everything here compiles against [`crate::sync`], so `tests/loom_ring.rs`
//! model-checks this very code.
//!
//! # Reading a ring from another language
//!
//! The files are drawn in [`crate::layout`], the slot and body in
//! [`crate::frame`]. All words are little-endian; atomic loads below are
//! 8-byte aligned loads with the stated ordering (on x86-64 a plain `mov`
//! plus a compiler barrier for Acquire).
//!
//! Opening:
//! 1. Map `<topic>.<p>.ring` read-only. Check magic, `major == 2`
//!    (refuse another major, accept any minor), `endian`, `header_size`,
//!    `slot_size`, `capacity` (a power of two), and that the file is
//!    `header_size + capacity * slot_size` bytes.
//! 2. Optionally map `<topic>.<p>.readers` read-write to take a reader slot
//!    (needed to be tethered, to be counted as a reader, and to block on the
//!    futex). A reader that takes no slot is supported: it reads exactly as
//!    below, never writes anything, and polls instead of blocking.
//! 3. Choose the first sequence: Latest = `published + 1`; Earliest =
//!    `max(1, published - capacity + 1)` (the oldest the ring can still hold;
//!    after a writer restart the ring keeps the previous epoch's frames and
//!    sequences continue, so Earliest may return frames from before it);
//!    or a saved sequence.
//!
//! Reading sequence `seq` (slot `i = seq & (capacity - 1)` at byte
//! `header_size + i * slot_size`; its first 8 bytes are the stamp):
//! 1. `st = load_acquire(stamp)`.
//! 2. `st == seq`: committed. Copy the 56 body bytes, then an Acquire fence,
//!    then `st2 = load(stamp)`. If `st2 == seq` the copy is good: deliver it,
//!    `seq += 1`. Else the writer overwrote the slot during the copy: you
//!    were lapped (step 4), drop the copy.
//! 3. Let `s = st & !WRITING_BIT` (`WRITING_BIT = 1 << 63` is set while the
//!    writer fills a slot). `s <= seq` (including `st == 0`, never written,
//!    and `seq | WRITING_BIT`, being written now): not written yet; wait and
//!    try again.
//! 4. `s > seq`: lapped: the writer has already reused the slot for a later
//!    sequence. `head = max(published, s)`; every sequence from `seq` to
//!    `max(1, head - capacity + 1) - 1` (at least) is lost. Report the gap
//!    and continue at `head - capacity + 1` or later (this implementation
//!    adds `capacity / 8` of slack so the next read is not lapped at once).
//!
//! `published` (writer block offset 8) is the last sequence of the writer's
//! last batch (Release): use it for Latest starts and lag, never as the
//! signal that a slot is ready (the stamp is). `state` (offset 32) is 2 when
//! the writer closed the stream gracefully; a writer is alive while it holds
//! the OFD lock on byte 0 of the data file (ask with `F_OFD_GETLK`). A
//! message id is (topic, partition, epoch, sequence): `epoch` (offset 0)
//! goes up by one every time a writer opens the ring.
//!
//! Blocking (registered readers only): set bit 0 of the futex word
//! (reader-state offset 128) with a SeqCst fetch-or, look at the next stamp
//! once more, then `FUTEX_WAIT` (shared, not private) on the word with the
//! value you saw, with a timeout. The writer wakes all waiters after a batch
//! when the bit is set, and clears it.

use crate::frame::BODY_WORDS;
use crate::layout::{
    ReaderSlot, RegistryBlock, STATE_FREE, STATE_TETHERED, STATE_UNTETHERED, Slot, WRITER_CLOSED,
    WRITER_OPEN, WaiterBlock, WriterBlock, pack_state, unpack_state,
};
use crate::sync::{AtomicU32, Ordering, STAMP_STORE, fence, spin_hint};

/// Set in a stamp while the writer is filling the slot: `0x8000_0000_0000_0000`.
pub const WRITING_BIT: u64 = 1 << 63;

/// References to the parts of one ring, wherever they live (a mapped file,
/// or plain memory in the loom model). It borrows them for `'a`, so it can
/// never outlive the mapping (or memory) it was made from.
#[derive(Clone, Copy)]
pub struct RingRef<'a> {
    writer: &'a WriterBlock,
    waiter: &'a WaiterBlock,
    registry: &'a RegistryBlock,
    readers: &'a [ReaderSlot],
    slots: &'a [Slot],
    mask: u64,
    /// The first sequence the ring was created for (1 unless created to
    /// continue a journal: see [`crate::layout::StaticBlock::first_seq`]).
    first: u64,
    /// Whether the writer block and the slots may be stored to (false for
    /// a reader's read-only mapping: [`WriterCore::recover`] refuses it).
    writable: bool,
}

/// Why [`WriterCore::recover`] refused a ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoverError {
    /// The ring was mapped read-only (a reader's view).
    #[error("the ring is mapped read-only; only its writer may recover it")]
    ReadOnly,
    /// What the ring holds cannot have been written by the protocol.
    #[error("{field} = {value}: {expected}")]
    Corrupt {
        /// The field, e.g. `stamp of slot 17` or `published`.
        field: String,
        /// What it holds.
        value: u64,
        /// What it would have to be.
        expected: String,
    },
}

impl<'a> RingRef<'a> {
    /// Assembles a ring from its parts.
    ///
    /// # Panics
    /// If `slots.len()` is not a power of two of at least 2: callers build
    /// the parts from a validated header (see [`crate::file`]).
    pub fn new(
        writer: &'a WriterBlock,
        waiter: &'a WaiterBlock,
        registry: &'a RegistryBlock,
        readers: &'a [ReaderSlot],
        slots: &'a [Slot],
    ) -> Self {
        assert!(
            slots.len().is_power_of_two() && slots.len() >= 2,
            "ring capacity must be a power of two"
        );
        RingRef {
            writer,
            waiter,
            registry,
            readers,
            slots,
            mask: slots.len() as u64 - 1,
            first: 1,
            writable: true,
        }
    }

    /// The same ring, created to start at sequence `first` (0 means 1).
    pub fn starting_at(mut self, first: u64) -> Self {
        self.first = first.max(1);
        self
    }

    /// The first sequence this ring was created for: lower ones were never
    /// in it (1 for a ring that started a stream).
    #[inline]
    pub fn first_seq(&self) -> u64 {
        self.first
    }

    /// The oldest sequence the ring can still hold when `head` is the
    /// newest: `capacity` back from it, never before [`Self::first_seq`].
    #[inline]
    pub fn oldest(&self, head: u64) -> u64 {
        head.saturating_sub(self.capacity() - 1).max(self.first)
    }

    /// The same ring, marked as mapped read-only: no writer may recover it.
    pub(crate) fn read_only(mut self) -> Self {
        self.writable = false;
        self
    }

    /// The writer's state word: [`WRITER_OPEN`], [`WRITER_CLOSED`] or
    /// [`crate::layout::WRITER_NONE`].
    pub fn writer_state(&self) -> u64 {
        // Acquire: pairs with the Release store in `WriterCore::close`, so
        // a reader that sees CLOSED also sees every committed frame.
        self.writer.state.load(Ordering::Acquire)
    }

    /// Number of slots.
    #[inline]
    pub fn capacity(&self) -> u64 {
        self.mask + 1
    }

    /// The slot that holds `seq`.
    #[inline(always)]
    fn slot(&self, seq: u64) -> &'a Slot {
        // SAFETY: `mask + 1 == slots.len()` (checked in `new`), so the index
        // is in bounds.
        unsafe { self.slots.get_unchecked((seq & self.mask) as usize) }
    }

    /// The writer's epoch.
    pub fn epoch(&self) -> u64 {
        self.writer.epoch.load(Ordering::Acquire)
    }

    /// The first sequence the current epoch's writer assigned (or will).
    pub fn epoch_start_seq(&self) -> u64 {
        self.writer.epoch_start_seq.load(Ordering::Acquire)
    }

    /// Last sequence the writer published (per batch; the writer may be a
    /// batch ahead of it).
    #[inline]
    pub fn published(&self) -> u64 {
        // Acquire: pairs with the Release store in `WriterCore::flush`.
        self.writer.published.load(Ordering::Acquire)
    }

    /// The reader slots.
    pub fn readers(&self) -> &'a [ReaderSlot] {
        self.readers
    }

    /// The futex word readers block on.
    pub fn waiter_word(&self) -> &'a AtomicU32 {
        &self.waiter.word
    }

    /// The registry block.
    pub fn registry(&self) -> &'a RegistryBlock {
        self.registry
    }

    /// The stamp currently in the slot for `seq` (for recovery and tools).
    pub fn stamp_at(&self, seq: u64) -> u64 {
        self.slot(seq).stamp.load(Ordering::Acquire)
    }
}

/// Tells whether reader slots are owned, through their liveness locks.
pub trait Liveness {
    /// Tries to take reader slot `index`'s lock; `true` if now held by us.
    fn try_lock(&self, index: usize) -> bool;
    /// Releases a lock taken with `try_lock`.
    fn unlock(&self, index: usize);
}

/// The writer's clock, for tether budgets (logical time in the loom model).
pub trait Clock {
    /// Monotonic nanoseconds.
    fn now_ns(&self) -> u64;
}

/// Counters the writer keeps about its readers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    /// Tethered readers the writer untethered after their budget ran out.
    pub untethered: u64,
    /// Reader slots of dead readers the writer reclaimed.
    pub reclaimed: u64,
    /// Times the writer had to wait at the gate.
    pub gate_waits: u64,
    /// Total nanoseconds spent waiting at the gate.
    pub gate_wait_ns: u64,
}

/// The writer's side of the protocol. Exactly one exists per ring (the file
/// lock guarantees it across processes).
pub struct WriterCore<'a, L: Liveness, C: Clock> {
    ring: RingRef<'a>,
    liveness: L,
    clock: C,
    next: u64,
    gate: u64,
    registry_seen: u64,
    published: u64,
    stats: WriterStats,
}

impl<'a, L: Liveness, C: Clock> WriterCore<'a, L, C> {
    /// Takes over a ring: checks what the last writer left, finds the last
    /// committed stamp, bumps the epoch and continues the sequence after it,
    /// reclaiming slots of dead readers.
    ///
    /// # Errors
    /// [`RecoverError::ReadOnly`] for a reader's view;
    /// [`RecoverError::Corrupt`] when a stamp sits in a slot its sequence
    /// does not map to, the stamps are not the last `capacity` sequences of
    /// one stream, or `published` is beyond every committed stamp: what the
    /// protocol can never leave behind, so the sequence cannot be trusted.
    pub fn recover(ring: RingRef<'a>, liveness: L, clock: C) -> Result<Self, RecoverError> {
        if !ring.writable {
            return Err(RecoverError::ReadOnly);
        }
        // A ring created to continue a journal at `first` has no stamps
        // yet, and its stream stands at `first - 1`.
        let last = scan_stamps(&ring)?.max(ring.first - 1);
        let published = ring.published();
        if published > last {
            return Err(RecoverError::Corrupt {
                field: "published".into(),
                value: published,
                expected: format!("at most {last}, the highest committed stamp"),
            });
        }
        ring.writer.epoch.fetch_add(1, Ordering::AcqRel);
        ring.writer
            .epoch_start_seq
            .store(last + 1, Ordering::Release);
        ring.writer.published.store(last, Ordering::Release);
        ring.writer.state.store(WRITER_OPEN, Ordering::Release);
        let mut w = WriterCore {
            ring,
            liveness,
            clock,
            next: last + 1,
            gate: 0,
            registry_seen: ring.registry.generation.load(Ordering::Acquire),
            published: last,
            stats: WriterStats::default(),
        };
        w.reclaim_dead();
        w.gate = w.compute_gate().0;
        Ok(w)
    }

    /// Ends the stream gracefully: publishes what was written, marks the
    /// ring closed (readers see the end of the stream once they have read
    /// up to `published`) and wakes blocked readers so they notice. A later
    /// [`recover`](Self::recover) reopens it.
    pub fn close(&mut self) {
        self.flush();
        // Release: a reader that sees CLOSED (Acquire) sees every frame.
        self.ring
            .writer
            .state
            .store(WRITER_CLOSED, Ordering::Release);
        fence(Ordering::SeqCst);
        let w = self.ring.waiter.word.load(Ordering::Relaxed);
        self.wake(w);
    }

    /// The ring.
    pub fn ring(&self) -> RingRef<'a> {
        self.ring
    }

    /// The next sequence [`publish`](Self::publish) will assign.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// Counters.
    pub fn stats(&self) -> WriterStats {
        self.stats
    }

    /// Writes one frame body and commits it; returns its sequence. Waits at
    /// the gate for tethered readers, at most their tether budget.
    #[inline]
    pub fn publish(&mut self, body: &[u64; BODY_WORDS]) -> u64 {
        let seq = self.next;
        if seq >= self.gate {
            // Readers see what this batch wrote (and blocked ones wake)
            // before the writer may wait on them.
            self.flush();
            self.wait_for_gate(seq);
        }
        let slot = self.ring.slot(seq);
        slot.stamp.store(seq | WRITING_BIT, Ordering::Relaxed);
        for (dst, &w) in slot.body.iter().zip(body.iter()) {
            // SYNC POINT: each body store is Release (a plain `mov` on x86),
            // ordering the WRITING mark before it; pairs with the reader's
            // Acquire fence before its second stamp load, so a reader that
            // saw any new body word also sees the mark and drops the copy.
            dst.store(w, Ordering::Release);
        }
        // SYNC POINT: the commit marker, written last with Release; pairs
        // with the reader's Acquire load of the stamp.
        slot.stamp.store(seq, STAMP_STORE);
        self.next = seq + 1;
        seq
    }

    /// Whether the next [`publish`](Self::publish) must look at the
    /// tethered readers' cursors and may wait for them: a caller holding
    /// completions for this batch hands them back first.
    #[inline]
    pub fn at_gate(&self) -> bool {
        self.next >= self.gate
    }

    /// Ends a batch: publishes the header sequence, wakes blocked readers if
    /// any flagged themselves, and notices readers that joined or left.
    /// Returns the published sequence.
    pub fn flush(&mut self) -> u64 {
        let last = self.next - 1;
        if last != self.published {
            self.published = last;
            // Release: pairs with `RingRef::published`'s Acquire.
            self.ring.writer.published.store(last, Ordering::Release);
            // SYNC POINT: StoreLoad between our stamp stores and the waiter
            // flag load; pairs with the SeqCst `fetch_or` a waiter does
            // before its last look at the ring. Once per batch.
            fence(Ordering::SeqCst);
            let w = self.ring.waiter.word.load(Ordering::Relaxed);
            if w & 1 != 0 {
                self.wake(w);
            }
        }
        // Acquire: pairs with the SeqCst bump a reader does after it has
        // written its slot.
        let g = self.ring.registry.generation.load(Ordering::Acquire);
        if g != self.registry_seen {
            self.registry_seen = g;
            self.gate = self.compute_gate().0;
        }
        last
    }

    #[cold]
    fn wake(&self, seen: u32) {
        let word = &self.ring.waiter.word;
        let mut cur = seen;
        loop {
            let next = (cur & !1).wrapping_add(2);
            match word.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        crate::futex::wake_all(word);
    }

    /// Reclaims reader slots whose owner died; returns how many.
    pub fn reclaim_dead(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.ring.readers.len() {
            if self.try_reclaim(i) {
                n += 1;
            }
        }
        if n > 0 {
            self.ring.registry.generation.fetch_add(1, Ordering::AcqRel);
            self.gate = self.compute_gate().0;
        }
        n
    }

    fn try_reclaim(&mut self, index: usize) -> bool {
        let r = &self.ring.readers[index];
        let sg = r.state_gen.load(Ordering::Acquire);
        let (generation, state) = unpack_state(sg);
        if state == STATE_FREE || !self.liveness.try_lock(index) {
            return false;
        }
        // We hold the lock, so no live reader owns this slot.
        let freed = r
            .state_gen
            .compare_exchange(
                sg,
                pack_state(generation.wrapping_add(1), STATE_FREE),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok();
        self.liveness.unlock(index);
        if freed {
            self.stats.reclaimed += 1;
        }
        freed
    }

    /// Scans the tethered readers: returns (gate, slowest reader index).
    fn compute_gate(&self) -> (u64, Option<usize>) {
        let mut min = u64::MAX;
        let mut slowest = None;
        for (i, r) in self.ring.readers.iter().enumerate() {
            let (_, state) = unpack_state(r.state_gen.load(Ordering::Acquire));
            if state != STATE_TETHERED {
                continue;
            }
            // Acquire: pairs with the reader's Release cursor store: its
            // reads of every slot below the cursor are done.
            let c = r.cursor.load(Ordering::Acquire);
            if c < min {
                min = c;
                slowest = Some(i);
            }
        }
        (min.saturating_add(self.ring.capacity()), slowest)
    }

    #[cold]
    fn wait_for_gate(&mut self, seq: u64) {
        let mut since: Option<u64> = None;
        let mut checked_liveness = false;
        let mut spins = 0u32;
        loop {
            let (gate, slowest) = self.compute_gate();
            self.gate = gate;
            let Some(index) = slowest.filter(|_| seq >= gate) else {
                break;
            };
            let now = self.clock.now_ns();
            let start = *since.get_or_insert(now);
            // Liveness is a syscall: look at the first wait, then now and then.
            const LIVENESS_EVERY: u32 = if cfg!(loom) { 1 } else { 1024 };
            if !checked_liveness || spins % LIVENESS_EVERY == LIVENESS_EVERY - 1 {
                checked_liveness = true;
                if self.try_reclaim(index) {
                    continue;
                }
            }
            let r = &self.ring.readers[index];
            let budget = r.tether_budget_ns.load(Ordering::Relaxed);
            if now.saturating_sub(start) >= budget {
                let sg = r.state_gen.load(Ordering::Acquire);
                let (generation, state) = unpack_state(sg);
                if state == STATE_TETHERED
                    && r.state_gen
                        .compare_exchange(
                            sg,
                            pack_state(generation, STATE_UNTETHERED),
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                {
                    r.untethered_count.fetch_add(1, Ordering::Relaxed);
                    self.stats.untethered += 1;
                }
                continue;
            }
            spins = spins.wrapping_add(1);
            if spins < 128 {
                spin_hint();
            } else {
                #[cfg(not(loom))]
                std::thread::yield_now();
                #[cfg(loom)]
                spin_hint();
            }
        }
        if let Some(start) = since {
            self.stats.gate_waits += 1;
            self.stats.gate_wait_ns += self.clock.now_ns().saturating_sub(start);
        }
    }
}

/// Checks every stamp and returns the last committed sequence: a committed
/// stamp `s` must sit in slot `s & mask` and be one of the last `capacity`
/// sequences (`s > max - capacity`); a stamp with the WRITING mark (the last
/// writer died filling it) must be the sequence after them, and is not
/// committed.
fn scan_stamps(ring: &RingRef<'_>) -> Result<u64, RecoverError> {
    let cap = ring.capacity();
    let corrupt = |i: usize, st: u64, expected: String| RecoverError::Corrupt {
        field: format!("stamp of slot {i}"),
        value: st,
        expected,
    };
    let mut max = 0u64;
    for (i, s) in ring.slots.iter().enumerate() {
        let st = s.stamp.load(Ordering::Acquire);
        let seq = st & !WRITING_BIT;
        if seq != 0 && seq & ring.mask != i as u64 {
            return Err(corrupt(
                i,
                st,
                format!("a sequence that maps to slot {i} (seq & {})", ring.mask),
            ));
        }
        if st & WRITING_BIT == 0 {
            max = max.max(st);
        }
    }
    let oldest = ring.oldest(max);
    for (i, s) in ring.slots.iter().enumerate() {
        let st = s.stamp.load(Ordering::Acquire);
        if st == 0 {
            // Never written: only possible for sequences not reached yet.
            if max.saturating_sub(ring.first - 1) >= cap {
                return Err(corrupt(
                    i,
                    st,
                    format!("a written slot: sequences up to {max} have filled the ring"),
                ));
            }
        } else if st & WRITING_BIT != 0 {
            let seq = st & !WRITING_BIT;
            if seq != max + 1 {
                return Err(corrupt(
                    i,
                    st,
                    format!(
                        "the WRITING mark only on the sequence after the last committed one ({})",
                        max + 1
                    ),
                ));
            }
        } else if st < oldest {
            return Err(corrupt(
                i,
                st,
                format!("one of the last {cap} sequences ({oldest}..={max})"),
            ));
        }
    }
    Ok(max)
}

/// What one read attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// The body of `seq` was copied out.
    Frame(u64),
    /// Nothing new yet.
    Empty,
    /// The writer lapped the reader: sequences `from..=to` are lost to it,
    /// and its cursor moved to `to + 1`.
    Lapped {
        /// First lost sequence.
        from: u64,
        /// Last lost sequence.
        to: u64,
    },
}

/// The reader's side of the protocol for one ring: a cursor and the seqlock
/// read. Registration in a reader slot is separate ([`ReaderRegistration`]).
pub struct ReaderCore<'a> {
    ring: RingRef<'a>,
    cursor: u64,
    slack: u64,
}

impl<'a> ReaderCore<'a> {
    /// A reader whose next sequence is `cursor` (>= 1).
    pub fn new(ring: RingRef<'a>, cursor: u64) -> Self {
        let slack = (ring.capacity() / 8).max(1);
        ReaderCore {
            ring,
            cursor: cursor.max(1),
            slack,
        }
    }

    /// The ring.
    pub fn ring(&self) -> RingRef<'a> {
        self.ring
    }

    /// The next sequence to read.
    #[inline]
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Moves the cursor (used for Latest starts and rejoining at live).
    pub fn set_cursor(&mut self, cursor: u64) {
        self.cursor = cursor.max(1);
    }

    /// How far behind a lapped reader resumes past the oldest slot still held.
    pub fn set_slack(&mut self, slack: u64) {
        self.slack = slack.min(self.ring.capacity() - 1);
    }

    /// Whether a read at the cursor would return something (no copy): the
    /// slot holds the cursor's committed frame, or a later sequence (a lap).
    /// A slot still marked WRITING for the cursor's own sequence is not
    /// ready: its writer may have died there.
    #[inline]
    pub fn ready(&self) -> bool {
        let st = self.ring.slot(self.cursor).stamp.load(Ordering::Acquire);
        let seq = st & !WRITING_BIT;
        seq > self.cursor
            || (seq == self.cursor && st & WRITING_BIT == 0)
            || self.cursor < self.ring.first
    }

    /// Tries to read the frame at the cursor into `out` (a seqlock read).
    #[inline]
    pub fn try_read(&mut self, out: &mut [u64; BODY_WORDS]) -> Read {
        let seq = self.cursor;
        let slot = self.ring.slot(seq);
        // SYNC POINT: Acquire pairs with the writer's Release commit store.
        let st = slot.stamp.load(Ordering::Acquire);
        if st != seq {
            let seen = st & !WRITING_BIT;
            return if seen > seq {
                self.lapped(seen)
            } else if seq < self.ring.first {
                // Before the ring's first sequence: never in this ring.
                self.lapped(0)
            } else {
                Read::Empty
            };
        }
        for (o, w) in out.iter_mut().zip(slot.body.iter()) {
            *o = w.load(Ordering::Relaxed);
        }
        // SYNC POINT: orders the body loads before the stamp re-check; pairs
        // with the writer's Release body stores that follow its WRITING mark.
        fence(Ordering::Acquire);
        let st2 = slot.stamp.load(Ordering::Relaxed);
        if st2 != seq {
            return self.lapped(st2 & !WRITING_BIT);
        }
        self.cursor = seq + 1;
        Read::Frame(seq)
    }

    #[cold]
    fn lapped(&mut self, seen: u64) -> Read {
        let head = self.ring.published().max(seen);
        let oldest = self.ring.oldest(head);
        // A cursor before the ring's first sequence resumes at it at the
        // latest, though nothing was published since.
        let resume = (oldest + self.slack)
            .min(head.max(self.ring.first))
            .max(self.cursor + 1);
        let from = self.cursor;
        self.cursor = resume;
        Read::Lapped {
            from,
            to: resume - 1,
        }
    }
}

/// What became of a reader's registration since it last looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tether {
    /// As registered.
    Unchanged,
    /// The writer untethered us: it no longer waits for this reader.
    Untethered,
}

/// A reader's claim on one reader slot: owned through the liveness lock.
pub struct ReaderRegistration<'a, L: Liveness> {
    ring: RingRef<'a>,
    liveness: L,
    index: usize,
    expected: u64,
}

impl<'a, L: Liveness> ReaderRegistration<'a, L> {
    /// Claims a free (or dead reader's) slot. `None` if all are taken.
    pub fn claim(
        ring: RingRef<'a>,
        liveness: L,
        cursor: u64,
        tethered: bool,
        budget_ns: u64,
        pid: u64,
    ) -> Option<Self> {
        for index in 0..ring.readers.len() {
            if !liveness.try_lock(index) {
                continue;
            }
            let r = &ring.readers[index];
            let sg = r.state_gen.load(Ordering::Acquire);
            let (generation, _) = unpack_state(sg);
            // The writer waits only for sequences of its own ring.
            r.cursor.store(cursor.max(ring.first), Ordering::Release);
            r.tether_budget_ns.store(budget_ns, Ordering::Relaxed);
            r.pid.store(pid, Ordering::Relaxed);
            r.acked_cursor.store(0, Ordering::Relaxed);
            let state = if tethered {
                STATE_TETHERED
            } else {
                STATE_UNTETHERED
            };
            let new = pack_state(generation.wrapping_add(1), state);
            // We hold the lock: only the writer's untether CAS could race,
            // and it only touches TETHERED slots of a live owner.
            if r.state_gen
                .compare_exchange(sg, new, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                liveness.unlock(index);
                continue;
            }
            // SeqCst: the writer's Acquire load of the generation sees our
            // slot fields.
            ring.registry.generation.fetch_add(1, Ordering::SeqCst);
            return Some(ReaderRegistration {
                ring,
                liveness,
                index,
                expected: new,
            });
        }
        None
    }

    /// The reader slot index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Stores the cursor for the writer to see (once per poll).
    #[inline]
    pub fn store_cursor(&self, cursor: u64) {
        // SYNC POINT: Release: our reads of every slot below `cursor` are done
        // before the writer (Acquire in `compute_gate`) may overwrite them.
        self.ring.readers[self.index]
            .cursor
            .store(cursor.max(self.ring.first), Ordering::Release);
    }

    /// Whether the writer untethered us since the last call.
    #[inline]
    pub fn check(&mut self) -> Tether {
        let now = self.ring.readers[self.index]
            .state_gen
            .load(Ordering::Acquire);
        if now == self.expected {
            return Tether::Unchanged;
        }
        self.expected = now;
        Tether::Untethered
    }

    /// Whether the slot is currently tethered.
    pub fn is_tethered(&self) -> bool {
        unpack_state(self.expected).1 == STATE_TETHERED
    }
}

impl<L: Liveness> Drop for ReaderRegistration<'_, L> {
    fn drop(&mut self) {
        let r = &self.ring.readers[self.index];
        let (generation, _) = unpack_state(r.state_gen.load(Ordering::Acquire));
        r.state_gen.store(
            pack_state(generation.wrapping_add(1), STATE_FREE),
            Ordering::Release,
        );
        self.ring.registry.generation.fetch_add(1, Ordering::SeqCst);
        self.liveness.unlock(self.index);
    }
}

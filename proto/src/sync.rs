//! The one place the ring protocol takes its atomics from.
//!
//! Under `--cfg loom` these are loom's model-checked types, so the loom tests
//! in `tests/loom_ring.rs` run the very code the broker and shm-client run
//! (the shim pattern of tokio's `src/loom/mod.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// Hint that we are spinning; under loom, let another thread run instead.
#[inline(always)]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}

/// The ordering of the commit-marker store. Release always, except in the
/// deliberately broken build (`--cfg tickwire_mutant_relaxed_stamp`) that
/// proves the loom model notices a missing Release.
#[cfg(not(tickwire_mutant_relaxed_stamp))]
pub(crate) const STAMP_STORE: Ordering = Ordering::Release;
#[cfg(tickwire_mutant_relaxed_stamp)]
pub(crate) const STAMP_STORE: Ordering = Ordering::Relaxed;

//! The ring file: header blocks, reader slots and the slot array.
//!
//! ```text
//!  offset        size            block (each on its own 128-byte block: no false sharing)
//!  0             128             StaticBlock   written once before the file is renamed into place
//!  128           128             WriterBlock   epoch, published sequence, epoch start   (writer writes)
//!  256           128             WaiterBlock   futex word: wake epoch << 1 | waiter flag (readers flag, writer wakes)
//!  384           128             RegistryBlock generation, bumped when a reader joins, leaves or tethers
//!  512           64 x 128        ReaderSlot[64] one per reader: state+generation, cursor, tether budget,
//!                                              group fields (reserved for consumer groups)
//!  HEADER_SIZE   capacity x slot_size   slots, page-aligned; slot i holds every seq with seq & mask == i
//! ```
//!
//! Liveness: reader slot `i` is owned by whoever holds the OFD write lock on
//! byte `LIVENESS_LOCK_BASE + i` of the file; the kernel drops it when the
//! process dies. The writer holds `flock(LOCK_EX)` on the whole file.

use crate::shm::ShmSafe;
use crate::sync::{AtomicU32, AtomicU64};

/// `b"TKWRING\0"` as a little-endian u64.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"TKWRING\0");
/// Major layout version: a reader refuses any other.
pub const RING_MAJOR: u16 = 1;
/// Minor layout version: only adds fields in reserved space.
/// 1.1: the frame body's `source_id_hi` (a 32-bit source id).
pub const RING_MINOR: u16 = 1;
/// Written as a native u32; reads back as this value only on a machine of the
/// same byte order.
pub const ENDIAN_MARKER: u32 = 0x0102_0304;
/// Number of reader slots in a ring header.
pub const READER_SLOTS: usize = 64;
/// Bytes of the header; slots start here (page-aligned).
pub const HEADER_SIZE: usize = 12 * 1024;
/// Byte offset of the first liveness lock (locks may lie beyond the file's end).
pub const LIVENESS_LOCK_BASE: u64 = 1 << 40;
/// Smallest ring capacity in slots.
pub const MIN_CAPACITY: u64 = 4;
/// Largest ring capacity in slots (2^30 x 64 B = 64 GiB).
pub const MAX_CAPACITY: u64 = 1 << 30;

/// Whether a slot size is one this layout allows: a multiple of 64 in 64..=4096.
pub const fn valid_slot_size(size: u32) -> bool {
    size >= 64 && size.is_multiple_of(64) && size <= 4096
}

/// Reader slot state: nobody owns it.
pub const STATE_FREE: u32 = 0;
/// Reader slot state: a reader that the writer never waits for.
pub const STATE_UNTETHERED: u32 = 1;
/// Reader slot state: a reader the writer waits for, up to its tether budget.
pub const STATE_TETHERED: u32 = 2;

/// Packs a reader slot's generation and state into its `state_gen` word.
#[inline]
pub const fn pack_state(generation: u32, state: u32) -> u64 {
    (generation as u64) << 32 | state as u64
}

/// Splits a `state_gen` word into (generation, state).
#[inline]
pub const fn unpack_state(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// Fields written once, when the ring is created.
#[repr(C, align(128))]
#[derive(Debug, Clone, Copy, Default)]
pub struct StaticBlock {
    /// [`RING_MAGIC`].
    pub magic: u64,
    /// [`RING_MAJOR`] of the writer that created the file.
    pub major: u16,
    /// [`RING_MINOR`] of the writer that created the file.
    pub minor: u16,
    /// [`HEADER_SIZE`].
    pub header_size: u32,
    /// Bytes per slot (64 for ticks).
    pub slot_size: u32,
    /// [`ENDIAN_MARKER`].
    pub endian: u32,
    /// Slots in the ring, a power of two.
    pub capacity: u64,
    /// This ring's partition number.
    pub partition: u32,
    /// The topic's partition count when the ring was created.
    pub partitions: u32,
    /// FNV-1a hash of the topic name.
    pub topic_hash: u64,
    /// [`READER_SLOTS`].
    pub reader_slots: u32,
    /// Zero.
    pub reserved0: u32,
    /// Creation time, UTC ns.
    pub created_ns: u64,
    /// Zero: room for minor versions (and no padding bytes in the block).
    pub reserved: [u64; 8],
}

/// Fields only the writer stores.
#[repr(C, align(128))]
pub struct WriterBlock {
    /// Incremented by every writer that opens the ring (1 for the first).
    pub epoch: AtomicU64,
    /// Last committed sequence, published once per batch (Release).
    pub published: AtomicU64,
    /// First sequence written under the current epoch.
    pub epoch_start_seq: AtomicU64,
    /// Process id of the current writer (informational only).
    pub writer_pid: AtomicU64,
}

/// The futex word blocked readers wait on.
#[repr(C, align(128))]
pub struct WaiterBlock {
    /// `wake_epoch << 1 | waiter_flag`.
    pub word: AtomicU32,
}

/// Bumped whenever a reader joins, leaves or changes its tether.
#[repr(C, align(128))]
pub struct RegistryBlock {
    /// Generation counter.
    pub generation: AtomicU64,
}

/// One reader's slot in the header.
#[repr(C, align(128))]
pub struct ReaderSlot {
    /// `generation << 32 | state` (see [`pack_state`]).
    pub state_gen: AtomicU64,
    /// Next sequence this reader will read; stored once per poll (Release).
    pub cursor: AtomicU64,
    /// How long the writer may wait for this reader while tethered, ns.
    pub tether_budget_ns: AtomicU64,
    /// Process id of the owner (informational; liveness is the lock).
    pub pid: AtomicU64,
    /// Reserved for consumer groups: group id.
    pub group_id: AtomicU64,
    /// Reserved for consumer groups: member number.
    pub member: AtomicU32,
    /// Reserved for consumer groups: selector (key-hash range, etc.).
    pub selector: AtomicU32,
    /// Reserved for consumer groups: acknowledged cursor.
    pub acked_cursor: AtomicU64,
    /// How many times the writer untethered this reader.
    pub untethered_count: AtomicU64,
}

/// The header as a whole, exactly as it lies at offset 0 of a ring file.
#[repr(C)]
pub struct RingHeader {
    /// Written once.
    pub statics: StaticBlock,
    /// Writer fields.
    pub writer: WriterBlock,
    /// Futex word.
    pub waiter: WaiterBlock,
    /// Reader registry generation.
    pub registry: RegistryBlock,
    /// Reader slots.
    pub readers: [ReaderSlot; READER_SLOTS],
}

/// One 64-byte slot: the stamp, then the frame body.
#[repr(C, align(64))]
pub struct Slot {
    /// The commit marker (see [`crate::ring`]).
    pub stamp: AtomicU64,
    /// The body, as seven little-endian words.
    pub body: [AtomicU64; crate::frame::BODY_WORDS],
}

#[cfg(not(loom))]
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<StaticBlock>() == 128);
    assert!(size_of::<ReaderSlot>() == 128);
    assert!(offset_of!(RingHeader, writer) == 128);
    assert!(offset_of!(RingHeader, waiter) == 256);
    assert!(offset_of!(RingHeader, registry) == 384);
    assert!(offset_of!(RingHeader, readers) == 512);
    assert!(size_of::<RingHeader>() == 512 + READER_SLOTS * 128);
    assert!(size_of::<RingHeader>() <= HEADER_SIZE);
    assert!(HEADER_SIZE.is_multiple_of(4096));
    assert!(size_of::<Slot>() == crate::frame::SLOT_SIZE);
    assert!(align_of::<Slot>() == 64);
};

// SAFETY: `#[repr(C)]`, made only of integers and atomics of integers (which
// have the layout of the integer), no pointers, no padding that matters,
// every bit pattern valid.
unsafe impl ShmSafe for RingHeader {}
// SAFETY: as above: one atomic u64 stamp and seven atomic u64 words.
unsafe impl ShmSafe for Slot {}

/// FNV-1a, 64-bit: the topic hash recorded in ring headers.
pub fn topic_hash(topic: &str) -> u64 {
    fnv1a(FNV_OFFSET, topic.as_bytes())
}

/// FNV-1a's starting value.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, 64-bit, continued from `h` over `bytes` (start from
/// [`FNV_OFFSET`]), so several strings hash without joining them.
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

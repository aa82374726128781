//! The ring's two files: the data file (header and slots, written only by
//! the writer, mapped read-only by readers) and the reader-state file (the
//! futex word, the registry and the reader slots: the only memory a reader
//! writes). Layout 2.0.
//!
//! ```text
//!  <topic>.<partition>.ring      data file, mode 0640 by default (readers need read access only)
//!  offset   size                  block
//!  0        128                   StaticBlock   written once, before the file is renamed into place (2.1: first_seq at 64)
//!  128      128                   WriterBlock   epoch, published sequence, epoch start, writer pid, state
//!  256      HEADER_SIZE - 256     zero (room for minor versions)
//!  4096     capacity x slot_size  slots, page-aligned; slot i holds every seq with seq & (capacity-1) == i
//!
//!  <topic>.<partition>.readers   reader-state file, mode 0660 by default (readers need read and write)
//!  offset   size                  block
//!  0        128                   ReadersStatic magic, version, reader slot count, the data file's created_ns
//!  128      128                   WaiterBlock   futex word: wake epoch << 1 | waiter flag (readers flag, writer wakes)
//!  256      128                   RegistryBlock generation, bumped when a reader joins, leaves or tethers
//!  384      64 x 128              ReaderSlot[64] state+generation, cursor, tether budget, pid, group fields
//! ```
//!
//! Every block starts on its own 128-byte boundary (no false sharing between
//! the writer's and the readers' fields). All integers are little-endian:
//! tickwire runs on little-endian machines, and the endian marker makes an
//! opener of another byte order refuse the file instead of misreading it.
//!
//! ## Locks (all advisory, all dropped by the kernel when the holder dies)
//!
//! - Writer: an OFD write lock (`fcntl(F_OFD_SETLK)`) on byte 0 of the data
//!   file, held while the ring is open for writing. A reader asks
//!   `F_OFD_GETLK` to learn whether a writer is alive (it takes nothing).
//! - Reader slot `i`: an OFD write lock on byte [`LIVENESS_LOCK_BASE`]` + i`
//!   of the reader-state file (locks may lie beyond a file's end). The
//!   writer reclaims a slot whose lock it can take.
//!
//! ## Versions
//!
//! The major version changes when a reader of the old layout would misread
//! the new one; an opener refuses any major but its own and prints both
//! versions. A minor version only gives meaning to bytes that were zero.
//! 2.0 split the reader state out of the ring file (1.x had one file that
//! every reader mapped read-write) and added the writer's `state` word.
//!
//! ## Files
//!
//! `<topic>` is the topic name with every `/` replaced by `~` (topic names
//! never contain `~`), e.g. `market-data~normalized~equities.0.ring`. The
//! topic hash in the static block is FNV-1a 64 ([`topic_hash`]) of the
//! topic name's UTF-8 bytes.

use core::mem::size_of;

use crate::shm::ShmSafe;
use crate::sync::{AtomicU32, AtomicU64};

/// `b"TKWRING\0"` as a little-endian u64.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"TKWRING\0");
/// `b"TKWRDRS\0"` as a little-endian u64: the reader-state file's magic.
pub const READERS_MAGIC: u64 = u64::from_le_bytes(*b"TKWRDRS\0");
/// Major layout version: a reader refuses any other.
/// 2.0: reader state in its own file; the writer's `state` word.
pub const RING_MAJOR: u16 = 2;
/// Minor layout version: only gives meaning to bytes that were zero.
/// 2.1: the static block's `first_seq`.
pub const RING_MINOR: u16 = 1;
/// Written as a native u32 (bytes `04 03 02 01` on a little-endian
/// machine); reads back as this value only on a machine of the same byte
/// order.
pub const ENDIAN_MARKER: u32 = 0x0102_0304;
/// Number of reader slots in the reader-state file.
pub const READER_SLOTS: usize = 64;
/// Bytes of the data file's header; slots start here (page-aligned).
pub const HEADER_SIZE: usize = 4096;
/// Bytes of the reader-state file.
pub const READERS_FILE_SIZE: usize = core::mem::size_of::<ReadersHeader>();
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

/// Writer state: no writer has opened the ring yet.
pub const WRITER_NONE: u64 = 0;
/// Writer state: a writer has the ring open (or died with it open: a reader
/// tells the two apart with the writer lock).
pub const WRITER_OPEN: u64 = 1;
/// Writer state: the writer closed the ring gracefully; everything up to
/// `published` is the whole stream until a writer opens it again
/// (Aeron's end-of-stream position).
pub const WRITER_CLOSED: u64 = 2;

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
    /// The first sequence the ring was created for (2.1; 0 in 2.0 files,
    /// meaning 1). A ring created anew for a partition whose journal
    /// already holds sequences `..=n` starts at `n + 1`, so sequences and
    /// message ids continue (after a reboot emptied a tmpfs node
    /// directory); sequences below it were never in this ring.
    pub first_seq: u64,
    /// Zero: room for minor versions (and no padding bytes in the block).
    pub reserved: [u64; 7],
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
    /// Process id of the current writer (informational only: liveness is
    /// the writer lock).
    pub writer_pid: AtomicU64,
    /// [`WRITER_NONE`], [`WRITER_OPEN`] or [`WRITER_CLOSED`] (Release).
    pub state: AtomicU64,
}

/// Fields of the reader-state file written once, when it is created.
#[repr(C, align(128))]
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadersStatic {
    /// [`READERS_MAGIC`].
    pub magic: u64,
    /// [`RING_MAJOR`].
    pub major: u16,
    /// [`RING_MINOR`].
    pub minor: u16,
    /// [`READER_SLOTS`].
    pub reader_slots: u32,
    /// [`ENDIAN_MARKER`].
    pub endian: u32,
    /// Zero.
    pub reserved0: u32,
    /// The data file's `created_ns`: pairs the two files (a reader-state
    /// file left from another ring is refused).
    pub ring_created_ns: u64,
    /// Zero: room for minor versions (and no padding bytes in the block).
    pub reserved: [u64; 12],
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

/// The data file's header blocks, exactly as they lie at offset 0.
#[repr(C)]
pub struct RingHeader {
    /// Written once.
    pub statics: StaticBlock,
    /// Writer fields.
    pub writer: WriterBlock,
}

/// The reader-state file, exactly as it lies at offset 0.
#[repr(C)]
pub struct ReadersHeader {
    /// Written once.
    pub statics: ReadersStatic,
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
    assert!(size_of::<ReadersStatic>() == 128);
    assert!(size_of::<ReaderSlot>() == 128);
    assert!(offset_of!(StaticBlock, magic) == 0);
    assert!(offset_of!(StaticBlock, major) == 8);
    assert!(offset_of!(StaticBlock, minor) == 10);
    assert!(offset_of!(StaticBlock, header_size) == 12);
    assert!(offset_of!(StaticBlock, slot_size) == 16);
    assert!(offset_of!(StaticBlock, endian) == 20);
    assert!(offset_of!(StaticBlock, capacity) == 24);
    assert!(offset_of!(StaticBlock, partition) == 32);
    assert!(offset_of!(StaticBlock, partitions) == 36);
    assert!(offset_of!(StaticBlock, topic_hash) == 40);
    assert!(offset_of!(StaticBlock, reader_slots) == 48);
    assert!(offset_of!(StaticBlock, created_ns) == 56);
    assert!(offset_of!(StaticBlock, first_seq) == 64);
    assert!(offset_of!(RingHeader, writer) == 128);
    assert!(offset_of!(WriterBlock, epoch) == 0);
    assert!(offset_of!(WriterBlock, published) == 8);
    assert!(offset_of!(WriterBlock, epoch_start_seq) == 16);
    assert!(offset_of!(WriterBlock, writer_pid) == 24);
    assert!(offset_of!(WriterBlock, state) == 32);
    assert!(size_of::<RingHeader>() == 256);
    assert!(size_of::<RingHeader>() <= HEADER_SIZE);
    assert!(offset_of!(ReadersStatic, reader_slots) == 12);
    assert!(offset_of!(ReadersStatic, endian) == 16);
    assert!(offset_of!(ReadersStatic, ring_created_ns) == 24);
    assert!(offset_of!(ReadersHeader, waiter) == 128);
    assert!(offset_of!(ReadersHeader, registry) == 256);
    assert!(offset_of!(ReadersHeader, readers) == 384);
    assert!(offset_of!(ReaderSlot, state_gen) == 0);
    assert!(offset_of!(ReaderSlot, cursor) == 8);
    assert!(offset_of!(ReaderSlot, tether_budget_ns) == 16);
    assert!(offset_of!(ReaderSlot, pid) == 24);
    assert!(offset_of!(ReaderSlot, group_id) == 32);
    assert!(offset_of!(ReaderSlot, member) == 40);
    assert!(offset_of!(ReaderSlot, selector) == 44);
    assert!(offset_of!(ReaderSlot, acked_cursor) == 48);
    assert!(offset_of!(ReaderSlot, untethered_count) == 56);
    assert!(size_of::<ReadersHeader>() == 384 + READER_SLOTS * 128);
    assert!(HEADER_SIZE.is_multiple_of(4096));
    assert!(size_of::<Slot>() == crate::frame::SLOT_SIZE);
    assert!(align_of::<Slot>() == 64);
};

// SAFETY: `#[repr(C)]`, made only of integers and atomics of integers (which
// have the layout of the integer), no pointers, no padding that matters,
// every bit pattern valid.
unsafe impl ShmSafe for RingHeader {}
// SAFETY: as above.
unsafe impl ShmSafe for ReadersHeader {}
// SAFETY: as above: one atomic u64 stamp and seven atomic u64 words.
unsafe impl ShmSafe for Slot {}

/// A static header block: plain integers that fill it exactly, so it can be
/// written and read as bytes.
///
/// # Safety
/// `#[repr(C)]`, made only of integers, no padding bytes (const-asserted
/// size), every bit pattern valid.
pub unsafe trait StaticHeader: Copy + Default {
    /// The block's bytes, as written at the start of its file.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: the implementor is plain integers with no padding (the
        // trait's contract), so every byte is initialised.
        unsafe { core::slice::from_raw_parts(self as *const Self as *const u8, size_of::<Self>()) }
    }

    /// The block as bytes to read into (any bytes are a valid value).
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and every bit pattern is a valid value.
        unsafe { core::slice::from_raw_parts_mut(self as *mut Self as *mut u8, size_of::<Self>()) }
    }
}

// SAFETY: `#[repr(C)]` integers filling 128 bytes (const-asserted).
unsafe impl StaticHeader for StaticBlock {}
// SAFETY: as above.
unsafe impl StaticHeader for ReadersStatic {}

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

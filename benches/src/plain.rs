//! The physical floor: a plain shared-memory SPSC ring done well. Head and
//! tail on their own cache lines, each side caching the other's index and
//! publishing its own once per batch, the reader touching all 64 bytes.
//!
//! ```text
//!  0     head: AtomicU64 (writer)      own 128-byte block
//!  128   tail: AtomicU64 (reader)      own 128-byte block
//!  4096  slots: capacity x [u64; 8]
//! ```

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapRaw;

use crate::{Mode, Op, ReaderProc, Run, Tally, drive, payload, pin};

const SLOTS: usize = 4096;
/// Index publish interval when unpaced.
const BATCH: u64 = 64;

struct Ring {
    map: MmapRaw,
    mask: u64,
}

impl Ring {
    fn open(path: &Path, capacity: u64, create: bool) -> Result<Ring, String> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(create)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if create {
            f.set_len(SLOTS as u64 + capacity * 64)
                .map_err(|e| e.to_string())?;
        }
        let map = MmapRaw::map_raw(&f).map_err(|e| e.to_string())?;
        Ok(Ring {
            map,
            mask: capacity - 1,
        })
    }
    fn head(&self) -> &AtomicU64 {
        // SAFETY: offset 0 of a page-aligned mapping, accessed only atomically.
        unsafe { &*(self.map.as_ptr() as *const AtomicU64) }
    }
    fn tail(&self) -> &AtomicU64 {
        // SAFETY: offset 128, inside the first page, accessed only atomically.
        unsafe { &*(self.map.as_ptr().add(128) as *const AtomicU64) }
    }
    #[inline(always)]
    fn slot(&self, idx: u64) -> *mut [u64; 8] {
        // SAFETY: idx & mask < capacity; the mapping holds SLOTS + capacity * 64 bytes.
        unsafe {
            self.map
                .as_mut_ptr()
                .add(SLOTS + ((idx & self.mask) as usize) * 64) as *mut [u64; 8]
        }
    }
}

fn path() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    PathBuf::from(format!(
        "/dev/shm/tickwire-bench-plain-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Runs the writer with one reader process.
///
/// # Errors
/// Mapping or process failures.
pub fn run(mode: Mode, run: &Run) -> Result<Vec<serde_json::Value>, String> {
    let p = path();
    let ring = Ring::open(&p, run.capacity, true)?;
    let args = vec![
        "--system".into(),
        "plain_ring".into(),
        "--mode".into(),
        mode.name().into(),
        "--path".into(),
        p.display().to_string(),
        "--core".into(),
        run.reader_core.to_string(),
        "--capacity".into(),
        run.capacity.to_string(),
    ];
    let proc = ReaderProc::spawn(&args)?;
    pin(run.writer_core);
    let cap = run.capacity;
    let mut head = 0u64;
    let mut cached_tail = 0u64;
    let paced = mode != Mode::Max;
    drive(mode, run, |op| {
        let Op::Publish(i, ts) = op else {
            ring.head().store(head, Ordering::Release);
            return;
        };
        while head - cached_tail >= cap {
            // Acquire: pairs with the reader's Release tail store: it has
            // finished reading the slot we are about to overwrite.
            cached_tail = ring.tail().load(Ordering::Acquire);
            std::hint::spin_loop();
        }
        // SAFETY: the slot is not being read (head - tail < capacity).
        unsafe { ring.slot(head).write_volatile(payload(i, ts)) };
        head += 1;
        if head.is_multiple_of(BATCH) || paced {
            // Release: the slots below head are written.
            ring.head().store(head, Ordering::Release);
        }
    });
    let out = proc.result();
    let _ = std::fs::remove_file(&p);
    out.map(|v| vec![v])
}

/// The reader process.
///
/// # Errors
/// Mapping failures.
pub fn reader(
    mode: Mode,
    path: &Path,
    core: usize,
    capacity: u64,
) -> Result<serde_json::Value, String> {
    pin(core);
    let ring = Ring::open(path, capacity, false)?;
    let mut tally = Tally::new(mode == Mode::Paced);
    println!("READY");
    let mut tail = 0u64;
    let mut cached_head = 0u64;
    loop {
        if tail == cached_head {
            // Acquire: pairs with the writer's Release head store.
            cached_head = ring.head().load(Ordering::Acquire);
            if tail == cached_head {
                std::hint::spin_loop();
                continue;
            }
        }
        // SAFETY: tail < head: the slot is written and not yet reusable.
        let w = unsafe { ring.slot(tail).read_volatile() };
        tail += 1;
        if tail.is_multiple_of(BATCH) {
            ring.tail().store(tail, Ordering::Release);
        }
        if !tally.take(&w) {
            break;
        }
    }
    Ok(tally.to_json())
}

//! The symbology table: instrument id -> (symbol, exchange, currency, size scale).
//!
//! ```text
//!  offset   size          block (SymbologyHeader; all integers little-endian)
//!  0        8             magic        b"TKWSYMB\0"
//!  8        2             major        1: a reader refuses any other major
//!  10       2             minor        1 (1.1 added endian and writer_pid; 1.0 files have 0 there)
//!  12       4             entry_size   64
//!  16       4             capacity     entries the file holds, 1..=2^24
//!  20       4             endian       0x01020304 written natively (1.1; 0 in 1.0 files)
//!  24       8             writer_pid   pid of the broker holding the writer lock (informational)
//!  32       32            reserved     zero
//!  64       4             count        AtomicU32: entries committed (stored with Release)
//!  68       4028          zero
//!  4096     capacity x 64 entries; id N lives at entry N - 1 (id 0 = unknown)
//!
//!  entry (64 bytes)
//!   0  symbol         [u8; 32]  UTF-8, NUL-padded
//!  32  exchange       [u8; 16]  UTF-8, NUL-padded (MIC or venue name)
//!  48  currency       [u8; 8]   UTF-8, NUL-padded (ISO 4217 or a crypto code)
//!  56  size_decimals  u8        real size = raw size / 10^size_decimals
//!  57  reserved       [u8; 7]
//! ```
//!
//! One writer (the broker's router) appends entries to the preallocated file
//! and then stores the count with Release; readers load the count with
//! Acquire and only read entries below it, so they resolve ids without the
//! broker and never remap. Entries are never changed or removed, so ids stay
//! valid across broker restarts. Ids are local to a node.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::shm::{Region, ShmSafe};

/// `b"TKWSYMB\0"`.
pub const SYMBOLOGY_MAGIC: u64 = u64::from_le_bytes(*b"TKWSYMB\0");
/// Major layout version.
pub const SYMBOLOGY_MAJOR: u16 = 1;
/// Minor layout version. 1.1: `endian` and `writer_pid`.
pub const SYMBOLOGY_MINOR: u16 = 1;
/// Bytes before the first entry.
pub const SYMBOLOGY_HEADER: usize = 4096;
/// Bytes per entry.
pub const ENTRY_SIZE: usize = 64;
/// The file name inside a node directory.
pub const SYMBOLOGY_FILE: &str = "symbology";
/// Default number of entries.
pub const DEFAULT_SYMBOLOGY_CAPACITY: u32 = 65_536;

/// Maximum byte lengths of the text fields.
pub const MAX_SYMBOL: usize = 32;
/// Maximum exchange length.
pub const MAX_EXCHANGE: usize = 16;
/// Maximum currency length.
pub const MAX_CURRENCY: usize = 8;

/// The file's header, exactly as it lies at offset 0.
#[repr(C, align(64))]
pub struct SymbologyHeader {
    /// [`SYMBOLOGY_MAGIC`].
    pub magic: u64,
    /// [`SYMBOLOGY_MAJOR`].
    pub major: u16,
    /// [`SYMBOLOGY_MINOR`] of the writer that created the file.
    pub minor: u16,
    /// [`ENTRY_SIZE`].
    pub entry_size: u32,
    /// Entries the file holds.
    pub capacity: u32,
    /// [`crate::layout::ENDIAN_MARKER`] (1.1; 0 in 1.0 files).
    pub endian: u32,
    /// The writer's pid (1.1).
    pub writer_pid: std::sync::atomic::AtomicU64,
    /// Zero.
    pub reserved: [u64; 4],
    /// Entries committed, on its own cache line.
    pub count: CountBlock,
}

/// The committed-entry count.
#[repr(C, align(64))]
pub struct CountBlock {
    /// Stored with Release after the entries it covers.
    pub count: AtomicU32,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(offset_of!(SymbologyHeader, magic) == 0);
    assert!(offset_of!(SymbologyHeader, major) == 8);
    assert!(offset_of!(SymbologyHeader, minor) == 10);
    assert!(offset_of!(SymbologyHeader, entry_size) == 12);
    assert!(offset_of!(SymbologyHeader, capacity) == 16);
    assert!(offset_of!(SymbologyHeader, endian) == 20);
    assert!(offset_of!(SymbologyHeader, writer_pid) == 24);
    assert!(offset_of!(SymbologyHeader, count) == 64);
    assert!(size_of::<SymbologyHeader>() == 128);
    assert!(size_of::<SymbologyHeader>() <= SYMBOLOGY_HEADER);
};

// SAFETY: `#[repr(C)]` integers and atomics of integers, no pointers, every
// bit pattern valid.
unsafe impl ShmSafe for SymbologyHeader {}

/// One entry as stored.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Entry {
    symbol: [u8; MAX_SYMBOL],
    exchange: [u8; MAX_EXCHANGE],
    currency: [u8; MAX_CURRENCY],
    size_decimals: u8,
    reserved: [u8; 7],
}

const _: () = assert!(std::mem::size_of::<Entry>() == ENTRY_SIZE);
// SAFETY: `#[repr(C)]` byte arrays only: no pointers, any bit pattern valid.
unsafe impl ShmSafe for Entry {}

fn text(b: &[u8]) -> &str {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end]).unwrap_or("?")
}

impl Entry {
    /// The symbol.
    pub fn symbol(&self) -> &str {
        text(&self.symbol)
    }
    /// The exchange.
    pub fn exchange(&self) -> &str {
        text(&self.exchange)
    }
    /// The currency.
    pub fn currency(&self) -> &str {
        text(&self.currency)
    }
    /// Decimal places of raw sizes.
    pub fn size_decimals(&self) -> u8 {
        self.size_decimals
    }
    /// A raw size in real units.
    pub fn real_size(&self, raw: u32) -> f64 {
        raw as f64 / 10f64.powi(self.size_decimals as i32)
    }
}

/// An instrument as sources name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Instrument {
    /// Ticker, e.g. `AAPL`.
    pub symbol: String,
    /// Venue, e.g. `NASDAQ`.
    pub exchange: String,
    /// Currency, e.g. `USD`.
    pub currency: String,
    /// Decimal places of sizes (0 for shares, 8 for BTC in satoshi).
    pub size_decimals: u8,
}

impl Instrument {
    /// Checks lengths and characters.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the field.
    pub fn validate(&self) -> Result<()> {
        fn field(what: &'static str, v: &str, max: usize) -> Result<()> {
            if v.is_empty() || v.len() > max {
                return Err(Error::Invalid {
                    what,
                    why: format!("{} must be 1 to {max} bytes", quoted(v)),
                });
            }
            if v.bytes().any(|b| b == 0 || b.is_ascii_control()) {
                return Err(Error::Invalid {
                    what,
                    why: format!("{} contains control characters", quoted(v)),
                });
            }
            Ok(())
        }
        field("symbol", &self.symbol, MAX_SYMBOL)?;
        field("exchange", &self.exchange, MAX_EXCHANGE)?;
        field("currency", &self.currency, MAX_CURRENCY)?;
        if self.size_decimals > 9 {
            return Err(Error::Invalid {
                what: "size_decimals",
                why: format!("{} is above 9", self.size_decimals),
            });
        }
        Ok(())
    }

    fn key(&self) -> (String, String, String) {
        (
            self.symbol.clone(),
            self.exchange.clone(),
            self.currency.clone(),
        )
    }
}

struct Mapped {
    path: PathBuf,
    file: std::fs::File,
    map: MmapRaw,
    capacity: u32,
}

impl Mapped {
    fn header(&self) -> &SymbologyHeader {
        match Region::of(&self.map).get::<SymbologyHeader>(0) {
            Some(h) => h,
            None => unreachable!("symbology mapping smaller than its header"),
        }
    }

    fn count_atomic(&self) -> &AtomicU32 {
        &self.header().count.count
    }

    /// A committed entry (callers pass `index < count`): a reference to
    /// that entry only, never to ones the writer may still be filling.
    fn entry(&self, index: u32) -> Option<&Entry> {
        if index >= self.capacity {
            return None;
        }
        Region::of(&self.map).get::<Entry>(SYMBOLOGY_HEADER + index as usize * ENTRY_SIZE)
    }

    /// Where the writer stores entry `index` (`index < capacity`).
    fn entry_ptr(&self, index: u32) -> *mut Entry {
        debug_assert!(index < self.capacity);
        // SAFETY: index < capacity and the mapping holds SYMBOLOGY_HEADER +
        // capacity * ENTRY_SIZE bytes (validated), so the offset is in bounds.
        unsafe {
            self.map
                .as_mut_ptr()
                .add(SYMBOLOGY_HEADER + index as usize * ENTRY_SIZE) as *mut Entry
        }
    }
}

fn open_and_validate(path: &Path, write: bool) -> Result<Mapped> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    let len = crate::file::len_at_least(&file, path, SYMBOLOGY_HEADER as u64)?;
    let mut head = [0u8; 24];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0)
        .map_err(|e| Error::io("read header", path, e))?;
    let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap_or([0; 4]));
    let u16_at = |o: usize| u16::from_le_bytes(head[o..o + 2].try_into().unwrap_or([0; 2]));
    let magic = u64_at(0);
    if magic != SYMBOLOGY_MAGIC {
        return Err(Error::BadMagic {
            path: path.to_path_buf(),
            what: "symbology",
            found: magic,
            expected: SYMBOLOGY_MAGIC,
        });
    }
    let (major, minor) = (u16_at(8), u16_at(10));
    if major != SYMBOLOGY_MAJOR {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
            found_major: major,
            found_minor: minor,
            known_major: SYMBOLOGY_MAJOR,
            known_minor: SYMBOLOGY_MINOR,
        });
    }
    let bad = |field, value: u64, expected: String| Error::bad_header(path, field, value, expected);
    let endian = u32_at(20);
    if minor >= 1 && endian != crate::layout::ENDIAN_MARKER {
        return bad(
            "endian",
            endian as u64,
            format!(
                "{:#x}: the file was written on a machine of another byte order",
                crate::layout::ENDIAN_MARKER
            ),
        );
    }
    let entry_size = u32_at(12);
    if entry_size as usize != ENTRY_SIZE {
        return bad("entry_size", entry_size as u64, format!("{ENTRY_SIZE}"));
    }
    let capacity = u32_at(16);
    if capacity == 0 || capacity > 1 << 24 {
        return bad("capacity", capacity as u64, "1..=16777216".into());
    }
    let need = SYMBOLOGY_HEADER as u64 + capacity as u64 * ENTRY_SIZE as u64;
    if len < need {
        return Err(Error::Short {
            path: path.to_path_buf(),
            len,
            need,
        });
    }
    let map = if write {
        MmapOptions::new().len(need as usize).map_raw(&file)
    } else {
        MmapOptions::new()
            .len(need as usize)
            .map_raw_read_only(&file)
    }
    .map_err(|e| Error::io("map", path, e))?;
    Ok(Mapped {
        path: path.to_path_buf(),
        file,
        map,
        capacity,
    })
}

/// Read-only view of a node's symbology table.
pub struct Symbology {
    m: Mapped,
    /// Ids by symbol, built on the first [`Symbology::ids_of`] and
    /// extended as entries are added (they never change once written).
    by_symbol: std::sync::RwLock<SymbolIndex>,
}

#[derive(Default)]
struct SymbolIndex {
    /// Entries `1..=indexed` are in `ids`.
    indexed: u32,
    ids: std::collections::HashMap<Box<str>, Vec<u32>>,
}

// SAFETY: read-only shared mapping, count read atomically.
unsafe impl Send for Symbology {}
// SAFETY: as above.
unsafe impl Sync for Symbology {}

impl Symbology {
    /// Opens `<dir>/symbology`.
    ///
    /// # Errors
    /// A clear error for a missing, short or foreign file.
    pub fn open(dir: &Path) -> Result<Symbology> {
        Ok(Symbology {
            m: open_and_validate(&dir.join(SYMBOLOGY_FILE), false)?,
            by_symbol: std::sync::RwLock::default(),
        })
    }

    /// The ids of every instrument named `symbol` (one per venue and
    /// currency), in id order, without reading the other entries: a
    /// lookup by symbol (REST latest, history) costs the same with ten
    /// instruments or a million. Entries added since the last call are
    /// indexed first.
    pub fn ids_of(&self, symbol: &str) -> Vec<u32> {
        let count = self.count();
        {
            let index = self.by_symbol.read().unwrap_or_else(|p| p.into_inner());
            if index.indexed >= count {
                return index.ids.get(symbol).cloned().unwrap_or_default();
            }
        }
        let mut index = self.by_symbol.write().unwrap_or_else(|p| p.into_inner());
        for id in index.indexed + 1..=count {
            if let Some(e) = self.get(id) {
                index.ids.entry(e.symbol().into()).or_default().push(id);
            }
        }
        index.indexed = index.indexed.max(count);
        index.ids.get(symbol).cloned().unwrap_or_default()
    }

    /// Number of committed entries (ids `1..=count`), never above capacity
    /// whatever the file says.
    #[inline]
    pub fn count(&self) -> u32 {
        // Acquire: pairs with the writer's Release store after it filled
        // the entries.
        self.m
            .count_atomic()
            .load(Ordering::Acquire)
            .min(self.m.capacity)
    }

    /// Capacity in entries.
    pub fn capacity(&self) -> u32 {
        self.m.capacity
    }

    /// Resolves an id; `None` for 0, or an id not (yet) committed.
    #[inline]
    pub fn get(&self, id: u32) -> Option<&Entry> {
        if id == 0 || id > self.count() {
            return None;
        }
        // id - 1 < count <= capacity; the entry was fully written before the
        // count that covers it (Acquire above), and is never written again.
        self.m.entry(id - 1)
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.m.path
    }
}

/// The single writer of a node's symbology table.
pub struct SymbologyWriter {
    m: Mapped,
    ids: HashMap<(String, String, String), u32>,
    count: u32,
    kept: Option<KeptCopy>,
}

/// A copy of the table on disk (see [`SymbologyWriter::open_kept`]),
/// written with `pwrite` (a full disk is an error, never a SIGBUS).
struct KeptCopy {
    path: PathBuf,
    file: std::fs::File,
    /// Entries the copy holds.
    copied: u32,
    /// Whether the last write failed.
    failing: bool,
    /// The failure that started the current failing run, until
    /// [`SymbologyWriter::copy_failure`] takes it.
    report: Option<String>,
}

impl KeptCopy {
    /// Appends entries `copied..table.count` of `table`, then stores the
    /// count: an entry is in the copy before the count covers it.
    fn catch_up(&mut self, table: &Mapped, count: u32) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.copied >= count {
            // Nothing new: the copy is left untouched.
            return Ok(());
        }
        for i in self.copied..count {
            let Some(e) = table.entry(i) else {
                break;
            };
            // SAFETY: `Entry` is `repr(C)` bytes only (ShmSafe), 64 bytes.
            let bytes: &[u8; ENTRY_SIZE] =
                unsafe { &*(e as *const Entry as *const [u8; ENTRY_SIZE]) };
            self.file
                .write_all_at(bytes, (SYMBOLOGY_HEADER + i as usize * ENTRY_SIZE) as u64)?;
        }
        self.file.write_all_at(
            &count.to_ne_bytes(),
            std::mem::offset_of!(SymbologyHeader, count) as u64,
        )?;
        self.copied = count;
        Ok(())
    }
}

// SAFETY: owned by one thread at a time (callers wrap it in a Mutex).
unsafe impl Send for SymbologyWriter {}

impl SymbologyWriter {
    /// Creates `<dir>/symbology` with `capacity` entries, or re-opens it
    /// keeping every id, and takes the writer lock.
    ///
    /// # Errors
    /// [`Error::WriterLocked`] if another broker holds it; validation errors.
    pub fn open(dir: &Path, capacity: u32) -> Result<SymbologyWriter> {
        SymbologyWriter::open_with(dir, capacity, crate::file::FileModes::default())
    }

    /// [`open`](Self::open), creating the file with these modes and group.
    ///
    /// # Errors
    /// As [`open`](Self::open); [`Error::NoSpace`] when it cannot be allocated.
    pub fn open_with(
        dir: &Path,
        capacity: u32,
        modes: crate::file::FileModes,
    ) -> Result<SymbologyWriter> {
        SymbologyWriter::open_kept(dir, capacity, modes, None)
    }

    /// [`open_with`](Self::open_with), keeping a copy of the table in
    /// `<keep>/symbology`, on disk, when `keep` is given: the node
    /// directory is usually a tmpfs, emptied at every boot, while the
    /// journal and bars on disk name instruments by id. A table created
    /// anew (after a reboot) first takes every entry of the copy, so ids
    /// never change meaning; a table with entries the copy lacks gives them
    /// to it; each new instrument reaches the copy before its id is
    /// returned (a write the disk refuses is logged and retried with the
    /// next new instrument).
    ///
    /// # Errors
    /// As [`open_with`](Self::open_with); the copy's validation errors; a
    /// [`Error::BadRecord`] naming both files when they give an id to two
    /// different instruments (the node directory holds another node's
    /// table); [`Error::SymbologyFull`] when the copy holds more than
    /// `capacity`.
    pub fn open_kept(
        dir: &Path,
        capacity: u32,
        modes: crate::file::FileModes,
        keep: Option<&Path>,
    ) -> Result<SymbologyWriter> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        let path = dir.join(SYMBOLOGY_FILE);
        if !path.exists() {
            create_table(&path, capacity, modes)?;
        }
        let m = open_and_validate(&path, true)?;
        crate::file::lock_exclusive(&m.file, &path, || {
            m.header()
                .writer_pid
                .load(std::sync::atomic::Ordering::Relaxed)
        })?;
        m.header()
            .writer_pid
            .store(std::process::id() as u64, Ordering::Relaxed);
        let count = m.count_atomic().load(Ordering::Acquire);
        if count > m.capacity {
            return Err(Error::BadHeader {
                path,
                field: "count",
                value: count as u64,
                expected: format!("at most the capacity {}", m.capacity),
            });
        }
        let mut ids = HashMap::with_capacity(count as usize);
        for i in 0..count {
            let Some(e) = m.entry(i) else {
                break;
            };
            ids.insert(
                (
                    e.symbol().to_string(),
                    e.exchange().to_string(),
                    e.currency().to_string(),
                ),
                i + 1,
            );
        }
        let mut w = SymbologyWriter {
            m,
            ids,
            count,
            kept: None,
        };
        if let Some(keep) = keep {
            w.keep(&keep.join(SYMBOLOGY_FILE), modes)?;
        }
        Ok(w)
    }

    /// Reconciles the table with its copy at `path` (created if missing)
    /// and keeps the copy up to date from now on.
    fn keep(&mut self, path: &Path, modes: crate::file::FileModes) -> Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("create directory", parent, e))?;
        }
        if !path.exists() {
            create_table(path, self.m.capacity, modes)?;
        }
        let copy = open_and_validate(path, false)?;
        let copied = copy
            .count_atomic()
            .load(Ordering::Acquire)
            .min(copy.capacity);
        for i in 0..copied.min(self.count) {
            let (Some(a), Some(b)) = (self.m.entry(i), copy.entry(i)) else {
                break;
            };
            if (a.symbol(), a.exchange(), a.currency(), a.size_decimals())
                != (b.symbol(), b.exchange(), b.currency(), b.size_decimals())
            {
                return Err(Error::BadRecord {
                    path: self.m.path.clone(),
                    what: format!(
                        "id {} is {} {} {} here but {} {} {} in the node's copy {}: the two tables are not the same node's; refusing to give ids two meanings (move the wrong one away)",
                        i + 1,
                        a.symbol(),
                        a.exchange(),
                        a.currency(),
                        b.symbol(),
                        b.exchange(),
                        b.currency(),
                        path.display()
                    ),
                });
            }
        }
        // A table created anew (the node directory was emptied): the copy's
        // ids come back, in order, before any new one (`kept` is not set
        // yet, so nothing is written back to the copy).
        for i in self.count..copied {
            let Some(e) = copy.entry(i) else {
                break;
            };
            let inst = Instrument {
                symbol: e.symbol().into(),
                exchange: e.exchange().into(),
                currency: e.currency().into(),
                size_decimals: e.size_decimals(),
            };
            let id = self.resolve(&inst)?;
            if id != i + 1 {
                return Err(Error::BadRecord {
                    path: path.to_path_buf(),
                    what: format!(
                        "entry {} repeats {} {} {} (id {id}): not a table this broker wrote",
                        i + 1,
                        inst.symbol,
                        inst.exchange,
                        inst.currency
                    ),
                });
            }
        }
        drop(copy);
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        let need = SYMBOLOGY_HEADER as u64 + self.m.capacity as u64 * ENTRY_SIZE as u64;
        if len < need {
            // The capacity was raised: the copy grows with the table.
            use std::os::unix::fs::FileExt;
            file.set_len(need).map_err(|e| Error::io("grow", path, e))?;
            file.write_all_at(
                &self.m.capacity.to_le_bytes(),
                std::mem::offset_of!(SymbologyHeader, capacity) as u64,
            )
            .map_err(|e| Error::io("write header", path, e))?;
        }
        let mut kept = KeptCopy {
            path: path.to_path_buf(),
            file,
            copied: copied.min(self.count),
            failing: false,
            report: None,
        };
        kept.catch_up(&self.m, self.count)
            .map_err(|e| Error::io("write", path, e))?;
        self.kept = Some(kept);
        Ok(())
    }

    /// The id of an instrument, adding it if new.
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names, [`Error::SymbologyFull`].
    pub fn resolve(&mut self, inst: &Instrument) -> Result<u32> {
        if let Some(&id) = self.ids.get(&inst.key()) {
            return Ok(id);
        }
        inst.validate()?;
        if self.count >= self.m.capacity {
            return Err(Error::SymbologyFull {
                path: self.m.path.clone(),
                capacity: self.m.capacity,
            });
        }
        let mut e = Entry {
            symbol: [0; MAX_SYMBOL],
            exchange: [0; MAX_EXCHANGE],
            currency: [0; MAX_CURRENCY],
            size_decimals: inst.size_decimals,
            reserved: [0; 7],
        };
        e.symbol[..inst.symbol.len()].copy_from_slice(inst.symbol.as_bytes());
        e.exchange[..inst.exchange.len()].copy_from_slice(inst.exchange.as_bytes());
        e.currency[..inst.currency.len()].copy_from_slice(inst.currency.as_bytes());
        // SAFETY: count < capacity; no reader reads entry `count` until the
        // count below covers it.
        unsafe { self.m.entry_ptr(self.count).write(e) };
        self.count += 1;
        // SYNC POINT: Release publishes the entry; pairs with
        // `Symbology::count`'s Acquire.
        self.m.count_atomic().store(self.count, Ordering::Release);
        self.ids.insert(inst.key(), self.count);
        if let Some(k) = &mut self.kept {
            match k.catch_up(&self.m, self.count) {
                Ok(()) => k.failing = false,
                Err(e) => {
                    if !k.failing {
                        k.failing = true;
                        k.report = Some(format!(
                            "{}: the copy of the symbology could not be written ({e}); retried with the next new instrument, and until then a reboot would forget ids from {} on",
                            k.path.display(),
                            self.count
                        ));
                    }
                }
            }
        }
        Ok(self.count)
    }

    /// The failure to write the copy on disk (see
    /// [`open_kept`](Self::open_kept)), once per run of failed writes, for
    /// the caller to log.
    pub fn copy_failure(&mut self) -> Option<String> {
        self.kept.as_mut()?.report.take()
    }

    /// Number of entries.
    pub fn count(&self) -> u32 {
        self.count
    }
}

/// Creates an empty table of `capacity` entries at `path`.
fn create_table(path: &Path, capacity: u32, modes: crate::file::FileModes) -> Result<()> {
    let mut head = Vec::with_capacity(24);
    head.extend_from_slice(&SYMBOLOGY_MAGIC.to_le_bytes());
    head.extend_from_slice(&SYMBOLOGY_MAJOR.to_le_bytes());
    head.extend_from_slice(&SYMBOLOGY_MINOR.to_le_bytes());
    head.extend_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
    head.extend_from_slice(&capacity.to_le_bytes());
    head.extend_from_slice(&crate::layout::ENDIAN_MARKER.to_le_bytes());
    crate::file::create_file(
        path,
        SYMBOLOGY_HEADER as u64 + capacity as u64 * ENTRY_SIZE as u64,
        &head,
        modes.data,
        modes.group,
        false,
    )?;
    Ok(())
}

/// `v` quoted for an error message, cut after 64 characters (with its
/// length): a client that sent a megabyte gets its mistake named, not
/// echoed back.
pub fn quoted(v: &str) -> String {
    const SHOWN: usize = 64;
    match v.char_indices().nth(SHOWN) {
        None => format!("{v:?}"),
        Some((end, _)) => format!("{:?}... ({} bytes)", &v[..end], v.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_value_is_named_by_its_start_and_length_not_echoed() {
        assert_eq!(quoted("AAPL"), "\"AAPL\"");
        let long = "é".repeat(5000);
        let q = quoted(&long);
        assert_eq!(q, format!("{:?}... (10000 bytes)", "é".repeat(64)));
    }

    fn inst(s: &str) -> Instrument {
        Instrument {
            symbol: s.into(),
            exchange: "NASDAQ".into(),
            currency: "USD".into(),
            size_decimals: 0,
        }
    }

    #[test]
    fn ids_are_stable_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = SymbologyWriter::open(dir.path(), 16).expect("open");
        assert_eq!(w.resolve(&inst("AAPL")).expect("a"), 1);
        assert_eq!(w.resolve(&inst("MSFT")).expect("m"), 2);
        assert_eq!(w.resolve(&inst("AAPL")).expect("a"), 1);
        assert!(matches!(
            SymbologyWriter::open(dir.path(), 16),
            Err(Error::WriterLocked { .. })
        ));
        drop(w);
        let mut w = SymbologyWriter::open(dir.path(), 16).expect("reopen");
        assert_eq!(w.resolve(&inst("MSFT")).expect("m"), 2);
        assert_eq!(w.resolve(&inst("NVDA")).expect("n"), 3);
        let r = Symbology::open(dir.path()).expect("reader");
        assert_eq!(r.count(), 3);
        assert_eq!(r.get(3).map(|e| e.symbol()), Some("NVDA"));
        assert!(r.get(0).is_none());
        assert!(r.get(4).is_none());
    }

    #[test]
    fn ids_survive_the_node_directory_being_emptied_through_the_copy_on_disk() {
        let (node, disk) = (
            tempfile::tempdir().expect("node"),
            tempfile::tempdir().expect("disk"),
        );
        let modes = crate::file::FileModes::default();
        let open =
            |capacity| SymbologyWriter::open_kept(node.path(), capacity, modes, Some(disk.path()));
        let mut w = open(16).expect("open");
        for (s, id) in [("MSFT", 1), ("AAPL", 2), ("NVDA", 3)] {
            assert_eq!(w.resolve(&inst(s)).expect("resolve"), id);
        }
        drop(w);
        // A reboot empties the tmpfs node directory.
        std::fs::remove_file(node.path().join(SYMBOLOGY_FILE)).expect("rm");
        let mut w = open(32).expect("reopen");
        // Asked in another order, each instrument keeps its id.
        assert_eq!(w.resolve(&inst("NVDA")).expect("n"), 3);
        assert_eq!(w.resolve(&inst("MSFT")).expect("m"), 1);
        assert_eq!(w.resolve(&inst("TSLA")).expect("t"), 4);
        let r = Symbology::open(node.path()).expect("reader");
        assert_eq!(r.get(2).map(|e| e.symbol()), Some("AAPL"));
        // The copy follows, new ids included, and reads as a table itself.
        let copy = Symbology::open(disk.path()).expect("copy");
        assert_eq!(copy.count(), 4);
        assert_eq!(copy.get(4).map(|e| e.symbol()), Some("TSLA"));
        drop(w);
        // A table with entries the copy lacks gives them to it.
        std::fs::remove_file(disk.path().join(SYMBOLOGY_FILE)).expect("rm copy");
        let w = open(32).expect("reopen without a copy");
        drop(w);
        assert_eq!(Symbology::open(disk.path()).expect("copy").count(), 4);
    }

    #[test]
    fn a_copy_that_gives_an_id_another_meaning_is_refused_naming_both() {
        let (node, disk) = (
            tempfile::tempdir().expect("node"),
            tempfile::tempdir().expect("disk"),
        );
        let modes = crate::file::FileModes::default();
        let mut other = SymbologyWriter::open(disk.path(), 16).expect("other node");
        other.resolve(&inst("IBM")).expect("ibm");
        drop(other);
        let mut w = SymbologyWriter::open(node.path(), 16).expect("open");
        w.resolve(&inst("AAPL")).expect("aapl");
        drop(w);
        let err = SymbologyWriter::open_kept(node.path(), 16, modes, Some(disk.path()))
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("id 1 is AAPL NASDAQ USD here but IBM NASDAQ USD"),
            "{err}"
        );
        assert!(err.contains(&disk.path().display().to_string()), "{err}");
    }

    #[test]
    fn ids_of_a_symbol_are_its_venues_and_grow_with_the_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = SymbologyWriter::open(dir.path(), 16).expect("open");
        let on = |symbol: &str, exchange: &str| Instrument {
            exchange: exchange.into(),
            ..inst(symbol)
        };
        assert_eq!(w.resolve(&on("AAPL", "NASDAQ")).expect("a"), 1);
        assert_eq!(w.resolve(&on("MSFT", "NASDAQ")).expect("m"), 2);
        assert_eq!(w.resolve(&on("AAPL", "IEX")).expect("a"), 3);
        let r = Symbology::open(dir.path()).expect("reader");
        assert_eq!(r.ids_of("AAPL"), vec![1, 3]);
        assert_eq!(r.ids_of("MSFT"), vec![2]);
        assert!(r.ids_of("NVDA").is_empty());
        assert!(r.ids_of("").is_empty());
        // Added after the index was built: found on the next call.
        assert_eq!(w.resolve(&on("NVDA", "NASDAQ")).expect("n"), 4);
        assert_eq!(w.resolve(&on("AAPL", "ARCA")).expect("a"), 5);
        assert_eq!(r.ids_of("NVDA"), vec![4]);
        assert_eq!(r.ids_of("AAPL"), vec![1, 3, 5]);
    }

    #[test]
    fn full_and_invalid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = SymbologyWriter::open(dir.path(), 2).expect("open");
        w.resolve(&inst("A")).expect("a");
        w.resolve(&inst("B")).expect("b");
        assert!(matches!(
            w.resolve(&inst("C")),
            Err(Error::SymbologyFull { .. })
        ));
        assert!(matches!(
            w.resolve(&inst(&"X".repeat(33))),
            Err(Error::Invalid { what: "symbol", .. })
        ));
    }
}

//! One-minute OHLCV bars: how the broker builds them from a partition's
//! events ([`BarBuilder`]) and the bar store's on-disk format ([`BarFile`]).
//!
//! The broker's bar builder reads each partition's journal in sequence
//! order, folds every trade (and, for minutes without trades, every quote's
//! mid price) into the bar of its instrument and event-time minute, and
//! closes a minute once the partition's event time has passed the minute's
//! end by the lateness allowance. Closed bars are appended to one file per
//! instrument and topic; an event for a minute already closed is counted as
//! late and left out, so a rebuild from the same journal gives the same
//! bars byte for byte.
//!
//! ```text
//!  <journal root>/bars/<topic with / as ~>/<instrument id>.<partition>.bars
//!
//!  header (64 bytes, little-endian)
//!   0  magic          b"TKWBARS\0"
//!   8  major          u16  1: a reader refuses any other
//!  10  minor          u16  0
//!  12  record_size    u32  96
//!  16  instrument_id  u32  the node's symbology id
//!  20  interval_secs  u32  60
//!  24  reserved       40 bytes of zero
//!
//!  record (96 bytes, in start order, one per minute that had events)
//!   0  start_ns       u64  the minute's start, UTC ns
//!   8  open           i64  fixed point, 1e-9 (crate::frame::PRICE_SCALE)
//!  16  high           i64
//!  24  low            i64
//!  32  close          i64
//!  40  volume         u64  raw size units (real = raw / 10^size_decimals); 0 for a mid bar
//!  48  notional       i128 sum of price x raw size (VWAP = notional / volume)
//!  64  first_ns       u64  event time of the first event folded in
//!  72  last_ns        u64  event time of the last
//!  80  count          u32  trades (quotes for a mid bar)
//!  84  flags          u32  bit 0: mid bar (built from quote mid prices: the minute had no trades)
//!  88  crc            u32  CRC-32C of bytes 0..88
//!  92  reserved       u32
//! ```
//!
//! A record that fails its CRC is reported as corrupt, naming the file and
//! the record; a partial record at the end (a crash mid-append) is ignored
//! by readers and cut by the writer.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::frame::{ArchivedFrameBody, Kind, UNDEF_PRICE};

/// `b"TKWBARS\0"`.
pub const BARS_MAGIC: u64 = u64::from_le_bytes(*b"TKWBARS\0");
/// Major format version.
pub const BARS_MAJOR: u16 = 1;
/// Bytes before the first record.
pub const BARS_HEADER: usize = 64;
/// Bytes per record.
pub const BAR_BYTES: usize = 96;
/// One minute in nanoseconds.
pub const MINUTE_NS: u64 = 60_000_000_000;
/// The bar store's directory under the journal root.
pub const BARS_DIR: &str = "bars";
/// [`Bar::flags`]: built from quote mid prices (the minute had no trades).
pub const BAR_MID: u32 = 1;

/// A bar interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interval {
    /// One minute (what the store holds).
    M1,
    /// Five minutes.
    M5,
    /// One hour.
    H1,
    /// One day (UTC).
    D1,
}

impl Interval {
    /// Every interval, shortest first.
    pub const ALL: [Interval; 4] = [Interval::M1, Interval::M5, Interval::H1, Interval::D1];

    /// Parses `1m`, `5m`, `1h`, `1d`.
    pub fn parse(s: &str) -> Option<Interval> {
        match s {
            "1m" => Some(Interval::M1),
            "5m" => Some(Interval::M5),
            "1h" => Some(Interval::H1),
            "1d" => Some(Interval::D1),
            _ => None,
        }
    }

    /// `1m`, `5m`, `1h` or `1d`.
    pub const fn name(self) -> &'static str {
        match self {
            Interval::M1 => "1m",
            Interval::M5 => "5m",
            Interval::H1 => "1h",
            Interval::D1 => "1d",
        }
    }

    /// Its length in nanoseconds.
    pub const fn ns(self) -> u64 {
        match self {
            Interval::M1 => MINUTE_NS,
            Interval::M5 => 5 * MINUTE_NS,
            Interval::H1 => 60 * MINUTE_NS,
            Interval::D1 => 1440 * MINUTE_NS,
        }
    }

    /// The start of the interval holding `t_ns` (intervals are aligned to
    /// the Unix epoch, so days are UTC days).
    pub const fn bucket(self, t_ns: u64) -> u64 {
        t_ns - t_ns % self.ns()
    }
}

/// One bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bar {
    /// The interval's start, UTC ns.
    pub start_ns: u64,
    /// First price (fixed point, 1e-9).
    pub open: i64,
    /// Highest price.
    pub high: i64,
    /// Lowest price.
    pub low: i64,
    /// Last price.
    pub close: i64,
    /// Traded volume in raw size units (0 for a mid bar).
    pub volume: u64,
    /// Sum of price x raw size over the trades.
    pub notional: i128,
    /// Event time of the first event folded in.
    pub first_ns: u64,
    /// Event time of the last.
    pub last_ns: u64,
    /// Trades (quotes for a mid bar).
    pub count: u32,
    /// [`BAR_MID`].
    pub flags: u32,
}

impl Bar {
    /// Built from quote mid prices.
    pub fn is_mid(&self) -> bool {
        self.flags & BAR_MID != 0
    }

    /// Volume-weighted average price (fixed point, truncated); `None`
    /// without volume.
    pub fn vwap(&self) -> Option<i64> {
        (self.volume > 0).then(|| (self.notional / i128::from(self.volume)) as i64)
    }

    /// A bar of one event.
    fn first(t_ns: u64, price: i64, size: u64, flags: u32) -> Bar {
        Bar {
            start_ns: Interval::M1.bucket(t_ns),
            open: price,
            high: price,
            low: price,
            close: price,
            volume: size,
            notional: i128::from(price) * i128::from(size),
            first_ns: t_ns,
            last_ns: t_ns,
            count: 1,
            flags,
        }
    }

    /// Folds in one more event, in sequence order: `close` is the last
    /// event folded, `open` the first.
    fn add(&mut self, t_ns: u64, price: i64, size: u64) {
        self.high = self.high.max(price);
        self.low = self.low.min(price);
        self.close = price;
        self.volume += size;
        self.notional += i128::from(price) * i128::from(size);
        self.first_ns = self.first_ns.min(t_ns);
        self.last_ns = self.last_ns.max(t_ns);
        self.count += 1;
    }

    /// The record's bytes.
    pub fn encode(&self) -> [u8; BAR_BYTES] {
        let mut b = [0u8; BAR_BYTES];
        b[0..8].copy_from_slice(&self.start_ns.to_le_bytes());
        b[8..16].copy_from_slice(&self.open.to_le_bytes());
        b[16..24].copy_from_slice(&self.high.to_le_bytes());
        b[24..32].copy_from_slice(&self.low.to_le_bytes());
        b[32..40].copy_from_slice(&self.close.to_le_bytes());
        b[40..48].copy_from_slice(&self.volume.to_le_bytes());
        b[48..64].copy_from_slice(&self.notional.to_le_bytes());
        b[64..72].copy_from_slice(&self.first_ns.to_le_bytes());
        b[72..80].copy_from_slice(&self.last_ns.to_le_bytes());
        b[80..84].copy_from_slice(&self.count.to_le_bytes());
        b[84..88].copy_from_slice(&self.flags.to_le_bytes());
        let crc = crc32c::crc32c(&b[..88]);
        b[88..92].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// A record's bar; `None` when its CRC does not match.
    pub fn decode(b: &[u8; BAR_BYTES]) -> Option<Bar> {
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        let u32_at = |o: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(w)
        };
        if crc32c::crc32c(&b[..88]) != u32_at(88) {
            return None;
        }
        let mut n = [0u8; 16];
        n.copy_from_slice(&b[48..64]);
        Some(Bar {
            start_ns: u64_at(0),
            open: u64_at(8) as i64,
            high: u64_at(16) as i64,
            low: u64_at(24) as i64,
            close: u64_at(32) as i64,
            volume: u64_at(40),
            notional: i128::from_le_bytes(n),
            first_ns: u64_at(64),
            last_ns: u64_at(72),
            count: u32_at(80),
            flags: u32_at(84),
        })
    }
}

/// What one event contributes to a bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarEvent {
    /// Its sequence in the partition.
    pub seq: u64,
    /// Its instrument.
    pub instrument: u32,
    /// A trade, or a quote (its mid price).
    pub kind: Kind,
    /// Event time, UTC ns.
    pub t_ns: u64,
    /// A trade's price, a quote's mid.
    pub price: i64,
    /// A trade's size; 0 for a quote.
    pub size: u64,
}

/// What event `seq` contributes to a bar: a trade's price and size, or a
/// quote's mid (both sides set) with no size; `None` for an event that
/// carries no price.
pub fn bar_input(seq: u64, body: &ArchivedFrameBody) -> Option<BarEvent> {
    let (kind, price, size) = match body.kind()? {
        Kind::Trade if body.px_a() != UNDEF_PRICE => {
            (Kind::Trade, body.px_a(), u64::from(body.size_a()))
        }
        Kind::Quote if body.px_a() != UNDEF_PRICE && body.px_b() != UNDEF_PRICE => {
            (Kind::Quote, body.reference_price()?, 0)
        }
        _ => return None,
    };
    Some(BarEvent {
        seq,
        instrument: body.instrument_id(),
        kind,
        t_ns: body.ts_event(),
        price,
        size,
    })
}

/// A minute being built for one instrument: its trades, and its quotes'
/// mid prices for when it has no trades.
#[derive(Debug, Clone, Copy, Default)]
struct Open {
    trades: Option<Bar>,
    mids: Option<Bar>,
    first_seq: u64,
}

/// What [`BarBuilder::fold`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folded {
    /// Folded into its minute's bar.
    Bar,
    /// Its minute was already closed: left out.
    Late,
    /// Stamped more than the allowed skew ahead of the clock: left out.
    Future,
}

/// The bar builder of one partition: folds events in sequence order into
/// one-minute bars per instrument, and closes minutes by event time.
///
/// A minute closes when the partition's highest event time so far (its
/// watermark) has passed the minute's end by `lateness`, or when the
/// caller says the clock has ([`close`](Self::close)'s `now_ns`, which the
/// broker passes only once it has read everything the journal holds). An
/// event for a closed minute is late: counted, not folded. Its state after
/// any prefix of the stream is therefore a function of that prefix and
/// the closes asked, which is what lets the broker resume a partition
/// from [`resume_seq`](Self::resume_seq) after a restart and rebuild the
/// same bars.
#[derive(Debug, Clone)]
pub struct BarBuilder {
    lateness_ns: u64,
    open: BTreeMap<(u64, u32), Open>,
    closed_through: u64,
    watermark: u64,
    late: u64,
}

impl BarBuilder {
    /// A builder that closes minutes `lateness_ns` after their end, and
    /// has closed everything before `closed_through` (a minute start, or
    /// 0) already.
    pub fn new(lateness_ns: u64, closed_through: u64, watermark: u64) -> BarBuilder {
        BarBuilder {
            lateness_ns,
            open: BTreeMap::new(),
            closed_through: Interval::M1.bucket(closed_through),
            watermark,
            late: 0,
        }
    }

    /// Folds one event (see [`bar_input`]). An event stamped after
    /// `max_ns` (a clock far ahead) is left out.
    pub fn fold(&mut self, e: &BarEvent, max_ns: u64) -> Folded {
        let BarEvent {
            seq,
            instrument,
            kind,
            t_ns,
            price,
            size,
        } = *e;
        if t_ns > max_ns {
            return Folded::Future;
        }
        let minute = Interval::M1.bucket(t_ns);
        if minute < self.closed_through {
            self.late += 1;
            return Folded::Late;
        }
        self.watermark = self.watermark.max(t_ns);
        let o = self.open.entry((minute, instrument)).or_insert(Open {
            first_seq: seq,
            ..Open::default()
        });
        let (slot, flags) = match kind {
            Kind::Trade => (&mut o.trades, 0),
            Kind::Quote => (&mut o.mids, BAR_MID),
        };
        match slot {
            Some(b) => b.add(t_ns, price, size),
            None => *slot = Some(Bar::first(t_ns, price, size, flags)),
        }
        Folded::Bar
    }

    /// Closes every minute that ended `lateness` before the watermark, and
    /// returns their bars as (instrument, bar), in minute then instrument
    /// order.
    ///
    /// `now_ns`, when given (the caller has read all there is), also closes
    /// the open minutes that ended `lateness` before it: an idle
    /// partition's last minute is written without waiting for its next
    /// event. The clock never closes more than the open minutes, so events
    /// of an old period that come later (a backlog, a replayed source) are
    /// still built, not counted as late.
    pub fn close(&mut self, now_ns: Option<u64>) -> Vec<(u32, Bar)> {
        let by_events = self
            .watermark
            .checked_sub(self.lateness_ns)
            .map_or(0, |l| Interval::M1.bucket(l));
        let by_clock = match (
            now_ns.and_then(|n| n.checked_sub(self.lateness_ns)),
            self.open.keys().next_back(),
        ) {
            (Some(limit), Some(&(newest, _))) => Interval::M1.bucket(limit).min(newest + MINUTE_NS),
            _ => 0,
        };
        // Minutes before `through` are closed.
        let through = by_events.max(by_clock);
        if through <= self.closed_through {
            return Vec::new();
        }
        self.closed_through = through;
        let keep = self.open.split_off(&(through, 0));
        let done = std::mem::replace(&mut self.open, keep);
        done.into_iter()
            .filter_map(|((_, inst), o)| o.trades.or(o.mids).map(|b| (inst, b)))
            .collect()
    }

    /// Where to resume reading after a restart: the first sequence of any
    /// open minute, else `next_seq` (the sequence after the last folded).
    pub fn resume_seq(&self, next_seq: u64) -> u64 {
        self.open
            .values()
            .map(|o| o.first_seq)
            .min()
            .map_or(next_seq, |s| s.min(next_seq))
    }

    /// Everything before this minute start is closed.
    pub fn closed_through(&self) -> u64 {
        self.closed_through
    }

    /// The highest event time folded.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// Events left out because their minute was closed.
    pub fn late(&self) -> u64 {
        self.late
    }

    /// What a reader needs to serve this partition's minutes that are not
    /// in the bar store yet: its open bars, and `unwritten` (closed bars
    /// whose write failed, still to be retried), from the first minute
    /// any of them has (or the closed-through minute when there are none).
    pub fn open_minutes(&self, unwritten: &[(u32, Bar)]) -> OpenMinutes {
        let mut bars: HashMap<u32, Vec<Bar>> = HashMap::new();
        let mut from = self.closed_through;
        for &(inst, b) in unwritten {
            from = from.min(b.start_ns);
            bars.entry(inst).or_default().push(b);
        }
        for (&(_, inst), o) in &self.open {
            if let Some(b) = o.trades.or(o.mids) {
                bars.entry(inst).or_default().push(b);
            }
        }
        for list in bars.values_mut() {
            list.sort_by_key(|b| b.start_ns);
        }
        OpenMinutes { from, bars }
    }
}

/// One partition's bars that are not (all) in the bar store: the minutes
/// the builder holds open, and closed ones it could not write yet.
///
/// A reader takes this partition's bars before `from` from the store and
/// from `from` on from here: the builder publishes a new `OpenMinutes`
/// after writing closed bars and before saving its state, so a minute is
/// counted once whichever of the two it reads first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenMinutes {
    /// Bars before this minute start are in the store.
    pub from: u64,
    /// Per instrument, oldest first.
    pub bars: HashMap<u32, Vec<Bar>>,
}

impl OpenMinutes {
    /// `instrument`'s bars starting in `[from_ns, to_ns)`, oldest first.
    pub fn range(&self, instrument: u32, from_ns: u64, to_ns: u64) -> Vec<Bar> {
        self.bars.get(&instrument).map_or_else(Vec::new, |l| {
            l.iter()
                .filter(|b| (from_ns..to_ns).contains(&b.start_ns))
                .copied()
                .collect()
        })
    }
}

/// The bar file of `instrument` in `topic` built from `partition`, under
/// the bar store `dir`. One file per partition: a topic's routing key may
/// send an instrument's trades and quotes to different partitions (the
/// default, `{symbol}.{exchange}.{kind}`, does), and each partition's
/// builder sees only its own; [`merge_bars`] joins them when read.
pub fn bar_path(dir: &Path, topic: &str, instrument: u32, partition: u32) -> PathBuf {
    dir.join(topic.replace('/', "~"))
        .join(format!("{instrument}.{partition}.bars"))
}

/// The bar files of `instrument` in `topic` (one per partition that had
/// its events) with their partition, in partition order.
pub fn bar_files(dir: &Path, topic: &str, instrument: u32) -> Vec<(u32, PathBuf)> {
    let prefix = format!("{instrument}.");
    let Ok(rd) = std::fs::read_dir(dir.join(topic.replace('/', "~"))) else {
        return Vec::new();
    };
    let mut files: Vec<(u32, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let p = name
                .to_str()?
                .strip_prefix(&prefix)?
                .strip_suffix(".bars")?
                .parse::<u32>()
                .ok()?;
            Some((p, e.path()))
        })
        .collect();
    files.sort();
    files
}

impl Bar {
    /// Joins a bar of the same minute from another partition: trades win
    /// over mid prices; between two of a kind, open is the one of the
    /// earlier first event, close of the later last event (the left one on
    /// a tie), and the rest add up.
    pub fn combine(&mut self, o: &Bar) {
        match (self.is_mid(), o.is_mid()) {
            (true, false) => *self = *o,
            (false, true) => {}
            _ => {
                if o.first_ns < self.first_ns {
                    self.open = o.open;
                }
                if o.last_ns > self.last_ns {
                    self.close = o.close;
                }
                self.high = self.high.max(o.high);
                self.low = self.low.min(o.low);
                self.volume += o.volume;
                self.notional += o.notional;
                self.first_ns = self.first_ns.min(o.first_ns);
                self.last_ns = self.last_ns.max(o.last_ns);
                self.count += o.count;
            }
        }
    }
}

/// Merges the bars of one instrument's partitions (each list in start
/// order) into one list in start order, a minute present in several
/// [`combined`](Bar::combine).
pub fn merge_bars(lists: Vec<Vec<Bar>>) -> Vec<Bar> {
    let mut lists = lists.into_iter().filter(|l| !l.is_empty());
    let Some(first) = lists.next() else {
        return Vec::new();
    };
    lists.fold(first, |acc, l| {
        let mut out = Vec::with_capacity(acc.len().max(l.len()));
        let (mut a, mut b) = (acc.into_iter().peekable(), l.into_iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.start_ns == y.start_ns => {
                    let mut m = *x;
                    m.combine(y);
                    out.push(m);
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if x.start_ns < y.start_ns => out.extend(a.next()),
                (Some(_), Some(_)) | (None, Some(_)) => out.extend(b.next()),
                (Some(_), None) => out.extend(a.next()),
                (None, None) => return out,
            }
        }
    })
}

/// One instrument's bar file.
#[derive(Debug)]
pub struct BarFile {
    path: PathBuf,
    file: File,
    records: u64,
}

/// What [`BarFile::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Appended after the last bar.
    Appended,
    /// Replaced the last bar, which had the same start (a rebuild).
    Replaced,
    /// Left out: the file already has a later bar (a rebuild of bars
    /// written before).
    Older,
}

impl BarFile {
    /// Opens the bar file at `path` for reading; `None` when there is none.
    ///
    /// # Errors
    /// It cannot be read, or it is not a bar file of this version.
    pub fn open(path: &Path) -> Result<Option<BarFile>> {
        match File::open(path) {
            Ok(file) => Self::check(path, file).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("open bar file", path, e)),
        }
    }

    /// Opens (creating it and its directory when missing) the bar file of
    /// `instrument` at `path` for writing; a partial record at its end (a
    /// crash mid-append) is cut.
    ///
    /// # Errors
    /// It cannot be created, read or written, or it is not a bar file.
    pub fn create(path: &Path, instrument: u32) -> Result<BarFile> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("create bar directory", parent, e))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io("open bar file", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat bar file", path, e))?
            .len();
        if len == 0 {
            let mut h = [0u8; BARS_HEADER];
            h[0..8].copy_from_slice(&BARS_MAGIC.to_le_bytes());
            h[8..10].copy_from_slice(&BARS_MAJOR.to_le_bytes());
            h[12..16].copy_from_slice(&(BAR_BYTES as u32).to_le_bytes());
            h[16..20].copy_from_slice(&instrument.to_le_bytes());
            h[20..24].copy_from_slice(&60u32.to_le_bytes());
            file.write_all_at(&h, 0)
                .map_err(|e| Error::io("write bar file header", path, e))?;
        }
        let bf = Self::check(path, file)?;
        let whole = BARS_HEADER as u64 + bf.records * BAR_BYTES as u64;
        if len > whole {
            bf.file
                .set_len(whole)
                .map_err(|e| Error::io("cut a partial bar record", path, e))?;
        }
        Ok(bf)
    }

    fn check(path: &Path, file: File) -> Result<BarFile> {
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat bar file", path, e))?
            .len();
        let mut h = [0u8; BARS_HEADER];
        if len < BARS_HEADER as u64 {
            return Err(Error::Short {
                path: path.to_path_buf(),
                len,
                need: BARS_HEADER as u64,
            });
        }
        file.read_exact_at(&mut h, 0)
            .map_err(|e| Error::io("read bar file header", path, e))?;
        let mut m = [0u8; 8];
        m.copy_from_slice(&h[0..8]);
        let magic = u64::from_le_bytes(m);
        if magic != BARS_MAGIC {
            return Err(Error::BadMagic {
                path: path.to_path_buf(),
                what: "bar",
                found: magic,
                expected: BARS_MAGIC,
            });
        }
        let major = u16::from_le_bytes([h[8], h[9]]);
        if major != BARS_MAJOR {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found_major: major,
                found_minor: u16::from_le_bytes([h[10], h[11]]),
                known_major: BARS_MAJOR,
                known_minor: 0,
            });
        }
        let size = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if size as usize != BAR_BYTES {
            return Err(Error::BadHeader {
                path: path.to_path_buf(),
                field: "record_size",
                value: u64::from(size),
                expected: format!("{BAR_BYTES}"),
            });
        }
        Ok(BarFile {
            path: path.to_path_buf(),
            file,
            records: (len - BARS_HEADER as u64) / BAR_BYTES as u64,
        })
    }

    /// Whole records in the file.
    pub fn len(&self) -> u64 {
        self.records
    }

    /// No records.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    fn record(&self, i: u64) -> Result<Bar> {
        let mut b = [0u8; BAR_BYTES];
        self.file
            .read_exact_at(&mut b, BARS_HEADER as u64 + i * BAR_BYTES as u64)
            .map_err(|e| Error::io("read bar record", &self.path, e))?;
        Bar::decode(&b).ok_or_else(|| self.corrupt(i))
    }

    fn corrupt(&self, i: u64) -> Error {
        Error::BadRecord {
            path: self.path.clone(),
            what: format!("bar record {i} fails its CRC"),
        }
    }

    /// Writes `bar` after the last one (or over it when it has the same
    /// start); a bar older than the last is left out.
    ///
    /// # Errors
    /// The file cannot be read or written (a full disk).
    pub fn put(&mut self, bar: &Bar) -> Result<Put> {
        let (at, put) = match self.records.checked_sub(1) {
            None => (0, Put::Appended),
            Some(last) => {
                let l = self.record(last)?;
                if l.start_ns > bar.start_ns {
                    return Ok(Put::Older);
                }
                if l.start_ns == bar.start_ns {
                    (last, Put::Replaced)
                } else {
                    (self.records, Put::Appended)
                }
            }
        };
        self.file
            .write_all_at(&bar.encode(), BARS_HEADER as u64 + at * BAR_BYTES as u64)
            .map_err(|e| Error::io("write bar record", &self.path, e))?;
        if put == Put::Appended {
            self.records += 1;
        }
        Ok(put)
    }

    /// Drops the bars of the file at `path` that start before `before_ns`,
    /// once its first bar starts before `before_ns - slack_ns` (so a file
    /// is rewritten once per `slack_ns`, not at every call). The bars kept
    /// are copied to `<path>.tmp`, synced, and renamed over `path` (a
    /// reader with the old file open reads it to the end); a file with
    /// none left is removed. Returns how many bars were dropped.
    ///
    /// # Errors
    /// The file cannot be read, or the new one written (a full disk: the
    /// old file stays as it was).
    pub fn expire(path: &Path, before_ns: u64, slack_ns: u64) -> Result<u64> {
        let Some(f) = BarFile::open(path)? else {
            return Ok(0);
        };
        if f.records == 0 || f.record(0)?.start_ns >= before_ns.saturating_sub(slack_ns) {
            return Ok(0);
        }
        let keep_from = f.lower_bound(before_ns)?;
        if keep_from >= f.records {
            std::fs::remove_file(path).map_err(|e| Error::io("remove bar file", path, e))?;
            return Ok(f.records);
        }
        let tmp = path.with_extension("bars.tmp");
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io("create bar file", &tmp, e))?;
        let copied = (|| {
            let mut header = [0u8; BARS_HEADER];
            f.file
                .read_exact_at(&mut header, 0)
                .map_err(|e| Error::io("read bar file header", path, e))?;
            out.write_all_at(&header, 0)
                .map_err(|e| Error::io("write bar file header", &tmp, e))?;
            let mut buf = vec![0u8; 8192 * BAR_BYTES];
            let mut i = keep_from;
            while i < f.records {
                let n = (f.records - i).min(8192);
                let bytes = &mut buf[..n as usize * BAR_BYTES];
                f.file
                    .read_exact_at(bytes, BARS_HEADER as u64 + i * BAR_BYTES as u64)
                    .map_err(|e| Error::io("read bar records", path, e))?;
                let at = BARS_HEADER as u64 + (i - keep_from) * BAR_BYTES as u64;
                out.write_all_at(bytes, at)
                    .map_err(|e| Error::io("write bar records", &tmp, e))?;
                i += n;
            }
            out.sync_data()
                .map_err(|e| Error::io("sync bar file", &tmp, e))?;
            std::fs::rename(&tmp, path).map_err(|e| Error::io("rename bar file", &tmp, e))
        })();
        if copied.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        copied.map(|()| keep_from)
    }

    /// Flushes the file's data to disk.
    ///
    /// # Errors
    /// The OS refused.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync bar file", &self.path, e))
    }

    /// The index of the first bar starting at or after `t_ns`.
    fn lower_bound(&self, t_ns: u64) -> Result<u64> {
        let (mut lo, mut hi) = (0u64, self.records);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.record(mid)?.start_ns < t_ns {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Up to `limit` bars starting in `[from_ns, to_ns)`, oldest first,
    /// read with one `pread` after a binary search.
    ///
    /// # Errors
    /// The file cannot be read, or a record in the range is corrupt.
    pub fn range(&self, from_ns: u64, to_ns: u64, limit: usize) -> Result<Vec<Bar>> {
        let first = self.lower_bound(from_ns)?;
        let n = (self.records - first).min(limit as u64) as usize;
        let mut bytes = vec![0u8; n * BAR_BYTES];
        self.file
            .read_exact_at(&mut bytes, BARS_HEADER as u64 + first * BAR_BYTES as u64)
            .map_err(|e| Error::io("read bar records", &self.path, e))?;
        let mut out = Vec::with_capacity(n);
        for (i, chunk) in bytes.chunks_exact(BAR_BYTES).enumerate() {
            let mut rec = [0u8; BAR_BYTES];
            rec.copy_from_slice(chunk);
            let bar = Bar::decode(&rec).ok_or_else(|| self.corrupt(first + i as u64))?;
            if bar.start_ns >= to_ns {
                break;
            }
            out.push(bar);
        }
        Ok(out)
    }

    /// The last bar, if any.
    ///
    /// # Errors
    /// It cannot be read or is corrupt.
    pub fn last(&self) -> Result<Option<Bar>> {
        match self.records.checked_sub(1) {
            None => Ok(None),
            Some(i) => self.record(i).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: i64 = crate::frame::PRICE_SCALE;

    fn ev(seq: u64, instrument: u32, kind: Kind, t_ns: u64, price: i64, size: u64) -> BarEvent {
        BarEvent {
            seq,
            instrument,
            kind,
            t_ns,
            price,
            size,
        }
    }

    #[test]
    fn a_record_round_trips_and_a_flipped_bit_is_caught() {
        let mut b = Bar::first(61 * MINUTE_NS / 60 * 60 + 5, 101 * P, 7, 0);
        b.add(b.first_ns + 10, 99 * P, 3);
        let enc = b.encode();
        assert_eq!(Bar::decode(&enc), Some(b));
        let mut bad = enc;
        bad[20] ^= 1;
        assert_eq!(Bar::decode(&bad), None);
        assert_eq!(b.vwap(), Some((101 * P * 7 + 99 * P * 3) / 10));
    }

    #[test]
    fn partitions_merge_by_minute_with_trades_over_mids() {
        let m = 1_000 * MINUTE_NS;
        let t = |start: u64, first: u64, last: u64, open: i64, close: i64| Bar {
            start_ns: start,
            open,
            high: open.max(close),
            low: open.min(close),
            close,
            volume: 10,
            notional: 10 * open as i128,
            first_ns: first,
            last_ns: last,
            count: 2,
            flags: 0,
        };
        let mid = |start: u64| Bar {
            flags: BAR_MID,
            volume: 0,
            notional: 0,
            ..t(start, start, start + 1, 7, 7)
        };
        // Partition 0: trades of minutes 0 and 2; partition 1: quotes of 0, 1, 2;
        // partition 2: more trades of minute 2, earlier and later.
        let merged = merge_bars(vec![
            vec![
                t(m, m + 5, m + 9, 10, 11),
                t(
                    m + 2 * MINUTE_NS,
                    m + 2 * MINUTE_NS + 5,
                    m + 2 * MINUTE_NS + 6,
                    20,
                    21,
                ),
            ],
            vec![mid(m), mid(m + MINUTE_NS), mid(m + 2 * MINUTE_NS)],
            vec![t(
                m + 2 * MINUTE_NS,
                m + 2 * MINUTE_NS + 1,
                m + 2 * MINUTE_NS + 9,
                30,
                31,
            )],
        ]);
        assert_eq!(merged.len(), 3);
        assert_eq!(
            (merged[0].open, merged[0].is_mid()),
            (10, false),
            "trades win"
        );
        assert!(merged[1].is_mid(), "a minute with quotes only");
        let b = merged[2];
        assert_eq!(
            (b.open, b.close, b.high, b.low, b.volume, b.count),
            (30, 31, 31, 20, 20, 4)
        );
        assert_eq!(merge_bars(Vec::new()), Vec::new());
    }

    #[test]
    fn intervals_align_to_utc() {
        let t = 1_700_000_123_456_789_000u64;
        assert_eq!(Interval::D1.bucket(t) % (86_400 * 1_000_000_000), 0);
        assert_eq!(Interval::parse("1h"), Some(Interval::H1));
        assert_eq!(Interval::parse("2h"), None);
    }

    #[test]
    fn minutes_close_after_the_lateness_and_late_events_are_left_out() {
        let m = 1_000 * MINUTE_NS;
        let mut b = BarBuilder::new(2_000_000_000, 0, 0);
        assert_eq!(
            b.fold(&ev(1, 7, Kind::Trade, m + 1, 10 * P, 1), u64::MAX),
            Folded::Bar
        );
        assert_eq!(
            b.fold(
                &ev(2, 7, Kind::Trade, m + MINUTE_NS + 1, 11 * P, 1),
                u64::MAX
            ),
            Folded::Bar
        );
        assert!(
            b.close(None).is_empty(),
            "1 s into the next minute: not yet"
        );
        assert_eq!(
            b.fold(&ev(3, 7, Kind::Trade, m + 5, 12 * P, 1), u64::MAX),
            Folded::Bar
        );
        b.fold(
            &ev(4, 8, Kind::Quote, m + MINUTE_NS + 3_000_000_000, 5 * P, 0),
            u64::MAX,
        );
        let closed = b.close(None);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].1.close, 12 * P);
        assert_eq!(closed[0].1.high, 12 * P);
        assert_eq!(
            b.fold(&ev(5, 7, Kind::Trade, m + 6, 1, 1), u64::MAX),
            Folded::Late
        );
        assert_eq!(b.late(), 1);
        assert_eq!(b.resume_seq(6), 2);
        assert_eq!(
            b.fold(&ev(6, 7, Kind::Trade, u64::MAX - 1, 1, 1), m * 2),
            Folded::Future
        );
        let rest = b.close(Some(m + 3 * MINUTE_NS));
        assert_eq!(rest.len(), 2);
        assert!(rest[1].1.is_mid(), "instrument 8 only quoted: a mid bar");
        assert_eq!(b.resume_seq(7), 7);
        // The clock closes the open minutes only: an old event that comes
        // later (a backlog) is still built.
        assert_eq!(b.closed_through(), m + 2 * MINUTE_NS);
        assert!(b.close(Some(m + 100 * MINUTE_NS)).is_empty());
        assert_eq!(b.closed_through(), m + 2 * MINUTE_NS);
        assert_eq!(
            b.fold(&ev(8, 7, Kind::Trade, m + 2 * MINUTE_NS, 1, 1), u64::MAX),
            Folded::Bar
        );
    }

    #[test]
    fn expiry_drops_whole_old_bars_only_once_past_the_slack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = bar_path(dir.path(), "a/b", 3, 0);
        let mut f = BarFile::create(&path, 3).expect("create");
        for m in 10..20_000u64 {
            f.put(&Bar::first(m * MINUTE_NS, m as i64, 1, 0))
                .expect("put");
        }
        drop(f);
        let starts = || {
            BarFile::open(&path)
                .expect("open")
                .expect("exists")
                .range(0, u64::MAX, usize::MAX)
                .expect("range")
                .iter()
                .map(|b| b.start_ns / MINUTE_NS)
                .collect::<Vec<_>>()
        };
        // The first bar (minute 10) is not older than 15 - 5: kept.
        assert_eq!(
            BarFile::expire(&path, 15 * MINUTE_NS, 5 * MINUTE_NS).expect("expire"),
            0
        );
        assert_eq!(starts().len(), 19_990);
        // Past the slack: everything before minute 16 goes, the rest stays
        // in order, and the file takes appends again.
        assert_eq!(
            BarFile::expire(&path, 16 * MINUTE_NS, 5 * MINUTE_NS).expect("expire"),
            6
        );
        assert_eq!(starts(), (16..20_000).collect::<Vec<_>>());
        let mut f = BarFile::create(&path, 3).expect("reopen");
        f.put(&Bar::first(20_000 * MINUTE_NS, 1, 1, 0))
            .expect("put");
        assert_eq!(f.len(), 19_985);
        assert!(!path.with_extension("bars.tmp").exists());
        // Nothing left: the file goes.
        assert_eq!(BarFile::expire(&path, u64::MAX, 0).expect("expire"), 19_985);
        assert!(!path.exists());
        assert_eq!(
            BarFile::expire(&path, u64::MAX, 0).expect("expire"),
            0,
            "no file"
        );
    }

    #[test]
    fn the_store_appends_replaces_the_last_and_keeps_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = bar_path(dir.path(), "a/b", 3, 0);
        let mut f = BarFile::create(&path, 3).expect("create");
        let bar = |m: u64, px: i64| Bar::first(m * MINUTE_NS, px, 1, 0);
        assert_eq!(f.put(&bar(1, 1)).expect("put"), Put::Appended);
        assert_eq!(f.put(&bar(2, 2)).expect("put"), Put::Appended);
        assert_eq!(f.put(&bar(2, 3)).expect("put"), Put::Replaced);
        assert_eq!(f.put(&bar(1, 9)).expect("put"), Put::Older);
        assert_eq!(f.put(&bar(5, 5)).expect("put"), Put::Appended);
        drop(f);
        // A crash mid-append leaves part of a record: readers ignore it, the writer cuts it.
        let mut raw = OpenOptions::new().append(true).open(&path).expect("open");
        std::io::Write::write_all(&mut raw, &[1u8; 40]).expect("write");
        let r = BarFile::open(&path).expect("open").expect("exists");
        assert_eq!(r.len(), 3);
        let got = r.range(2 * MINUTE_NS, 5 * MINUTE_NS, 10).expect("range");
        assert_eq!(got.iter().map(|b| b.open).collect::<Vec<_>>(), vec![3]);
        assert_eq!(r.range(0, u64::MAX, 2).expect("range").len(), 2);
        let w = BarFile::create(&path, 3).expect("reopen");
        assert_eq!(w.len(), 3);
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            (BARS_HEADER + 3 * BAR_BYTES) as u64
        );
        // A flipped bit is named.
        let raw = OpenOptions::new().write(true).open(&path).expect("open");
        raw.write_all_at(&[0xff], (BARS_HEADER + BAR_BYTES + 9) as u64)
            .expect("write");
        let err = r.range(0, u64::MAX, 10).expect_err("corrupt");
        assert!(err.to_string().contains("bar record 1"), "{err}");
    }

    /// (kind, time, price, size) of one event.
    type Fold = (Kind, u64, i64, u64);

    /// A plain model: group trades by (instrument, minute) in sequence
    /// order; a minute with no trades takes its quotes' mids.
    fn model(events: &[(u32, Kind, u64, i64, u64)]) -> Vec<(u32, Bar)> {
        let mut groups: BTreeMap<(u64, u32), Vec<Fold>> = BTreeMap::new();
        for &(inst, kind, t, px, size) in events {
            groups
                .entry((t - t % MINUTE_NS, inst))
                .or_default()
                .push((kind, t, px, size));
        }
        let mut out = Vec::new();
        for ((minute, inst), evs) in groups {
            let trades: Vec<_> = evs.iter().filter(|e| e.0 == Kind::Trade).collect();
            let (use_, flags) = if trades.is_empty() {
                (evs.iter().collect::<Vec<_>>(), BAR_MID)
            } else {
                (trades, 0)
            };
            out.push((
                inst,
                Bar {
                    start_ns: minute,
                    open: use_[0].2,
                    high: use_.iter().map(|e| e.2).max().unwrap_or(0),
                    low: use_.iter().map(|e| e.2).min().unwrap_or(0),
                    close: use_[use_.len() - 1].2,
                    volume: use_.iter().map(|e| e.3).sum(),
                    notional: use_.iter().map(|e| i128::from(e.2) * i128::from(e.3)).sum(),
                    first_ns: use_.iter().map(|e| e.1).min().unwrap_or(0),
                    last_ns: use_.iter().map(|e| e.1).max().unwrap_or(0),
                    count: use_.len() as u32,
                    flags,
                },
            ));
        }
        out
    }

    proptest! {
        /// With event times that never go back by more than the lateness,
        /// the builder's bars (closed a piece at a time, with restarts from
        /// `resume_seq`) equal the plain model's.
        #[test]
        fn bars_equal_a_plain_model(
            steps in proptest::collection::vec((0u32..4, any::<bool>(), 0u64..20_000_000_000, 1i64..1_000_000, 0u64..1000, any::<bool>()), 1..400),
        ) {
            let lateness = 30_000_000_000u64;
            let mut t = 1_000 * MINUTE_NS;
            let mut events = Vec::new();
            for &(inst, trade, dt, px, size, back) in &steps {
                // Times move forward, and sometimes back within the lateness.
                let at = if back { t.saturating_sub(dt) } else { t += dt; t };
                let kind = if trade { Kind::Trade } else { Kind::Quote };
                events.push((inst, kind, at, px * 1000, if trade { size } else { 0 }));
            }
            let mut b = BarBuilder::new(lateness, 0, 0);
            let mut got = Vec::new();
            let mut i = 0usize;
            let mut restarts = 0;
            while i < events.len() {
                let (inst, kind, at, px, size) = events[i];
                prop_assert_eq!(b.fold(&ev(i as u64 + 1, inst, kind, at, px, size), u64::MAX), Folded::Bar);
                i += 1;
                got.extend(b.close(None));
                if i.is_multiple_of(97) && restarts < 3 {
                    // A restart: a new builder from the saved state, re-reading from resume_seq.
                    restarts += 1;
                    let from = b.resume_seq(i as u64 + 1) as usize - 1;
                    b = BarBuilder::new(lateness, b.closed_through(), b.watermark());
                    for (j, &(inst, kind, at, px, size)) in events.iter().enumerate().take(i).skip(from) {
                        b.fold(&ev(j as u64 + 1, inst, kind, at, px, size), u64::MAX);
                    }
                }
            }
            got.extend(b.close(Some(u64::MAX / 2)));
            got.sort_by_key(|(inst, bar)| (bar.start_ns, *inst));
            prop_assert_eq!(got, model(&events));
        }
    }
}

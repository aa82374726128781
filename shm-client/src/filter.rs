//! Filters, compiled to a bitmap over instrument ids plus ranges, checked on
//! the copied slot before anything else is done with it.

use tickwire_proto::frame::price_from_f64;
use tickwire_proto::symbology::{Entry, Symbology};
use tickwire_proto::{ArchivedFrameBody, Kind};

use crate::Error;
use crate::group::wire::SlotSet;

/// What a subscriber wants. Empty lists mean "any". Symbols, exchanges and
/// currencies match whole names, ignoring ASCII case (`nasdaq` matches
/// `NASDAQ`, `aapl` matches `AAPL`): one rule for all three.
///
/// ```
/// use shm_client::{Filter, Kind};
/// let f = Filter::default()
///     .exchanges(["NASDAQ", "NYSE"])
///     .kinds([Kind::Trade])
///     .price_range(Some(10.0), Some(500.0))
///     .min_volume(100);
/// # let _ = f;
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Symbols.
    pub symbols: Vec<String>,
    /// Exchanges.
    pub exchanges: Vec<String>,
    /// Currencies.
    pub currencies: Vec<String>,
    /// Data types (trade, quote).
    pub kinds: Vec<Kind>,
    /// Lowest price (a trade's price, a quote's mid), inclusive.
    pub min_price: Option<f64>,
    /// Highest price, inclusive.
    pub max_price: Option<f64>,
    /// Smallest size in real units (a trade's size, a quote's larger side).
    pub min_volume: Option<u64>,
}

impl Filter {
    /// Only these symbols.
    pub fn symbols<S: Into<String>>(mut self, v: impl IntoIterator<Item = S>) -> Self {
        self.symbols = v.into_iter().map(Into::into).collect();
        self
    }
    /// Only these exchanges.
    pub fn exchanges<S: Into<String>>(mut self, v: impl IntoIterator<Item = S>) -> Self {
        self.exchanges = v.into_iter().map(Into::into).collect();
        self
    }
    /// Only these currencies.
    pub fn currencies<S: Into<String>>(mut self, v: impl IntoIterator<Item = S>) -> Self {
        self.currencies = v.into_iter().map(Into::into).collect();
        self
    }
    /// Only these kinds.
    pub fn kinds(mut self, v: impl IntoIterator<Item = Kind>) -> Self {
        self.kinds = v.into_iter().collect();
        self
    }
    /// Only prices within `[min, max]`.
    pub fn price_range(mut self, min: Option<f64>, max: Option<f64>) -> Self {
        self.min_price = min;
        self.max_price = max;
        self
    }
    /// Only sizes of at least `v`.
    pub fn min_volume(mut self, v: u64) -> Self {
        self.min_volume = Some(v);
        self
    }

    /// Whether the filter resolves names or sizes through the symbology
    /// table (symbols, exchanges, currencies, minimum volume).
    pub fn needs_symbology(&self) -> bool {
        !(self.symbols.is_empty() && self.exchanges.is_empty() && self.currencies.is_empty())
            || self.min_volume.is_some()
    }

    /// Whether an instrument passes the symbol/exchange/currency part.
    pub fn instrument_matches(&self, e: &Entry) -> bool {
        let any_of = |list: &[String], v: &str| {
            list.is_empty() || list.iter().any(|x| x.eq_ignore_ascii_case(v))
        };
        any_of(&self.symbols, e.symbol())
            && any_of(&self.exchanges, e.exchange())
            && any_of(&self.currencies, e.currency())
    }
}

/// The instruments a Key_Shared member may be given: those whose slot is
/// in a set (what its selectors can select), one bit per instrument id,
/// resolved through the symbology table as ids appear. A reader passes
/// over anyone else's event on its instrument id alone, before building
/// anything for it. An instrument the table does not name yet passes: the
/// member decides.
pub(crate) struct KeyMask {
    slots: SlotSet,
    owned: Vec<u64>,
    /// Ids `1..=known` are resolved in `owned`.
    known: u32,
}

impl KeyMask {
    pub(crate) fn new(slots: SlotSet) -> KeyMask {
        KeyMask {
            slots,
            owned: Vec::new(),
            known: 0,
        }
    }

    /// Whether an event of instrument `id` may be the member's.
    #[inline(always)]
    pub(crate) fn passes(&mut self, id: u32, symbology: Option<&Symbology>) -> bool {
        if id > self.known {
            self.resolve(symbology);
            if id > self.known {
                return true;
            }
        }
        id == 0 || self.owned[id as usize / 64] & (1 << (id % 64)) != 0
    }

    #[cold]
    fn resolve(&mut self, symbology: Option<&Symbology>) {
        let Some(s) = symbology else {
            return;
        };
        // Ids beyond 2^24 are not table entries: left to the member.
        let upto = s.count().min(1 << 24);
        for i in self.known + 1..=upto {
            let Some(e) = s.get(i) else {
                return;
            };
            let slot = crate::group::key_slot(Some(e), i);
            if self.owned.len() <= i as usize / 64 {
                self.owned.resize(i as usize / 64 + 1, 0);
            }
            if self.slots.contains(slot) {
                self.owned[i as usize / 64] |= 1 << (i % 64);
            }
            self.known = i;
        }
    }
}

pub(crate) struct CompiledFilter {
    by_instrument: bool,
    bitmap: Vec<u64>,
    known: u32,
    kind_mask: u32,
    px_min: i64,
    px_max: i64,
    by_price: bool,
    min_volume: Option<u64>,
    source: Filter,
}

impl CompiledFilter {
    pub(crate) fn compile(
        f: &Filter,
        symbology: Option<&Symbology>,
    ) -> Result<CompiledFilter, Error> {
        let by_instrument =
            !(f.symbols.is_empty() && f.exchanges.is_empty() && f.currencies.is_empty());
        let needs_symbology = by_instrument || f.min_volume.is_some();
        let capacity = match symbology {
            Some(s) => s.capacity(),
            None if needs_symbology => return Err(Error::Filter("symbol, exchange, currency and volume filters need the node's symbology file, which is missing".into())),
            None => 0,
        };
        let px = |v: Option<f64>, name: &str, default: i64| -> Result<i64, Error> {
            match v {
                None => Ok(default),
                Some(p) => price_from_f64(p)
                    .ok_or_else(|| Error::Filter(format!("{name} {p} is not a finite price"))),
            }
        };
        let px_min = px(f.min_price, "min_price", i64::MIN)?;
        let px_max = px(f.max_price, "max_price", i64::MAX - 1)?;
        if px_min > px_max {
            return Err(Error::Filter(format!(
                "min_price {:?} is above max_price {:?}",
                f.min_price, f.max_price
            )));
        }
        let kind_mask = if f.kinds.is_empty() {
            u32::MAX
        } else {
            f.kinds.iter().fold(0, |m, k| m | 1 << k.code())
        };
        let words = if by_instrument {
            (capacity as usize + 1).div_ceil(64)
        } else {
            0
        };
        let mut c = CompiledFilter {
            by_instrument,
            bitmap: vec![0; words],
            known: 0,
            kind_mask,
            px_min,
            px_max,
            by_price: f.min_price.is_some() || f.max_price.is_some(),
            min_volume: f.min_volume,
            source: f.clone(),
        };
        if let Some(s) = symbology {
            c.refresh(s);
        }
        Ok(c)
    }

    /// How many instruments known now pass the name part of the filter
    /// (`None` when it does not filter by name).
    pub(crate) fn matching_instruments(&mut self, s: Option<&Symbology>) -> Option<u32> {
        if !self.by_instrument {
            return None;
        }
        if let Some(s) = s {
            self.refresh(s);
        }
        Some(self.bitmap.iter().map(|w| w.count_ones()).sum())
    }

    #[cold]
    fn refresh(&mut self, s: &Symbology) {
        let count = s
            .count()
            .min((self.bitmap.len() * 64).saturating_sub(1) as u32);
        for id in self.known + 1..=count {
            if let Some(e) = s.get(id)
                && self.source.instrument_matches(e)
            {
                self.bitmap[id as usize / 64] |= 1 << (id % 64);
            }
        }
        self.known = self.known.max(count);
    }

    #[inline(always)]
    pub(crate) fn matches(
        &mut self,
        body: &ArchivedFrameBody,
        symbology: Option<&Symbology>,
    ) -> bool {
        if self.kind_mask & (1u32 << (body.kind & 31)) == 0 {
            return false;
        }
        if self.by_instrument {
            let id = body.instrument_id();
            if id > self.known
                && let Some(s) = symbology
            {
                self.refresh(s);
            }
            if id == 0 || id > self.known || self.bitmap[id as usize / 64] & (1 << (id % 64)) == 0 {
                return false;
            }
        }
        if self.by_price {
            match body.reference_price() {
                Some(p) if p >= self.px_min && p <= self.px_max => {}
                _ => return false,
            }
        }
        if let Some(min) = self.min_volume {
            let decimals = symbology
                .and_then(|s| s.get(body.instrument_id()))
                .map_or(0, |e| e.size_decimals());
            let raw_min = min.saturating_mul(10u64.saturating_pow(decimals as u32));
            if (body.reference_size() as u64) < raw_min {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::key_slot;
    use crate::testing::TopicWriter;

    /// The mask passes exactly the instruments whose slot is in its set,
    /// learns instruments added to the table after it was made, and lets
    /// through what the table does not name (the member decides those).
    #[test]
    fn a_key_mask_passes_the_instruments_of_its_slots_and_anything_unnamed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = TopicWriter::create(dir.path(), "t", 1, 64).expect("writer");
        let first: Vec<u32> = (0..40)
            .map(|i| {
                w.instrument(&format!("S{i}"), "NASDAQ", "USD")
                    .expect("resolve")
            })
            .collect();
        let table = Symbology::open(dir.path()).expect("open");
        let slot = |id: u32| key_slot(table.get(id), id);
        // The set: the slots of every third instrument (one more later).
        let mut set = SlotSet::default();
        for &id in first.iter().step_by(3) {
            set.insert(slot(id));
        }
        let mut mask = KeyMask::new(set.clone());
        let in_set = |set: &SlotSet, id: u32, t: &Symbology| set.contains(key_slot(t.get(id), id));
        let mut passed = 0;
        for &id in &first {
            let want = in_set(&set, id, &table);
            assert_eq!(mask.passes(id, Some(&table)), want, "instrument {id}");
            passed += usize::from(want);
        }
        assert!((14..40).contains(&passed), "{passed} of 40 passed");
        // An id beyond the table: passed to the member.
        assert!(mask.passes(first[39] + 1, Some(&table)));
        assert!(mask.passes(7, None) == in_set(&set, 7, &table));
        // Named later, and now resolved by the mask like the others.
        let late = w.instrument("LATE", "NASDAQ", "USD").expect("resolve");
        let table = Symbology::open(dir.path()).expect("open");
        let mut set2 = set.clone();
        set2.insert(key_slot(table.get(late), late));
        let mut mask2 = KeyMask::new(set2.clone());
        assert!(mask2.passes(late, Some(&table)));
        let other = w.instrument("OTHER", "NASDAQ", "USD").expect("resolve");
        let table = Symbology::open(dir.path()).expect("open");
        assert_eq!(
            mask2.passes(other, Some(&table)),
            in_set(&set2, other, &table)
        );
    }
}

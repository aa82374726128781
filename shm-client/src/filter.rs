//! Filters, compiled to a bitmap over instrument ids plus ranges, checked on
//! the copied slot before anything else is done with it.

use tickwire_proto::frame::price_from_f64;
use tickwire_proto::symbology::{Entry, Symbology};
use tickwire_proto::{ArchivedFrameBody, Kind};

use crate::Error;

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

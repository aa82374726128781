//! The built-in synthetic feed: a few hundred real tickers on several
//! exchanges and currencies, trades and quotes, random-walk prices, paced at
//! a configured rate. Deterministic for a seed.

use std::time::{Duration, Instant};

use tickwire_proto::Kind;
use tickwire_proto::frame::{FLAG_BUY_AGGRESSOR, FLAG_SELL_AGGRESSOR, FrameBody, PRICE_SCALE};
use tickwire_proto::futex::realtime_ns;
use tickwire_proto::symbology::Instrument;

use crate::engine::Ingest;
use crate::router::Route;

/// (exchange, currency, size decimals, typical price, tickers)
type Venue = (&'static str, &'static str, u8, f64, &'static [&'static str]);

const VENUES: &[Venue] = &[
    (
        "NASDAQ",
        "USD",
        0,
        150.0,
        &[
            "AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "GOOG", "META", "AVGO", "TSLA", "COST",
            "NFLX", "AMD", "PEP", "ADBE", "CSCO", "TMUS", "INTC", "QCOM", "TXN", "AMGN", "INTU",
            "CMCSA", "HON", "AMAT", "ISRG", "BKNG", "SBUX", "VRTX", "GILD", "MDLZ", "ADP", "REGN",
            "ADI", "LRCX", "PANW", "MU", "KLAC", "SNPS", "CDNS", "MELI", "PYPL", "ASML", "MAR",
            "ORLY", "CTAS", "CSX", "ABNB", "MRVL", "FTNT", "CRWD", "DASH", "WDAY", "ROP", "NXPI",
            "PCAR", "MNST", "CPRT", "PAYX", "ROST", "AEP", "ODFL", "KDP", "FAST", "EA", "CHTR",
            "DDOG", "EXC", "CTSH", "IDXX", "BKR", "GEHC", "XEL", "CCEP", "TTD", "ZS", "ON", "CSGP",
            "ANSS", "DXCM", "TEAM",
        ],
    ),
    (
        "NYSE",
        "USD",
        0,
        120.0,
        &[
            "JPM", "V", "WMT", "XOM", "UNH", "MA", "PG", "JNJ", "HD", "ORCL", "MRK", "ABBV", "CVX",
            "KO", "BAC", "CRM", "ACN", "MCD", "LIN", "TMO", "ABT", "DIS", "WFC", "PM", "IBM", "GE",
            "CAT", "VZ", "NOW", "DHR", "NEE", "UNP", "SPGI", "RTX", "PFE", "T", "LOW", "GS",
            "UBER", "AXP", "BLK", "MS", "COP", "ELV", "SYK", "PGR", "BA", "LMT", "C", "SCHW", "DE",
            "TJX", "BSX", "MMC", "CB", "NKE", "PLD", "UPS", "SO", "MO", "BMY", "DUK", "ICE", "SHW",
            "CL", "ZTS", "MCO", "USB", "PNC", "GD", "EMR", "ITW", "APD", "ECL", "FDX", "NSC",
            "TGT", "F", "GM", "HUM",
        ],
    ),
    (
        "LSE",
        "GBP",
        0,
        20.0,
        &[
            "AZN", "SHEL", "HSBA", "ULVR", "BP.", "RIO", "GSK", "REL", "DGE", "BATS", "LSEG",
            "GLEN", "NG.", "CPG", "BARC", "LLOY", "RR.", "VOD", "PRU", "TSCO", "AAL", "BA.",
            "EXPN", "HLN", "IMB", "NWG", "SSE", "STAN", "AHT", "III", "LGEN", "AV.", "BT.A", "SGE",
            "BNZL", "IHG", "SMIN", "WPP", "KGF", "SBRY",
        ],
    ),
    (
        "XETRA",
        "EUR",
        0,
        100.0,
        &[
            "SAP", "SIE", "ALV", "DTE", "AIR", "MBG", "MUV2", "BAS", "IFX", "BMW", "DHL", "DB1",
            "BAYN", "ADS", "VOW3", "EOAN", "DBK", "RWE", "HEN3", "MRK", "DTG", "SHL", "VNA", "BEI",
            "CBK", "HNR1", "FRE", "CON", "PAH3", "QIA", "SY1", "ZAL", "MTX", "RHM", "P911", "ENR",
            "HEI", "BNR", "FME", "SRT3",
        ],
    ),
    (
        "TSE",
        "JPY",
        0,
        3000.0,
        &[
            "7203", "6758", "9984", "6861", "8306", "9432", "6098", "8035", "4063", "9983", "6501",
            "7974", "8316", "4502", "6367", "8058", "8001", "6902", "9433", "7267", "4519", "6954",
            "8766", "6594", "4568", "3382", "7741", "6273", "8411", "2914",
        ],
    ),
    (
        "COINBASE",
        "USD",
        6,
        2000.0,
        &[
            "BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "ADA-USD", "DOGE-USD", "AVAX-USD",
            "DOT-USD", "LINK-USD", "LTC-USD", "BCH-USD", "UNI-USD", "ATOM-USD", "XLM-USD",
            "AAVE-USD",
        ],
    ),
    (
        "KRAKEN",
        "EUR",
        6,
        2000.0,
        &[
            "XBT-EUR", "ETH-EUR", "SOL-EUR", "XRP-EUR", "ADA-EUR", "DOT-EUR", "LTC-EUR", "LINK-EUR",
        ],
    ),
];

/// Every instrument the synthetic feed trades.
pub fn instruments() -> Vec<Instrument> {
    VENUES
        .iter()
        .flat_map(|&(exchange, currency, size_decimals, _, tickers)| {
            tickers.iter().map(move |s| Instrument {
                symbol: s.to_string(),
                exchange: exchange.into(),
                currency: currency.into(),
                size_decimals,
            })
        })
        .collect()
}

/// SplitMix64: small, fast, good enough for a feed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    #[inline]
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Book {
    inst: Instrument,
    /// Where its trades and its quotes go (routing rules can part them).
    routes: [Route; 2],
    price: f64,
    tick: f64,
    lot: u32,
}

/// The synthetic feed's `source_id` on a node: FNV-1a of
/// `tickwire-synthetic/<node id>`, folded to 32 bits (never 0), so two
/// nodes' feeds, and the feed and a Pulsar producer, are different sources.
pub fn source_id(node_id: &str) -> u32 {
    use tickwire_proto::layout::{FNV_OFFSET, fnv1a};
    let h = fnv1a(
        fnv1a(FNV_OFFSET, b"tickwire-synthetic/"),
        node_id.as_bytes(),
    );
    ((h ^ (h >> 32)) as u32).max(1)
}

/// Generates the feed's frames; `run` paces them into the broker.
///
/// Every frame carries the feed's [`source_id`] and a `source_seq` that
/// starts at the wall-clock time the generator was made (ns since the Unix
/// epoch) and goes up by one per event. A restarted feed therefore starts
/// far above where the last run ended (unless it sent more than 10^9
/// events per second of its life, or the clock was stepped back by more
/// than the last run lasted), so (`source_id`, `source_seq`) never repeats
/// for two different events: the duplicate rule holds for this source too.
pub struct Generator {
    books: Vec<Book>,
    rng: Rng,
    quote_ratio: f64,
    seq: u64,
    source_id: u32,
}

impl Generator {
    /// Resolves every instrument on `topic` and seeds prices. When the
    /// symbology table fills up, the instruments that fit are traded and
    /// the rest are left out, with an error logged at once.
    ///
    /// # Errors
    /// A symbology error when not one instrument could be resolved.
    pub fn new(
        ingest: &mut Ingest,
        topic: u32,
        seed: u64,
        quote_ratio: f64,
        source_id: u32,
    ) -> Result<Generator, tickwire_proto::Error> {
        let mut rng = Rng::new(seed);
        let mut books = Vec::new();
        let total = instruments().len();
        'venues: for &(exchange, currency, size_decimals, typical, tickers) in VENUES {
            for s in tickers {
                let inst = Instrument {
                    symbol: s.to_string(),
                    exchange: exchange.into(),
                    currency: currency.into(),
                    size_decimals,
                };
                let route = match ingest.resolver().route(topic, &inst) {
                    Ok(r) => r,
                    Err(e @ tickwire_proto::Error::SymbologyFull { .. }) if !books.is_empty() => {
                        tracing::error!(error = %e, served = books.len(), left_out = total - books.len(),
                            "synthetic feed: symbology table is full; trading only the instruments that fit (raise node.symbology_capacity)");
                        break 'venues;
                    }
                    Err(e) => return Err(e),
                };
                let price = typical * (0.2 + 3.0 * rng.unit());
                let tick = if price > 1000.0 {
                    0.5
                } else if price > 10.0 {
                    0.01
                } else {
                    0.001
                };
                let lot = if size_decimals > 0 {
                    10u32.pow(size_decimals as u32) / 100
                } else {
                    100
                };
                books.push(Book {
                    inst,
                    routes: [route, route],
                    price,
                    tick,
                    lot: lot.max(1),
                });
            }
        }
        Ok(Generator {
            books,
            rng,
            quote_ratio,
            seq: realtime_ns(),
            source_id,
        })
    }

    /// The next event and its route.
    #[inline]
    pub fn next_event(&mut self) -> (Route, FrameBody) {
        let i = (self.rng.next_u64() % self.books.len() as u64) as usize;
        let quote = self.rng.unit() < self.quote_ratio;
        let step = (self.rng.unit() - 0.5) * 2.0;
        let rng_lots = 1 + (self.rng.next_u64() % 20) as u32;
        let side = self.rng.next_u64() & 1;
        let b = &mut self.books[i];
        b.price = (b.price + step * b.tick).max(b.tick);
        let px =
            |p: f64, tick: f64| ((p / tick).round() * tick * PRICE_SCALE as f64).round() as i64;
        let now = realtime_ns();
        self.seq += 1;
        let mut body = if quote {
            let bid = px(b.price - b.tick, b.tick);
            let ask = px(b.price + b.tick, b.tick);
            FrameBody::quote(
                b.routes[1].instrument_id,
                now,
                (bid, b.lot * rng_lots),
                (ask, b.lot * (21 - rng_lots)),
            )
        } else {
            let mut t = FrameBody::trade(
                b.routes[0].instrument_id,
                now,
                px(b.price, b.tick),
                b.lot * rng_lots,
            );
            t.flags = if side == 0 {
                FLAG_BUY_AGGRESSOR
            } else {
                FLAG_SELL_AGGRESSOR
            };
            t
        };
        body.source_seq = self.seq;
        body.set_source_id(self.source_id);
        (b.routes[usize::from(quote)], body)
    }

    /// Routes every instrument again under the node's current routing
    /// rules (source name [`SOURCE`]); `topic` is the feed's own.
    ///
    /// # Errors
    /// A symbology error (the instruments are known already, so none is
    /// expected).
    pub fn reroute(
        &mut self,
        ingest: &mut Ingest,
        rules: &mut crate::rules::RuleReader,
        topic: u32,
    ) -> Result<(), tickwire_proto::Error> {
        for b in &mut self.books {
            for (k, kind) in [Kind::Trade, Kind::Quote].into_iter().enumerate() {
                b.routes[k] = rules.route(ingest.resolver(), SOURCE, topic, &b.inst, kind)?;
            }
        }
        Ok(())
    }
}

/// The synthetic feed's source name, as routing rules match it.
pub const SOURCE: &str = "synthetic";

/// Runs the feed until `stop` is cancelled: `rate` events per second (0 = unpaced),
/// waiting when the shards push back. Returns the number of events sent.
/// A change of the node's routing rules applies from the next event.
///
/// # Errors
/// As [`Generator::new`], or a route the broker does not know.
pub fn run(
    mut ingest: Ingest,
    topic: u32,
    cfg: &crate::config::SyntheticConfig,
    source_id: u32,
    mut rules: crate::rules::RuleReader,
    stop: tokio_util::sync::CancellationToken,
) -> Result<u64, tickwire_proto::Error> {
    let rate = cfg.rate;
    let mut generator = Generator::new(&mut ingest, topic, cfg.seed, cfg.quote_ratio, source_id)?;
    let start = Instant::now();
    let mut sent = 0u64;
    while !stop.is_cancelled() {
        if rules.changed() {
            generator.reroute(&mut ingest, &mut rules, topic)?;
        }
        // Pace in 1 ms steps: send what is due, then sleep.
        let due = if rate == 0 {
            sent + 1024
        } else {
            (start.elapsed().as_nanos() as u64).saturating_mul(rate) / 1_000_000_000
        };
        if sent >= due {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        let (route, body) = generator.next_event();
        let mut backoff = 0u32;
        while let Err(e) = ingest.try_send(&route, &body, None) {
            if !e.is_backpressure() {
                return Err(tickwire_proto::Error::Invalid {
                    what: "route",
                    why: e.to_string(),
                });
            }
            if stop.is_cancelled() {
                return Ok(sent);
            }
            backoff += 1;
            if backoff < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        sent += 1;
    }
    Ok(sent)
}

//! Filters select exactly the right events: a property test against a
//! straightforward model of the same rules.

use proptest::prelude::*;
use shm_client::testing::TopicWriter;
use shm_client::{Event, Filter, Kind, Start, Subscriber};
use tickwire_proto::FrameBody;
use tickwire_proto::frame::{PRICE_SCALE, UNDEF_PRICE};

const SYMBOLS: [&str; 4] = ["AAPL", "MSFT", "VOD", "BTC"];
const EXCHANGES: [&str; 3] = ["NASDAQ", "LSE", "COINBASE"];
const CURRENCIES: [&str; 3] = ["USD", "GBP", "EUR"];

#[derive(Debug, Clone)]
struct Ev {
    sym: usize,
    exch: usize,
    ccy: usize,
    quote: bool,
    px: i64,
    px_b: i64,
    size: u32,
    size_b: u32,
}

fn ev() -> impl Strategy<Value = Ev> {
    (
        0..4usize,
        0..3usize,
        0..3usize,
        any::<bool>(),
        1i64..1000,
        prop_oneof![Just(UNDEF_PRICE), 1i64..1000],
        0u32..500,
        0u32..500,
    )
        .prop_map(|(sym, exch, ccy, quote, px, px_b, size, size_b)| Ev {
            sym,
            exch,
            ccy,
            quote,
            px: px * PRICE_SCALE,
            px_b: if px_b == UNDEF_PRICE {
                px_b
            } else {
                px_b * PRICE_SCALE
            },
            size,
            size_b,
        })
}

fn subset<const N: usize>(names: [&'static str; N]) -> impl Strategy<Value = Vec<String>> {
    proptest::sample::subsequence(names.to_vec(), 0..=N)
        .prop_map(|v| v.into_iter().map(String::from).collect())
}

fn filter() -> impl Strategy<Value = Filter> {
    (
        subset(SYMBOLS),
        subset(EXCHANGES),
        subset(CURRENCIES),
        proptest::sample::subsequence(vec![Kind::Trade, Kind::Quote], 0..=2),
        proptest::option::of(0u32..1000),
        proptest::option::of(0u32..1000),
        proptest::option::of(0u64..500),
    )
        .prop_map(
            |(symbols, exchanges, currencies, kinds, lo, hi, vol)| Filter {
                symbols,
                exchanges,
                currencies,
                kinds,
                min_price: lo.map(f64::from),
                max_price: hi.map(f64::from),
                min_volume: vol,
            },
        )
}

/// The rules, written plainly.
fn model(f: &Filter, e: &Ev) -> bool {
    let in_list = |l: &[String], v: &str| l.is_empty() || l.iter().any(|x| x == v);
    let kind = if e.quote { Kind::Quote } else { Kind::Trade };
    let price = if e.quote {
        if e.px_b == UNDEF_PRICE {
            e.px
        } else {
            (e.px + e.px_b) / 2
        }
    } else {
        e.px
    };
    let size = if e.quote {
        e.size.max(e.size_b)
    } else {
        e.size
    };
    in_list(&f.symbols, SYMBOLS[e.sym])
        && in_list(&f.exchanges, EXCHANGES[e.exch])
        && in_list(&f.currencies, CURRENCIES[e.ccy])
        && (f.kinds.is_empty() || f.kinds.contains(&kind))
        && f.min_price
            .is_none_or(|m| price >= (m * PRICE_SCALE as f64) as i64)
        && f.max_price
            .is_none_or(|m| price <= (m * PRICE_SCALE as f64) as i64)
        && f.min_volume.is_none_or(|m| size as u64 >= m)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn filters_select_exactly_the_matching_events(events in proptest::collection::vec(ev(), 1..200), f in filter()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = TopicWriter::create(dir.path(), "filter/test", 1, 256).expect("writer");
        let mut expected = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let id = w.instrument(SYMBOLS[e.sym], EXCHANGES[e.exch], CURRENCIES[e.ccy]).expect("id");
            let b = if e.quote { FrameBody::quote(id, i as u64, (e.px, e.size), (e.px_b, e.size_b)) } else { FrameBody::trade(id, i as u64, e.px, e.size) };
            let seq = w.publish(0, &b);
            if model(&f, e) {
                expected.push(seq);
            }
        }
        w.flush();
        let bad_range = matches!((f.min_price, f.max_price), (Some(lo), Some(hi)) if lo > hi);
        let opened = Subscriber::builder("filter/test").node_dir(dir.path()).start(Start::Sequence(1)).filter(f.clone()).open();
        if bad_range {
            prop_assert!(opened.is_err(), "min above max must be refused");
            return Ok(());
        }
        let mut sub = opened.expect("sub");
        let mut got = Vec::new();
        sub.poll(10_000, |e| if let Event::Tick(t) = e { got.push(t.seq) });
        prop_assert_eq!(got, expected);
    }
}

#[test]
fn instruments_added_after_the_subscriber_opened_are_filtered_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = TopicWriter::create(dir.path(), "filter/late", 1, 64).expect("writer");
    w.instrument("AAPL", "NASDAQ", "USD").expect("id");
    let mut sub = Subscriber::builder("filter/late")
        .node_dir(dir.path())
        .start(Start::Sequence(1))
        .filter(Filter::default().exchanges(["LSE"]))
        .open()
        .expect("sub");
    let vod = w.instrument("VOD", "LSE", "GBP").expect("id");
    let msft = w.instrument("MSFT", "NASDAQ", "USD").expect("id");
    w.publish(0, &FrameBody::trade(msft, 1, 1, 1));
    w.publish(0, &FrameBody::trade(vod, 2, 1, 1));
    w.flush();
    let mut got = Vec::new();
    sub.poll(10, |e| {
        if let Event::Tick(t) = e {
            got.push(t.symbol().map(String::from))
        }
    });
    assert_eq!(got, vec![Some("VOD".to_string())]);
}

//! Routes to `n` instruments (`SYM0`.. on XNAS, USD) of a topic, for tests
//! that drive the engine through its ingest API.

use tickwire_broker::engine::Ingest;
use tickwire_broker::router::Route;
use tickwire_proto::symbology::Instrument;

pub fn routes(ingest: &mut Ingest, topic: &str, n: usize) -> Vec<Route> {
    let topic = ingest.resolver().topic(topic).expect("topic");
    (0..n)
        .map(|i| {
            let inst = Instrument {
                symbol: format!("SYM{i}"),
                exchange: "XNAS".into(),
                currency: "USD".into(),
                size_decimals: 0,
            };
            ingest.resolver().route(topic, &inst).expect("route")
        })
        .collect()
}

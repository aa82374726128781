//! Routing: instrument -> symbology id, routing key -> partition -> shard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tickwire_proto::Kind;
use tickwire_proto::symbology::{Instrument, SymbologyWriter};

use crate::engine::{Layout, Placement};
use crate::versioned::View;

/// A parsed routing-key template such as `{symbol}.{exchange}.{kind}`.
/// In the configuration it is a string, parsed once when the file is read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct RoutingTemplate {
    source: String,
    parts: Vec<Part>,
}

/// Why a routing-key template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template is the empty string.
    #[error("routing key template is empty")]
    Empty,
    /// A `{` with no `}` after it.
    #[error("{template:?}: '{{' without '}}'")]
    Unclosed {
        /// The template.
        template: String,
    },
    /// A placeholder that is not one of the four.
    #[error(
        "{template:?}: unknown placeholder {{{name}}} (use {{symbol}}, {{exchange}}, {{currency}}, {{kind}})"
    )]
    UnknownPlaceholder {
        /// The template.
        template: String,
        /// The placeholder's name.
        name: String,
    },
}

impl TryFrom<String> for RoutingTemplate {
    type Error = TemplateError;
    fn try_from(s: String) -> Result<Self, TemplateError> {
        RoutingTemplate::parse(&s)
    }
}

impl std::fmt::Display for RoutingTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

impl Default for RoutingTemplate {
    /// `{symbol}.{exchange}.{kind}`: one instrument's trades and quotes each
    /// keep their order.
    fn default() -> Self {
        RoutingTemplate {
            source: "{symbol}.{exchange}.{kind}".into(),
            parts: vec![
                Part::Symbol,
                Part::Lit(".".into()),
                Part::Exchange,
                Part::Lit(".".into()),
                Part::Kind,
            ],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Symbol,
    Exchange,
    Currency,
    Kind,
}

impl RoutingTemplate {
    /// Parses a template; placeholders are `{symbol}`, `{exchange}`,
    /// `{currency}` and `{kind}`.
    ///
    /// # Errors
    /// [`TemplateError`] naming the unknown placeholder or the unclosed brace.
    pub fn parse(t: &str) -> Result<RoutingTemplate, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = t;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(TemplateError::Unclosed { template: t.into() });
            };
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "symbol" => Part::Symbol,
                "exchange" => Part::Exchange,
                "currency" => Part::Currency,
                "kind" => Part::Kind,
                other => {
                    return Err(TemplateError::UnknownPlaceholder {
                        template: t.into(),
                        name: other.into(),
                    });
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        if parts.is_empty() {
            return Err(TemplateError::Empty);
        }
        Ok(RoutingTemplate {
            source: t.into(),
            parts,
        })
    }

    /// The rendered key, e.g. `AAPL.NASDAQ.trade`.
    pub fn render(&self, inst: &Instrument, kind: Kind) -> String {
        let mut s = String::new();
        for p in &self.parts {
            s.push_str(match p {
                Part::Lit(l) => l,
                Part::Symbol => &inst.symbol,
                Part::Exchange => &inst.exchange,
                Part::Currency => &inst.currency,
                Part::Kind => kind.name(),
            });
        }
        s
    }

    /// The partition of a key: FNV-1a of the rendered key, mod `partitions`.
    pub fn partition(&self, inst: &Instrument, kind: Kind, partitions: u32) -> u32 {
        (tickwire_proto::layout::topic_hash(&self.render(inst, kind)) % partitions as u64) as u32
    }
}

/// Where one instrument's events go on one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Topic index in the configuration.
    pub topic: u32,
    /// Symbology id.
    pub instrument_id: u32,
    /// Partition for each kind (indexed by `Kind::code() - 1`).
    pub partitions: [u32; 2],
}

impl Route {
    /// The partition for a kind.
    #[inline]
    pub fn partition(&self, kind: Kind) -> u32 {
        self.partitions[(kind.code() - 1) as usize]
    }
}

/// Resolves instruments and routing keys against the node's topics as they
/// are now. Clones share the symbology writer (the one writer of the table,
/// behind a mutex taken only for instruments this clone has not seen) and
/// keep their own cache, emptied when the topics change.
pub struct Resolver {
    layout: View<Layout>,
    symbology: Arc<Mutex<SymbologyWriter>>,
    // symbol -> [(exchange, currency, route)]: looked up by &str, no
    // allocation once an instrument is known.
    cache: HashMap<String, Vec<(String, String, Route)>>,
}

impl Clone for Resolver {
    fn clone(&self) -> Self {
        Resolver {
            layout: self.layout.clone(),
            symbology: self.symbology.clone(),
            cache: HashMap::new(),
        }
    }
}

impl Resolver {
    pub(crate) fn new(layout: View<Layout>, symbology: Arc<Mutex<SymbologyWriter>>) -> Self {
        Resolver {
            layout,
            symbology,
            cache: HashMap::new(),
        }
    }

    /// Takes the newest topics; cached routes go when they change (a topic
    /// that grew routes keys over more partitions).
    #[inline]
    fn refresh(&mut self) {
        if self.layout.refresh() {
            self.cache.clear();
        }
    }

    /// The index of a live topic by name.
    pub fn topic(&mut self, name: &str) -> Option<u32> {
        self.refresh();
        self.layout.get().index(name)
    }

    /// A live topic's partition count now.
    pub fn partitions(&mut self, topic: u32) -> Option<u32> {
        self.refresh();
        self.layout.get().topic(topic).map(|t| t.partitions)
    }

    #[inline]
    pub(crate) fn placement(&mut self, topic: u32, partition: u32) -> Option<Placement> {
        self.refresh();
        self.layout.get().placement(topic, partition)
    }

    /// The routing key an event of `inst` and `kind` has on a topic, with
    /// that topic's template (None for an unknown topic index).
    pub fn routing_key(&mut self, topic: u32, inst: &Instrument, kind: Kind) -> Option<String> {
        self.refresh();
        self.layout
            .get()
            .topic(topic)
            .map(|t| t.template.render(inst, kind))
    }

    /// The route of an instrument on a topic, resolving it in symbology the
    /// first time.
    ///
    /// # Errors
    /// Invalid names, a full symbology table, a topic index that is not a
    /// live topic (never configured, or deleted).
    pub fn route(&mut self, topic: u32, inst: &Instrument) -> Result<Route, tickwire_proto::Error> {
        self.refresh();
        if let Some(r) = self.cached(topic, &inst.symbol, &inst.exchange, &inst.currency) {
            return Ok(r);
        }
        let Some(t) = self.layout.get().topic(topic) else {
            return Err(tickwire_proto::Error::Invalid {
                what: "topic",
                why: format!(
                    "index {topic} is not a topic of this node (never created, or deleted)"
                ),
            });
        };
        let partitions = [
            t.template.partition(inst, Kind::Trade, t.partitions),
            t.template.partition(inst, Kind::Quote, t.partitions),
        ];
        inst.validate()?;
        let id = {
            let mut s = self.symbology.lock().unwrap_or_else(|p| p.into_inner());
            let id = s.resolve(inst)?;
            if let Some(why) = s.copy_failure() {
                tracing::error!("symbology: {why}");
            }
            id
        };
        let route = Route {
            topic,
            instrument_id: id,
            partitions,
        };
        self.cache.entry(inst.symbol.clone()).or_default().push((
            inst.exchange.clone(),
            inst.currency.clone(),
            route,
        ));
        Ok(route)
    }

    /// The route of an instrument seen before, without allocating.
    #[inline]
    fn cached(&self, topic: u32, symbol: &str, exchange: &str, currency: &str) -> Option<Route> {
        self.cache
            .get(symbol)?
            .iter()
            .find(|(e, c, r)| r.topic == topic && e == exchange && c == currency)
            .map(|(_, _, r)| *r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_reject_unknown_placeholders() {
        let t = RoutingTemplate::parse("{symbol}.{exchange}.{kind}").expect("parse");
        let i = Instrument {
            symbol: "AAPL".into(),
            exchange: "NASDAQ".into(),
            currency: "USD".into(),
            size_decimals: 0,
        };
        assert_eq!(t.render(&i, Kind::Trade), "AAPL.NASDAQ.trade");
        assert_eq!(t, RoutingTemplate::default());
        assert!(t.partition(&i, Kind::Trade, 8) < 8);
        assert!(RoutingTemplate::parse("{symbol}.{venue}").is_err());
        assert!(RoutingTemplate::parse("{symbol").is_err());
    }
}

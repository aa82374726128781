//! Routing rules (the spec's `routing_rules` table): which topic, and which
//! routing key, an event from a source goes to.
//!
//! A rule matches a source by a glob (`*` any run of characters, `?` one)
//! over the source's name (a Pulsar topic such as
//! `persistent://public/default/md-us`, or `synthetic`), plus optional
//! conditions on the event (symbols, exchanges, currencies, kinds; empty
//! means any). Enabled rules are tried highest `priority` first (ties by
//! name); the first match decides the target topic and, when it has one,
//! the routing-key template that picks the partition. No match: the
//! source's configured topic and that topic's own template.
//!
//! The edge replaces the whole set at run time ([`RuleTable::replace`]);
//! senders look at a version number per event (one atomic load) and take
//! the new set when it changed, so a change applies to the next event.

use std::sync::Arc;

use tickwire_proto::Kind;
use tickwire_proto::symbology::Instrument;

use crate::router::{Resolver, Route, RoutingTemplate};

/// A rule as an operator writes it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuleSpec {
    /// Unique name.
    pub name: String,
    /// Glob over the source name.
    pub source_pattern: String,
    /// Target topic (a configured topic).
    pub target_topic: String,
    /// Routing-key template (`{symbol}`, `{exchange}`, `{currency}`,
    /// `{kind}`); empty keeps the target topic's own.
    pub routing_key_template: String,
    /// Symbols the event must have (empty: any).
    pub symbols: Vec<String>,
    /// Exchanges (empty: any).
    pub exchanges: Vec<String>,
    /// Currencies (empty: any).
    pub currencies: Vec<String>,
    /// `trade`, `quote` (empty: any).
    pub kinds: Vec<String>,
    /// Higher first.
    pub priority: i64,
    /// Off rules are kept but not applied.
    pub enabled: bool,
}

/// Why a rule was refused: the field and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct RuleError {
    /// The offending field.
    pub field: String,
    /// Why.
    pub why: String,
}

fn err(field: &str, why: impl Into<String>) -> RuleError {
    RuleError {
        field: field.into(),
        why: why.into(),
    }
}

#[derive(Debug)]
struct Rule {
    name: String,
    priority: i64,
    pattern: Vec<u8>,
    target: u32,
    template: Option<RoutingTemplate>,
    symbols: Vec<String>,
    exchanges: Vec<String>,
    currencies: Vec<String>,
    kinds: Vec<Kind>,
}

/// A compiled, ordered set of enabled rules.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

/// Glob match: `*` any run, `?` any one byte.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

fn any_or(list: &[String], v: &str) -> bool {
    list.is_empty() || list.iter().any(|x| x.eq_ignore_ascii_case(v))
}

impl RuleSet {
    /// Compiles `specs` against the broker's live topics (`topics`: name
    /// and topic index); disabled rules are checked too, then left out.
    ///
    /// # Errors
    /// The first bad rule: `rules[i].<field>` and why.
    pub fn compile(specs: &[RuleSpec], topics: &[(String, u32)]) -> Result<RuleSet, RuleError> {
        let mut rules = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let f = |name: &str| format!("rules[{i}].{name}");
            if s.name.is_empty() || s.name.len() > 100 {
                return Err(err(&f("rule_name"), "a name of 1 to 100 bytes is required"));
            }
            if s.source_pattern.is_empty() || s.source_pattern.len() > 200 {
                return Err(err(
                    &f("source_pattern"),
                    "a pattern of 1 to 200 bytes is required",
                ));
            }
            let Some(target) = topics.iter().find(|t| t.0 == s.target_topic).map(|t| t.1) else {
                return Err(err(
                    &f("target_topic"),
                    format!("{:?} is not one of this node's topics", s.target_topic),
                ));
            };
            let template = if s.routing_key_template.is_empty() {
                None
            } else {
                Some(
                    RoutingTemplate::try_from(s.routing_key_template.clone())
                        .map_err(|e| err(&f("routing_key_template"), e.to_string()))?,
                )
            };
            let mut kinds = Vec::new();
            for (k, name) in s.kinds.iter().enumerate() {
                kinds.push(match name.to_ascii_lowercase().as_str() {
                    "trade" => Kind::Trade,
                    "quote" => Kind::Quote,
                    _ => {
                        return Err(err(
                            &f(&format!("conditions.kinds[{k}]")),
                            format!("{name:?} is not trade or quote"),
                        ));
                    }
                });
            }
            if s.enabled {
                rules.push(Rule {
                    name: s.name.clone(),
                    priority: s.priority,
                    pattern: s.source_pattern.as_bytes().to_vec(),
                    target,
                    template,
                    symbols: s.symbols.clone(),
                    exchanges: s.exchanges.clone(),
                    currencies: s.currencies.clone(),
                    kinds,
                });
            }
        }
        rules.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        Ok(RuleSet { rules })
    }

    /// The first rule for an event of `inst` and `kind` from `source`.
    fn find(&self, source: &str, inst: &Instrument, kind: Kind) -> Option<&Rule> {
        self.rules.iter().find(|r| {
            glob(&r.pattern, source.as_bytes())
                && any_or(&r.symbols, &inst.symbol)
                && any_or(&r.exchanges, &inst.exchange)
                && any_or(&r.currencies, &inst.currency)
                && (r.kinds.is_empty() || r.kinds.contains(&kind))
        })
    }

    /// Enabled rules, in the order they are tried.
    pub fn names(&self) -> Vec<&str> {
        self.rules.iter().map(|r| r.name.as_str()).collect()
    }
}

/// The node's current rule set, replaced as a whole
/// ([`Versioned::replace`](crate::versioned::Versioned::replace)).
pub type RuleTable = crate::versioned::Versioned<RuleSet>;

impl RuleTable {
    /// A sender's view of the table; it reports a change at once, so a
    /// sender routes what it set up before under the rules in force.
    pub fn reader(self: &Arc<Self>) -> RuleReader {
        let mut view = self.view();
        view.mark_stale();
        RuleReader { view }
    }
}

/// What a sender holds: the set it last took and its version.
#[derive(Debug)]
pub struct RuleReader {
    view: crate::versioned::View<RuleSet>,
}

impl RuleReader {
    /// Whether the table changed since this reader last routed.
    #[inline]
    pub fn changed(&self) -> bool {
        self.view.changed()
    }

    /// The route of an event of `inst` and `kind` from `source`: the first
    /// matching rule's target (and template, over the target's partitions
    /// as they are now), else `default_topic` with its own template.
    ///
    /// # Errors
    /// The instrument is invalid, the symbology table is full, or the
    /// target topic was deleted.
    pub fn route(
        &mut self,
        resolver: &mut Resolver,
        source: &str,
        default_topic: u32,
        inst: &Instrument,
        kind: Kind,
    ) -> Result<Route, tickwire_proto::Error> {
        self.view.refresh();
        let Some(rule) = self.view.get().find(source, inst, kind) else {
            return resolver.route(default_topic, inst);
        };
        let mut route = resolver.route(rule.target, inst)?;
        if let Some(t) = &rule.template {
            let partitions = resolver.partitions(rule.target).unwrap_or(1);
            route.partitions = [
                t.partition(inst, Kind::Trade, partitions),
                t.partition(inst, Kind::Quote, partitions),
            ];
        }
        Ok(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Vec<(String, u32)> {
        vec![("a".into(), 0), ("b".into(), 1)]
    }

    fn rule(name: &str, pattern: &str, target: &str, priority: i64) -> RuleSpec {
        RuleSpec {
            name: name.into(),
            source_pattern: pattern.into(),
            target_topic: target.into(),
            priority,
            enabled: true,
            ..RuleSpec::default()
        }
    }

    fn inst(symbol: &str) -> Instrument {
        Instrument {
            symbol: symbol.into(),
            exchange: "NASDAQ".into(),
            currency: "USD".into(),
            size_decimals: 0,
        }
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob(
            b"persistent://public/default/md-*",
            b"persistent://public/default/md-us"
        ));
        assert!(glob(b"*md-??", b"persistent://x/md-us"));
        assert!(!glob(b"*md-??", b"persistent://x/md-usa"));
        assert!(glob(b"*", b""));
        assert!(!glob(b"synthetic", b"synthetic2"));
    }

    #[test]
    fn the_highest_priority_matching_rule_wins_and_conditions_narrow() {
        let mut only_aapl = rule("aapl", "*", "b", 1);
        only_aapl.symbols = vec!["aapl".into()];
        let set = RuleSet::compile(
            &[
                rule("low", "md-*", "a", 0),
                only_aapl,
                rule("off", "*", "a", 9),
            ]
            .map(|mut r| {
                if r.name == "off" {
                    r.enabled = false;
                }
                r
            }),
            &topics(),
        )
        .expect("compiles");
        assert_eq!(set.names(), ["aapl", "low"]);
        let hit = |s: &str, sym: &str| set.find(s, &inst(sym), Kind::Trade).map(|r| r.target);
        assert_eq!(
            hit("md-us", "AAPL"),
            Some(1),
            "case-insensitive symbol, higher priority"
        );
        assert_eq!(hit("md-us", "MSFT"), Some(0));
        assert_eq!(hit("other", "MSFT"), None);
    }

    #[test]
    fn a_bad_rule_names_its_field() {
        let mut bad = rule("x", "*", "nope", 1);
        let e = RuleSet::compile(std::slice::from_ref(&bad), &topics()).expect_err("topic");
        assert_eq!(e.field, "rules[0].target_topic");
        bad.target_topic = "a".into();
        bad.routing_key_template = "{sym}".into();
        let e = RuleSet::compile(std::slice::from_ref(&bad), &topics()).expect_err("template");
        assert_eq!(e.field, "rules[0].routing_key_template");
        bad.routing_key_template = String::new();
        bad.kinds = vec!["bar".into()];
        let e = RuleSet::compile(std::slice::from_ref(&bad), &topics()).expect_err("kind");
        assert_eq!(e.field, "rules[0].conditions.kinds[0]");
    }
}

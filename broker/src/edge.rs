//! The engine as the remote edge sees it ([`tickwire_api::Engine`]).

use std::path::PathBuf;

use tickwire_api::{ApiError, Engine, TopicDesc};

use crate::config::Config;
use crate::engine::{BrokerError, TopicOrigin};
use crate::rules::{RuleSet, RuleSpec};
use crate::topics::{TopicControl, TopicError, TopicInfo, TopicSpec};

/// The broker's topics, node directory and routing rules, for the edge.
pub struct BrokerEngine {
    node_dir: PathBuf,
    config: Config,
    rules: std::sync::Arc<crate::rules::RuleTable>,
    topics: std::sync::Arc<TopicControl>,
    journal: Option<std::sync::Arc<crate::journal::Journal>>,
    bars: Option<std::sync::Arc<crate::bars::Bars>>,
    /// The edge's own source ([`Engine::publish`]: dead letters).
    publisher: std::sync::Mutex<Publisher>,
}

/// What [`Engine::publish`] sends with: its ingest handle, and the node's
/// instruments by id (opened on first use).
struct Publisher {
    ingest: crate::engine::Ingest,
    symbology: Option<tickwire_proto::symbology::Symbology>,
}

/// How long [`Engine::publish`] waits for shards that push back.
const PUBLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl tickwire_api::bars::OpenBars for crate::bars::Bars {
    fn open_minutes(
        &self,
        topic: &str,
    ) -> Vec<(u32, std::sync::Arc<tickwire_proto::bars::OpenMinutes>)> {
        crate::bars::Bars::open_minutes(self, topic)
    }
}

/// 5m/1h/1d bars with Polars (`tickwire-history`).
#[cfg(feature = "history")]
struct PolarsResampler;

#[cfg(feature = "history")]
impl tickwire_api::bars::Resampler for PolarsResampler {
    fn resample(
        &self,
        minutes: &[tickwire_proto::bars::Bar],
        interval: tickwire_proto::bars::Interval,
    ) -> Result<Vec<tickwire_proto::bars::Bar>, String> {
        tickwire_history::resample(minutes, interval).map_err(|e| e.to_string())
    }
}

fn desc(t: &TopicInfo) -> TopicDesc {
    TopicDesc {
        name: t.name.clone(),
        partitions: t.partitions,
        capacity: t.capacity,
        runtime: t.origin == TopicOrigin::Runtime,
        retention: t.retention,
    }
}

/// The edge's error for a refused topic change. Paths and OS errors are
/// logged, not sent.
fn api_error(name: &str, e: TopicError) -> ApiError {
    match e {
        TopicError::Invalid { field, why } => ApiError::invalid(field, why),
        TopicError::Exists(n) => ApiError::AlreadyExists {
            what: "topic",
            name: n,
        },
        TopicError::NotFound(n) => ApiError::NotFound {
            what: "topic",
            name: n,
        },
        TopicError::Conflict(why) => ApiError::Conflict(why),
        TopicError::Broker(BrokerError::Shm(tickwire_proto::Error::Mismatch {
            what,
            on_disk,
            requested,
            ..
        })) => ApiError::Conflict(format!(
            "rings of topic {name} are left on the node with {what} {on_disk}, not {requested}: ask for that, or remove them"
        )),
        TopicError::Broker(e @ BrokerError::NoSpace { .. }) => {
            tracing::warn!(topic = name, error = %e, "no room for a topic's rings");
            ApiError::Unavailable(format!("no room on the node for the rings of topic {name}"))
        }
        TopicError::Broker(e) => {
            tracing::error!(topic = name, error = %e, "a topic's rings could not be made");
            ApiError::Unavailable(format!(
                "the rings of topic {name} could not be made (the broker log says why)"
            ))
        }
        TopicError::Unavailable(why) => ApiError::Unavailable(why),
    }
}

impl BrokerEngine {
    /// For a running broker.
    pub fn new(broker: &crate::engine::Broker) -> BrokerEngine {
        BrokerEngine {
            node_dir: broker.node_dir().to_path_buf(),
            config: broker.config().clone(),
            rules: broker.rules(),
            topics: broker.topics(),
            journal: broker.journal(),
            bars: broker.bars(),
            publisher: std::sync::Mutex::new(Publisher {
                ingest: broker.ingest(1),
                symbology: None,
            }),
        }
    }
}

impl Engine for BrokerEngine {
    fn node_dir(&self) -> PathBuf {
        self.node_dir.clone()
    }

    fn topics(&self) -> Vec<TopicDesc> {
        self.topics.list().iter().map(desc).collect()
    }

    fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        capacity: Option<u64>,
        retention: Option<std::time::Duration>,
    ) -> Result<TopicDesc, ApiError> {
        self.topics
            .create(&TopicSpec {
                name: name.into(),
                partitions,
                capacity,
                template: None,
                retention,
            })
            .map(|t| desc(&t))
            .map_err(|e| api_error(name, e))
    }

    fn publish(
        &self,
        topic: &str,
        events: &[[u64; tickwire_proto::frame::BODY_WORDS]],
    ) -> Result<(), ApiError> {
        let mut p = self.publisher.lock().unwrap_or_else(|p| p.into_inner());
        let Publisher { ingest, symbology } = &mut *p;
        let Some(index) = ingest.resolver().topic(topic) else {
            return Err(ApiError::NotFound {
                what: "topic",
                name: topic.to_string(),
            });
        };
        let sym = match symbology {
            Some(s) => s,
            None => symbology.insert(
                tickwire_proto::symbology::Symbology::open(&self.node_dir).map_err(|e| {
                    tracing::error!(error = %e, "publish: the symbology table cannot be read");
                    ApiError::Unavailable("the node's instrument table cannot be read".into())
                })?,
            ),
        };
        for words in events {
            let body = tickwire_proto::FrameBody::from_words(words);
            let Some(e) = sym.get(body.instrument_id) else {
                return Err(ApiError::invalid(
                    "instrument_id",
                    format!("{} is not an instrument of this node", body.instrument_id),
                ));
            };
            let inst = tickwire_proto::symbology::Instrument {
                symbol: e.symbol().into(),
                exchange: e.exchange().into(),
                currency: e.currency().into(),
                size_decimals: e.size_decimals(),
            };
            let route = ingest
                .resolver()
                .route(index, &inst)
                .map_err(|e| ApiError::invalid("instrument", e.to_string()))?;
            let deadline = std::time::Instant::now() + PUBLISH_WAIT;
            loop {
                match ingest.try_send(&route, &body, None) {
                    Ok(()) => break,
                    Err(e) if e.is_backpressure() && std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_micros(100));
                    }
                    Err(e) => {
                        return Err(ApiError::Unavailable(format!(
                            "topic {topic} takes no events now: {e}"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn grow_topic(&self, name: &str, partitions: u32) -> Result<TopicDesc, ApiError> {
        self.topics
            .grow(name, partitions)
            .map(|t| desc(&t))
            .map_err(|e| api_error(name, e))
    }

    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let Some(j) = &self.journal else {
            return Vec::new();
        };
        let s = j.stats();
        let mut out = vec![
            (
                "tickwire_journal_events_total",
                "Events written to the journal.",
                s.events,
            ),
            (
                "tickwire_journal_bytes_total",
                "Bytes written to the journal.",
                s.bytes,
            ),
            (
                "tickwire_journal_write_errors_total",
                "Journal writes that failed (each retried; ingest waits meanwhile).",
                s.write_errors,
            ),
            (
                "tickwire_journal_syncs_total",
                "fdatasyncs of journal segments completed.",
                s.syncs,
            ),
            (
                "tickwire_journal_sync_errors_total",
                "fdatasyncs of journal segments that failed (written, but maybe not through a power loss).",
                s.sync_errors,
            ),
            (
                "tickwire_journal_segments_deleted_total",
                "Journal segments deleted by retention.",
                s.segments_deleted,
            ),
            (
                "tickwire_journal_gap_events_total",
                "Events never journaled: the ring had moved past the journal when it started.",
                s.gap_frames,
            ),
        ];
        if let Some(b) = &self.bars {
            let c = b.counters();
            let r = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            out.extend([
                (
                    "tickwire_bars_events_total",
                    "Events folded into one-minute bars.",
                    r(&c.events),
                ),
                (
                    "tickwire_bars_written_total",
                    "One-minute bars written to the bar store.",
                    r(&c.bars),
                ),
                (
                    "tickwire_bars_late_events_total",
                    "Events left out of bars: their minute had been written (history.lateness).",
                    r(&c.late),
                ),
                (
                    "tickwire_bars_future_events_total",
                    "Events left out of bars: stamped too far ahead of the clock (history.max_skew).",
                    r(&c.future),
                ),
                (
                    "tickwire_bars_expired_total",
                    "Bars deleted by the retention (history.retention).",
                    r(&c.expired),
                ),
                (
                    "tickwire_bars_errors_total",
                    "Bar builder errors (a journal it cannot read, bars it cannot write).",
                    r(&c.errors),
                ),
            ]);
        }
        out
    }

    fn delete_topic(&self, name: &str) -> Result<(), ApiError> {
        self.topics.delete(name).map_err(|e| api_error(name, e))
    }

    fn set_routing_rules(
        &self,
        rules: &[tickwire_api::RoutingRule],
        dry_run: bool,
    ) -> Result<(), (String, String)> {
        let specs: Vec<RuleSpec> = rules
            .iter()
            .map(|r| RuleSpec {
                name: r.rule_name.clone(),
                source_pattern: r.source_pattern.clone(),
                target_topic: r.target_topic.clone(),
                routing_key_template: r.routing_key_template.clone().unwrap_or_default(),
                symbols: r.conditions.symbols.clone(),
                exchanges: r.conditions.exchanges.clone(),
                currencies: r.conditions.currencies.clone(),
                kinds: r.conditions.kinds.clone(),
                priority: r.priority,
                enabled: r.enabled,
            })
            .collect();
        let topics: Vec<(String, u32)> = self
            .topics
            .layout()
            .live()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let set = RuleSet::compile(&specs, &topics).map_err(|e| (e.field, e.why))?;
        if !dry_run {
            tracing::info!(rules = ?set.names(), "routing rules in force");
            self.rules.replace(set);
        }
        Ok(())
    }

    /// The synthetic feed's topic when it is on, else the first topic.
    fn bars_dir(&self) -> Option<PathBuf> {
        (self.bars.is_some()).then(|| tickwire_api::bars::bar_dir(&self.config.journal_dir()))
    }

    fn open_bars(&self) -> Option<std::sync::Arc<dyn tickwire_api::bars::OpenBars>> {
        self.bars
            .clone()
            .map(|b| b as std::sync::Arc<dyn tickwire_api::bars::OpenBars>)
    }

    fn resampler(&self) -> Option<std::sync::Arc<dyn tickwire_api::bars::Resampler>> {
        #[cfg(feature = "history")]
        {
            Some(std::sync::Arc::new(PolarsResampler))
        }
        #[cfg(not(feature = "history"))]
        {
            None
        }
    }

    fn default_topic(&self) -> String {
        if self.config.synthetic.enabled {
            return self.config.synthetic.topic.clone();
        }
        self.config.topics.first().map_or_else(
            || crate::config::DEFAULT_TOPIC.to_string(),
            |t| t.name.clone(),
        )
    }
}

//! The engine as the remote edge sees it ([`tickwire_api::Engine`]).

use std::path::PathBuf;

use tickwire_api::{Engine, TopicDesc};

use crate::config::Config;
use crate::rules::{RuleSet, RuleSpec};

/// The broker's topics, node directory and routing rules, for the edge.
pub struct BrokerEngine {
    node_dir: PathBuf,
    config: Config,
    rules: std::sync::Arc<crate::rules::RuleTable>,
}

impl BrokerEngine {
    /// For a running broker.
    pub fn new(broker: &crate::engine::Broker) -> BrokerEngine {
        BrokerEngine {
            node_dir: broker.node_dir().to_path_buf(),
            config: broker.config().clone(),
            rules: broker.rules(),
        }
    }
}

impl Engine for BrokerEngine {
    fn node_dir(&self) -> PathBuf {
        self.node_dir.clone()
    }

    fn topics(&self) -> Vec<TopicDesc> {
        self.config
            .topics
            .iter()
            .map(|t| TopicDesc {
                name: t.name.clone(),
                partitions: t.partitions,
                capacity: t.capacity,
            })
            .collect()
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
            .config
            .topics
            .iter()
            .map(|t| (t.name.clone(), t.partitions))
            .collect();
        let set = RuleSet::compile(&specs, &topics).map_err(|e| (e.field, e.why))?;
        if !dry_run {
            tracing::info!(rules = ?set.names(), "routing rules in force");
            self.rules.replace(set);
        }
        Ok(())
    }

    /// The synthetic feed's topic when it is on, else the first topic.
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

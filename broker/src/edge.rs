//! The engine as the remote edge sees it ([`tickwire_api::Engine`]).

use std::path::PathBuf;

use tickwire_api::{Engine, TopicDesc};

use crate::config::Config;

/// The broker's topics and node directory, for the edge.
pub struct BrokerEngine {
    node_dir: PathBuf,
    config: Config,
}

impl BrokerEngine {
    /// For a running broker's configuration and node directory.
    pub fn new(config: &Config, node_dir: PathBuf) -> BrokerEngine {
        BrokerEngine {
            node_dir,
            config: config.clone(),
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

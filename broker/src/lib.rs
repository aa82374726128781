//! tickwire's engine: shards that own partition rings, the router in front
//! of them, the synthetic feed, and the pieces the `tickwire` binary
//! assembles. Nothing depends on this crate.
//!
//! ```no_run
//! use tickwire_broker::{config::Config, engine::Broker};
//! let broker = Broker::start(&Config::default())?;
//! let mut ingest = broker.ingest(1024);
//! // ... resolve a route, ingest.try_send(&route, &body, Some(token)) ...
//! broker.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bars;
pub mod config;
pub mod consume;
pub mod edge;
pub mod engine;
#[cfg(feature = "history")]
pub mod export;
pub mod journal;
pub mod pulsar;
pub mod router;
pub mod rules;
pub mod synthetic;
pub mod tail;
pub mod topics;
pub mod versioned;

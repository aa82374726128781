//! Where the bridge puts events: a trait the broker implements over its
//! ingest API, so this crate does not depend on the broker.

use crate::payload::MarketEvent;

/// Why a sink did not take an event.
#[derive(Debug)]
pub enum SinkError {
    /// Full: stop pulling, drain completions, retry.
    Backpressure,
    /// The event can never be taken (bad instrument, full symbology...): it
    /// goes to the dead-letter topic with this reason.
    Rejected(Box<dyn std::error::Error + Send + Sync>),
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkError::Backpressure => f.write_str("the sink is full"),
            SinkError::Rejected(e) => write!(f, "rejected: {e}"),
        }
    }
}

impl std::error::Error for SinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SinkError::Backpressure => None,
            SinkError::Rejected(e) => Some(&**e),
        }
    }
}

/// Where the bridge puts events: the broker implements it over its ingest.
pub trait Sink: Send {
    /// Sends one event; `token` comes back through [`drain`](Sink::drain)
    /// once the event is committed. `source` is the Pulsar topic (partition)
    /// it came from, which routing rules match; `source_id`/`source_seq`
    /// identify the event at its source (dedup key across redeliveries and
    /// nodes).
    ///
    /// # Errors
    /// [`SinkError`].
    fn try_send(
        &mut self,
        event: &MarketEvent,
        source: &str,
        source_id: u32,
        source_seq: u64,
        token: u64,
    ) -> Result<(), SinkError>;
    /// Calls `done` for every event committed since the last call.
    fn drain(&mut self, done: &mut dyn FnMut(Committed));
    /// The routing key the sink routed `event` by, rendered with its
    /// topic's template (for the output events; called only for sampled
    /// messages).
    fn routing_key(&mut self, event: &MarketEvent) -> String;
}

/// Where a committed event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The token given to [`Sink::try_send`].
    pub token: u64,
    /// Partition of the target topic.
    pub partition: u32,
    /// Writer epoch of that partition.
    pub epoch: u64,
    /// Sequence (the offset).
    pub seq: u64,
    /// Readers registered on the partition when it was committed.
    pub readers: u32,
}

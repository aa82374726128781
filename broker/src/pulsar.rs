//! The broker's side of the Pulsar bridge: a [`Sink`] over the ingest API,
//! and a thread that runs the bridge on its own small tokio runtime.

use std::sync::Arc;

use tickwire_bridge::{
    BridgeConfig, BridgeStats, CancellationToken, Committed, MarketEvent, Sink, SinkError,
};
use tickwire_proto::FrameBody;

use crate::engine::{Broker, Ingest};

/// Why the bridge could not start or ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum BridgeStartError {
    /// `bridge.target_topic` is not one of the broker's topics.
    #[error("bridge target topic {0:?} is not configured")]
    UnknownTopic(String),
    /// The bridge's thread or runtime could not start.
    #[error("cannot start the bridge thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The bridge stopped on an error.
    #[error(transparent)]
    Bridge(#[from] tickwire_bridge::BridgeError),
    /// The bridge thread panicked.
    #[error("the bridge thread panicked")]
    Panicked,
}

/// Routes bridge events into the configured topic, or where a routing rule
/// for their source sends them.
pub struct IngestSink {
    ingest: Ingest,
    topic: u32,
    rules: crate::rules::RuleReader,
}

impl IngestSink {
    /// A sink into `topic` with at most `max_in_flight` uncommitted events.
    ///
    /// # Errors
    /// If the topic is not configured.
    pub fn new(
        broker: &Broker,
        topic: &str,
        max_in_flight: usize,
    ) -> Result<IngestSink, BridgeStartError> {
        let mut ingest = broker.ingest(max_in_flight);
        let topic = ingest
            .resolver()
            .topic(topic)
            .ok_or_else(|| BridgeStartError::UnknownTopic(topic.into()))?;
        Ok(IngestSink {
            ingest,
            topic,
            rules: broker.rules().reader(),
        })
    }
}

impl Sink for IngestSink {
    fn try_send(
        &mut self,
        e: &MarketEvent,
        source: &str,
        source_id: u32,
        source_seq: u64,
        token: u64,
    ) -> Result<(), SinkError> {
        let route = self
            .rules
            .route(
                self.ingest.resolver(),
                source,
                self.topic,
                &e.instrument,
                e.kind,
            )
            .map_err(|err| SinkError::Rejected(Box::new(err)))?;
        let mut body = FrameBody {
            ts_event: e.ts_event,
            source_seq,
            px_a: e.px_a,
            px_b: e.px_b,
            size_a: e.size_a,
            size_b: e.size_b,
            kind: e.kind.code(),
            ..FrameBody::default()
        };
        body.set_source_id(source_id);
        match self.ingest.try_send(&route, &body, Some(token)) {
            Ok(()) => Ok(()),
            Err(err) if err.is_backpressure() => Err(SinkError::Backpressure),
            Err(err) => Err(SinkError::Rejected(Box::new(err))),
        }
    }

    fn routing_key(&mut self, e: &MarketEvent) -> String {
        self.ingest
            .resolver()
            .routing_key(self.topic, &e.instrument, e.kind)
            .unwrap_or_default()
    }

    fn drain(&mut self, done: &mut dyn FnMut(Committed)) {
        self.ingest.drain_completions(|c| {
            done(Committed {
                token: c.token,
                partition: c.partition,
                epoch: c.epoch,
                seq: c.seq,
                readers: c.readers,
            })
        });
    }
}

/// A running bridge.
pub struct BridgeHandle {
    cancel: CancellationToken,
    thread: Option<std::thread::JoinHandle<Result<(), BridgeStartError>>>,
    /// Its counters.
    pub stats: Arc<BridgeStats>,
}

impl BridgeHandle {
    /// Starts the bridge on its own thread (a current-thread tokio runtime).
    ///
    /// # Errors
    /// If the thread or runtime cannot start or the target topic is unknown.
    pub fn start(broker: &Broker, cfg: BridgeConfig) -> Result<BridgeHandle, BridgeStartError> {
        let sink = IngestSink::new(
            broker,
            &cfg.target_topic,
            cfg.receiver_queue_size as usize * 4,
        )?;
        let cancel = CancellationToken::new();
        let stats = Arc::new(BridgeStats::default());
        let (c2, st2) = (cancel.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("tickwire-bridge".into())
            .spawn(move || {
                // One thread for the consumer loop and the client's own
                // tasks: no cross-thread wakeup per message.
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(BridgeStartError::Thread)?;
                Ok(rt.block_on(tickwire_bridge::run(cfg, sink, st2, c2))?)
            })
            .map_err(BridgeStartError::Thread)?;
        Ok(BridgeHandle {
            cancel,
            thread: Some(thread),
            stats,
        })
    }

    /// Whether the bridge thread has ended (an error stops it).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the bridge after it acknowledged what was committed (a
    /// connection attempt in progress is abandoned at once).
    ///
    /// # Errors
    /// The bridge's own error, if it had stopped on one.
    pub fn stop(mut self) -> Result<(), BridgeStartError> {
        self.cancel.cancel();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(BridgeStartError::Panicked),
            None => Ok(()),
        }
    }
}

impl Drop for BridgeHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

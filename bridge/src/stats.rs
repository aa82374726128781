//! The bridge's counters.

use std::sync::atomic::AtomicU64;

/// Counters, shared with whoever started the bridge.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Messages received from Pulsar.
    pub received: AtomicU64,
    /// Messages the sink reported committed.
    pub committed: AtomicU64,
    /// Messages covered by acknowledgements sent to Pulsar (committed or
    /// dead-lettered).
    pub acked: AtomicU64,
    /// Acknowledgement commands sent (cumulative or per entry).
    pub ack_commands: AtomicU64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Times the sink pushed back.
    pub backpressure: AtomicU64,
    /// Reconnections of the consumer (its stream ended and it subscribed again).
    pub reconnects: AtomicU64,
    /// Attempts to connect or subscribe that failed (Pulsar unreachable or
    /// not ready), plus one for every 10 s an attempt has been waiting;
    /// each is retried with backoff until shutdown.
    pub connect_failures: AtomicU64,
    /// 1 while the consumer is subscribed, 0 while connecting or retrying.
    pub connected: AtomicU64,
    /// `market_data_distributed` events handed to the output producer.
    pub events_out: AtomicU64,
    /// Events dropped because the output queue was full (ingest never waits for it).
    pub events_dropped: AtomicU64,
}

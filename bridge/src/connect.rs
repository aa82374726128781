//! Connecting to Pulsar, subscribing, and retrying both until shutdown.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pulsar::consumer::ConsumerOptions;
use pulsar::{ConnectionRetryOptions, Consumer, OperationRetryOptions, Pulsar, TokioExecutor};
use tokio_util::sync::CancellationToken;

use crate::{BridgeConfig, BridgeError, BridgeStats};

pub(crate) type PulsarConsumer = Consumer<Vec<u8>, TokioExecutor>;

async fn connect(cfg: &BridgeConfig) -> Result<Pulsar<TokioExecutor>, BridgeError> {
    let pulsar = Pulsar::builder(cfg.url.clone(), TokioExecutor)
        .with_connection_retry_options(ConnectionRetryOptions {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_retries: u32::MAX,
            connection_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
            ..ConnectionRetryOptions::default()
        })
        .with_operation_retry_options(OperationRetryOptions {
            operation_timeout: Duration::from_secs(30),
            retry_delay: Duration::from_millis(500),
            max_retries: None,
        })
        .build()
        .await?;
    Ok(pulsar)
}

pub(crate) async fn subscribe(
    pulsar: &Pulsar<TokioExecutor>,
    cfg: &BridgeConfig,
) -> Result<PulsarConsumer, BridgeError> {
    let mut b = pulsar
        .consumer()
        .with_topics(&cfg.topics)
        .with_subscription(&cfg.subscription)
        .with_subscription_type(cfg.subscription_type.sub_type())
        .with_batch_size(cfg.receiver_queue_size)
        .with_options(ConsumerOptions {
            initial_position: cfg.initial_position.to_pulsar(),
            durable: Some(true),
            ..ConsumerOptions::default()
        });
    if let Some(name) = &cfg.consumer_name {
        b = b.with_consumer_name(name);
    }
    Ok(b.build().await?)
}

pub(crate) type DlqProducer = pulsar::Producer<TokioExecutor>;

pub(crate) async fn setup(
    cfg: &BridgeConfig,
) -> Result<(Pulsar<TokioExecutor>, PulsarConsumer, DlqProducer), BridgeError> {
    let pulsar = connect(cfg).await?;
    let consumer = subscribe(&pulsar, cfg).await?;
    let dlq = pulsar
        .producer()
        .with_topic(&cfg.dead_letter_topic)
        .with_options(pulsar::ProducerOptions {
            block_queue_if_full: true,
            ..pulsar::ProducerOptions::default()
        })
        .build()
        .await?;
    Ok((pulsar, consumer, dlq))
}

/// How often an attempt that is still waiting (the client retries an
/// unreachable broker inside one attempt, silently) is reported and counted.
pub(crate) const STALL_REPORT: Duration = Duration::from_secs(10);

/// Runs `op` until it succeeds (backoff 100 ms doubling to 5 s), counting
/// in `stats.connect_failures` every failed attempt and every
/// [`STALL_REPORT`] an attempt keeps waiting; `None` as soon as `cancel`
/// fires, even in the middle of an attempt.
///
/// A waiting attempt is never abandoned on a timer: a subscribe dropped
/// half-way can leave its consumer registered with the broker, where (as
/// the active Failover consumer) it would take messages nobody reads.
pub(crate) async fn retry<T, F, Fut>(
    cancel: &CancellationToken,
    stats: &BridgeStats,
    what: &str,
    mut op: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BridgeError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = op();
        tokio::pin!(attempt);
        let mut waited = Duration::ZERO;
        let result = loop {
            tokio::select! {
                r = &mut attempt => break r,
                _ = tokio::time::sleep(STALL_REPORT) => {
                    waited += STALL_REPORT;
                    let failures = stats.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(step = what, failures, waited_secs = waited.as_secs(), "pulsar not reachable yet; still trying");
                }
                _ = cancel.cancelled() => return None,
            }
        };
        match result {
            Ok(v) => return Some(v),
            Err(e) => {
                let failures = stats.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(error = %e, step = what, failures, backoff_ms = backoff.as_millis() as u64, "pulsar not available; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

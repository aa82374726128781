//! Helpers shared by the tests that run against the real Pulsar.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use tickwire_bridge::pulsar::consumer::{ConsumerOptions, InitialPosition};
use tickwire_bridge::pulsar::{Consumer, Pulsar, TokioExecutor};

/// The Pulsar that `scripts/services.sh up` starts (TICKWIRE_PULSAR_URL overrides).
pub fn pulsar_url() -> String {
    std::env::var("TICKWIRE_PULSAR_URL").unwrap_or_else(|_| "pulsar://127.0.0.1:6650".into())
}

/// A topic name no other test or run uses.
pub fn unique(name: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("persistent://public/default/{name}-{n}")
}

/// Reads `n` messages from `topic` (from the earliest) on a new
/// subscription, acknowledging them: (payload, properties) each.
pub async fn read_topic(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    n: usize,
) -> Vec<(Vec<u8>, HashMap<String, String>)> {
    let mut c: Consumer<Vec<u8>, _> = pulsar
        .consumer()
        .with_topic(topic)
        .with_subscription(format!("check-{}", std::process::id()))
        .with_options(ConsumerOptions {
            initial_position: InitialPosition::Earliest,
            ..Default::default()
        })
        .build()
        .await
        .expect("consumer");
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(60), c.next()).await {
            Ok(Some(Ok(m))) => {
                let props = m
                    .metadata()
                    .properties
                    .iter()
                    .map(|kv| (kv.key.clone(), kv.value.clone()))
                    .collect();
                out.push((m.payload.data.clone(), props));
                c.ack(&m).await.expect("ack");
            }
            other => panic!(
                "{topic}: got {} of {n}, then {:?}",
                out.len(),
                other.map(|o| o.map(|r| r.map(|_| ())))
            ),
        }
    }
    out
}

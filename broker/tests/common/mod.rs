//! Helpers shared by the tests that run against the real Pulsar.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use futures::StreamExt;
use tickwire_bridge::pulsar::consumer::{ConsumerOptions, InitialPosition};
use tickwire_bridge::pulsar::{Consumer, Pulsar, TokioExecutor};

/// The Pulsar that `scripts/services.sh up` starts (TICKWIRE_PULSAR_URL overrides).
pub fn pulsar_url() -> String {
    std::env::var("TICKWIRE_PULSAR_URL").unwrap_or_else(|_| "pulsar://127.0.0.1:6650".into())
}

/// The Pulsar admin endpoint (TICKWIRE_PULSAR_ADMIN overrides).
pub fn admin_addr() -> String {
    std::env::var("TICKWIRE_PULSAR_ADMIN").unwrap_or_else(|_| "127.0.0.1:8080".into())
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

/// A plain HTTP GET against the Pulsar admin API; returns the body.
pub fn admin_get(path: &str) -> String {
    admin("GET", path, "")
}

/// Creates `topic` as a partitioned topic of `partitions` partitions.
pub fn create_partitioned(topic: &str, partitions: u32) {
    let path = topic.replace("persistent://", "/admin/v2/persistent/");
    let status = admin(
        "PUT",
        &format!("{path}/partitions"),
        &partitions.to_string(),
    );
    assert!(
        status.is_empty() || !status.contains("reason"),
        "creating {topic}: {status}"
    );
}

/// One admin request; returns the body.
fn admin(method: &str, path: &str, body: &str) -> String {
    let mut s = std::net::TcpStream::connect(admin_addr()).expect("admin connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        admin_addr(),
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Chunked bodies: keep the JSON object.
    match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if b > a => body[a..=b].to_string(),
        _ => body,
    }
}

/// The subscription's message backlog from the admin API, over all
/// partitions of a partitioned topic (`u64::MAX` when the stats do not name
/// the subscription).
pub fn backlog(topic: &str, subscription: &str) -> u64 {
    let path = topic.replace("persistent://", "/admin/v2/persistent/");
    ["stats", "partitioned-stats"]
        .iter()
        .find_map(|kind| {
            let stats: serde_json::Value =
                serde_json::from_str(&admin_get(&format!("{path}/{kind}"))).ok()?;
            stats["subscriptions"][subscription]["msgBacklog"].as_u64()
        })
        .unwrap_or(u64::MAX)
}

//! The query side's `distribution_metrics_ts` on SQLite and on the
//! PostgreSQL of `scripts/services.sh` (native time partitions there, as
//! Debian has no TimescaleDB): rows written and read back by time range,
//! partitions made ahead, and the retention dropping whole old partitions
//! (deleting rows on SQLite).

use std::time::Duration;

use tickwire_api::store::{MetricsRow, Store};

const HOUR: u64 = 3_600_000_000_000;

fn postgres_url() -> String {
    std::env::var("TICKWIRE_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://tickwire:tickwire@127.0.0.1:5432/tickwire".into())
}

fn row(topic: &str, ts_ns: u64, p: i64) -> MetricsRow {
    MetricsRow {
        ts_ns: ts_ns as i64,
        topic_name: topic.into(),
        partition_id: p,
        throughput_per_second: 1000.0 + p as f64,
        latency_p50_ms: Some(0.25),
        latency_p99_ms: None,
        error_rate: 0.0,
        backlog_size: 3,
        consumer_count: 2,
        producer_count: 1,
    }
}

/// Writes rows now and three hours ago, reads them back, then a retention
/// of one hour leaves only the recent ones.
async fn check(store: &Store) -> u64 {
    let now = tickwire_proto::futex::realtime_ns();
    let topic = format!("qs/{}", uuid::Uuid::new_v4());
    // Partitions for three hours ago, as a node running then made them.
    store
        .maintain_query_side(now - 3 * HOUR, Duration::from_secs(30 * 86_400))
        .await
        .expect("maintain then");
    store
        .maintain_query_side(now, Duration::from_secs(30 * 86_400))
        .await
        .expect("maintain now");
    let old: Vec<MetricsRow> = (0..2).map(|p| row(&topic, now - 3 * HOUR, p)).collect();
    let mut new: Vec<MetricsRow> = (0..2).map(|p| row(&topic, now - 1_000, p)).collect();
    // A NULL then a value in the same column of one batch.
    new[1].latency_p99_ms = Some(1.5);
    // Ten days ago: outside every partition (PostgreSQL keeps it in DEFAULT).
    let ancient = vec![row(&topic, now - 240 * HOUR, 0)];
    for rows in [&old, &new, &ancient] {
        store.record_metrics(rows).await.expect("record");
    }
    let all = store
        .metrics(&topic, 0, now as i64 + 1, 100)
        .await
        .expect("read");
    assert_eq!(all.len(), 5);
    assert_eq!(all[0], ancient[0], "oldest first, every field back");
    let recent = store
        .metrics(&topic, (now - HOUR) as i64, now as i64, 100)
        .await
        .expect("read");
    assert_eq!(recent, new, "a time range");
    // A range's ends are exact to the nanosecond wherever they fall in a
    // microsecond (PostgreSQL keeps microseconds in `timestamp`, and a
    // double holds today's nanoseconds to ~256 ns).
    let edges = format!("{topic}/edges");
    for k in 0..40u64 {
        let end = now - 5 * HOUR / 2 + k * 1_000_037;
        let rows = [row(&edges, end - 1_000, 0), row(&edges, end, 1)];
        store.record_metrics(&rows).await.expect("record edges");
        let got = store
            .metrics(&edges, (end - 1_000) as i64, end as i64, 10)
            .await
            .expect("read edges");
        assert_eq!(
            got,
            rows[..1],
            "[{}, {end}) holds the first row only",
            end - 1_000
        );
        let got = store
            .metrics(&edges, (end - 999) as i64, end as i64 + 1, 10)
            .await
            .expect("read edges");
        assert_eq!(
            got,
            rows[1..],
            "[{}, {}) holds the second row only",
            end - 999,
            end + 1
        );
    }
    // message_delivery_log: a failed range and a sampled delivery.
    let rec = |ts_ns: u64, status: &'static str, from: u64, to: u64| {
        tickwire_api::dispatch::DeliveryRecord {
            ts_ns,
            topic: topic.clone(),
            partition: 1,
            from,
            to,
            subscription: "watch".into(),
            status,
            reason: if status == "failed" {
                "slow_consumer".into()
            } else {
                String::new()
            },
            latency_ms: (status == "delivered").then_some(0.5),
        }
    };
    store
        .record_deliveries(&[
            rec(now - 2_000, "failed", 10, 19),
            rec(now - 1_000, "delivered", 20, 20),
        ])
        .await
        .expect("deliveries");
    let d = store
        .deliveries(&topic, 0, now as i64, None, 10)
        .await
        .expect("read deliveries");
    assert_eq!(d.len(), 2);
    assert_eq!(
        (d[0].message_id.as_str(), d[0].status.as_str()),
        ("1:10-19", "failed")
    );
    assert_eq!((d[0].partition_id, d[0].offset_position), (1, 10));
    assert!(
        d[0].error_message
            .as_deref()
            .is_some_and(|e| e.contains("slow_consumer") && e.contains("10 events")),
        "{d:?}"
    );
    assert_eq!(
        (
            d[1].message_id.as_str(),
            d[1].status.as_str(),
            d[1].error_message.as_deref(),
            d[1].delivery_latency_ms
        ),
        ("1:20", "delivered", None, Some(0.5))
    );
    let failed = store
        .deliveries(&topic, 0, now as i64, Some("failed"), 10)
        .await
        .expect("read failed deliveries");
    assert_eq!(failed, d[..1]);
    let dropped = store
        .maintain_query_side(now, Duration::from_secs(3600))
        .await
        .expect("retention");
    let left = store
        .metrics(&topic, 0, now as i64 + 1, 100)
        .await
        .expect("read");
    assert_eq!(left, new, "the retention keeps the last hour only");
    dropped
}

#[tokio::test]
async fn sqlite_keeps_reads_and_ages_out_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&format!("sqlite://{}", dir.path().join("q.db").display()))
        .await
        .expect("sqlite");
    assert!(check(&store).await >= 3, "three old rows deleted");
}

#[tokio::test]
async fn postgres_partitions_by_hour_and_drops_whole_old_partitions() {
    let store = Store::open(&postgres_url())
        .await
        .expect("the PostgreSQL of scripts/services.sh up");
    let dropped = check(&store).await;
    // distribution_stats: an idle interval (no latency) then a busy one.
    for avg in [None, Some(0.25), None] {
        store
            .record_stats(&tickwire_api::store::StatsRow {
                timestamp: tickwire_proto::json::rfc3339(tickwire_proto::futex::realtime_ns()),
                topic_name: "qs/stats".into(),
                messages_distributed: 1,
                bytes_distributed: 64,
                avg_latency_ms: avg,
                error_count: 0,
                active_subscriptions: 1,
            })
            .await
            .expect("a stats row with and without latency");
    }
    assert!(
        dropped >= 2,
        "the partition of three hours ago and the DEFAULT row: {dropped}"
    );
    // The table is partitioned, with hourly partitions from this hour on.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&postgres_url())
        .await
        .expect("pg");
    let kind: String = sqlx::query_scalar(
        "SELECT relkind::text FROM pg_class WHERE relname = 'distribution_metrics_ts'",
    )
    .fetch_one(&pool)
    .await
    .expect("relkind");
    assert_eq!(kind, "p", "a partitioned table");
    let now = tickwire_proto::futex::realtime_ns();
    let this_hour = (now - now % HOUR) / 1_000_000_000;
    let parts: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'distribution_metrics_ts'",
    )
    .fetch_all(&pool)
    .await
    .expect("partitions");
    for k in 0..3 {
        let name = format!("distribution_metrics_ts_p{}", this_hour + k * 3600);
        assert!(parts.contains(&name), "{name} in {parts:?}");
    }
    let three_ago = format!("distribution_metrics_ts_p{}", this_hour - 3 * 3600);
    assert!(!parts.contains(&three_ago), "dropped: {three_ago}");
    let daily: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
         WHERE p.relname = 'message_delivery_log'",
    )
    .fetch_one(&pool)
    .await
    .expect("daily partitions");
    assert!(daily >= 4, "three daily partitions and DEFAULT: {daily}");
}

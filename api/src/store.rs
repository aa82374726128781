//! The command-side store (the spec's "Command Side" tables): topics,
//! subscriptions, distribution stats and routing rules, in SQLite (a file,
//! the embedded default) or PostgreSQL (a `postgres://` URL), through one
//! set of queries on sqlx's Any driver.
//!
//! Migrations live in `migrations/sqlite` and `migrations/postgres` and are
//! embedded in the binary; [`Store::open`] runs the ones a database lacks.
//! Ids are UUIDs and timestamps RFC 3339 text in both databases (the Any
//! driver has no UUID or timestamp type); booleans are 0/1.
//!
//! Nothing here is on the data path: the edge writes a row when an operator
//! creates, pauses, resumes or deletes a subscription, and a stats row per
//! topic every interval.

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use tickwire_proto::futex::realtime_ns;
use tickwire_proto::json::rfc3339;

use crate::TopicDesc;

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no database this build supports.
    #[error("store url {0:?}: use sqlite://<path> or postgres://user:password@host/db")]
    Url(String),
    /// The database cannot be reached or opened.
    #[error("store {location}: {source}")]
    Open {
        /// The database, without its password.
        location: String,
        /// Why.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("store {location}: migration failed: {source}")]
    Migrate {
        /// The database, without its password.
        location: String,
        /// Why.
        source: sqlx::migrate::MigrateError,
    },
    /// A row with this key exists already.
    #[error("{what} {name} exists already")]
    Exists {
        /// What kind of row.
        what: &'static str,
        /// Its key.
        name: String,
    },
    /// A query failed (the database went away, a disk is full).
    #[error("store {location}: {source}")]
    Query {
        /// The database, without its password.
        location: String,
        /// Why.
        source: sqlx::Error,
    },
}

/// Which database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A `topics` row.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicRow {
    /// Unique name.
    pub topic_name: String,
    /// Partitions.
    pub partitions: i64,
    /// Retention (e.g. `7d`).
    pub retention_policy: String,
    /// Compression name.
    pub compression_type: String,
    /// Enabled.
    pub enabled: bool,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Created at run time (re-created at start) rather than configured.
    pub runtime: bool,
    /// Slots per partition ring, when known.
    pub capacity: Option<i64>,
}

/// An event a subscription group gave up on (`dead_letters`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRow {
    /// `<topic>/<subscription>`.
    pub subscription_id: String,
    /// Topic.
    pub topic_name: String,
    /// Partition.
    pub partition: u32,
    /// Sequence.
    pub sequence: u64,
    /// `<partition>:<epoch>:<sequence>`.
    pub message_id: String,
    /// Times it was sent.
    pub deliveries: u32,
    /// Why it was given up on.
    pub reason: String,
    /// The event as the WebSocket API's JSON message.
    pub event: String,
    /// When, RFC 3339.
    pub created_at: String,
}

/// A `subscriptions` row. `filters` is the JSON of everything a stream
/// needs to resume it (symbols, data types, the filter criteria, policy,
/// delivery mode).
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionRow {
    /// `<topic>/<name>`, unique.
    pub subscription_id: String,
    /// Topic.
    pub topic_name: String,
    /// Name.
    pub subscription_name: String,
    /// Exclusive, Shared, Failover, KeyShared.
    pub subscription_type: String,
    /// Group, when one is named.
    pub consumer_group: Option<String>,
    /// JSON.
    pub filters: String,
    /// Latest, Earliest, MessageId.
    pub start_position: String,
    /// active, paused, error, stopped.
    pub status: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub last_activity: String,
}

/// A `distribution_stats` row.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsRow {
    /// RFC 3339: the end of the interval.
    pub timestamp: String,
    /// Topic.
    pub topic_name: String,
    /// Events delivered to remote subscribers in the interval.
    pub messages_distributed: i64,
    /// Their bytes on the wire.
    pub bytes_distributed: i64,
    /// Mean ingest-to-dispatch latency, ms.
    pub avg_latency_ms: Option<f64>,
    /// Events dropped for slow subscribers in the interval.
    pub error_count: i64,
    /// Live remote subscriptions at the end of the interval.
    pub active_subscriptions: i64,
}

/// A `distribution_metrics_ts` row: one topic partition over one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRow {
    /// The end of the interval, UTC ns.
    pub ts_ns: i64,
    /// Topic.
    pub topic_name: String,
    /// Partition.
    pub partition_id: i64,
    /// Events published to the partition per second over the interval.
    pub throughput_per_second: f64,
    /// Ingest-to-dispatch latency of the topic's events in the interval, ms.
    pub latency_p50_ms: Option<f64>,
    /// The same, 99th percentile.
    pub latency_p99_ms: Option<f64>,
    /// Events remote subscribers did not get (dropped) per event handed to them.
    pub error_rate: f64,
    /// Events published but not yet read by the edge's dispatcher.
    pub backlog_size: i64,
    /// Live remote subscriptions of the topic.
    pub consumer_count: i64,
    /// Writers of the partition that published in the interval (0 or 1:
    /// one shard writes a partition).
    pub producer_count: i64,
}

/// A `message_delivery_log` row: a failed delivery (a range a subscriber
/// did not get, and why) or a sampled successful one.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRow {
    /// When, UTC ns.
    pub ts_ns: i64,
    /// `partition:sequence`, or `partition:from-to` for a range.
    pub message_id: String,
    /// Partition.
    pub partition_id: i64,
    /// The first sequence.
    pub offset_position: i64,
    /// Publish-to-send latency of a delivered event, ms.
    pub delivery_latency_ms: Option<f64>,
    /// `delivered` or `failed`.
    pub status: String,
    /// What was not delivered to which subscription, and why.
    pub error_message: Option<String>,
}

/// The command-side database.
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    location: String,
}

/// The URL without a password, for logs and errors.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Store {
    /// Opens (creating a SQLite file if needed) and migrates.
    ///
    /// # Errors
    /// A URL of another kind; an unreachable or unreadable database; a
    /// failed migration.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let location = redact(url);
        let (backend, connect) = if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreError::Url(location));
            }
            if let Some(dir) = std::path::Path::new(path.split('?').next().unwrap_or(path))
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                    location: location.clone(),
                    source: sqlx::Error::Io(e),
                })?;
            }
            let connect = if url.contains('?') {
                url.to_string()
            } else {
                format!("{url}?mode=rwc")
            };
            (Backend::Sqlite, connect)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_string())
        } else {
            return Err(StoreError::Url(location));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 1 } else { 4 })
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(&connect)
            .await
            .map_err(|source| StoreError::Open {
                location: location.clone(),
                source,
            })?;
        let migrated = match backend {
            Backend::Sqlite => sqlx::migrate!("../migrations/sqlite").run(&pool).await,
            Backend::Postgres => sqlx::migrate!("../migrations/postgres").run(&pool).await,
        };
        migrated.map_err(|source| StoreError::Migrate {
            location: location.clone(),
            source,
        })?;
        Ok(Store {
            pool,
            backend,
            location,
        })
    }

    /// Which database.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The database, without its password.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Runs a SELECT and maps each row.
    async fn fetch<'q, T>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
        row: impl Fn(&AnyRow) -> Result<T, sqlx::Error>,
    ) -> Result<Vec<T>, StoreError> {
        let rows = q
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.query_err(e))?;
        rows.iter()
            .map(row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.query_err(e))
    }

    /// Runs an INSERT or UPDATE; a unique-key clash is
    /// [`StoreError::Exists`] naming `what` `name`.
    async fn write<'q>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
        what: &'static str,
        name: &str,
    ) -> Result<(), StoreError> {
        match q.execute(&self.pool).await {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Err(StoreError::Exists {
                what,
                name: name.to_string(),
            }),
            Err(e) => Err(self.query_err(e)),
        }
    }

    /// Runs an UPDATE or DELETE (or an INSERT that cannot clash);
    /// returns the rows it touched.
    async fn execute<'q>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> Result<u64, StoreError> {
        q.execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(|e| self.query_err(e))
    }

    fn query_err(&self, source: sqlx::Error) -> StoreError {
        StoreError::Query {
            location: self.location.clone(),
            source,
        }
    }

    /// Records the engine's topics (see [`record_topic`](Self::record_topic));
    /// enabled rows of configured topics the engine no longer has are
    /// disabled, kept for the record. Rows of run-time topics are left
    /// alone: only a deletion ends them.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn sync_topics(&self, topics: &[TopicDesc]) -> Result<(), StoreError> {
        for t in topics {
            self.record_topic(t).await?;
        }
        let rows = self.topics().await?;
        for r in rows
            .iter()
            .filter(|r| r.enabled && !r.runtime && !topics.iter().any(|t| t.name == r.topic_name))
        {
            self.disable_topic(&r.topic_name).await?;
        }
        Ok(())
    }

    /// Inserts or updates a topic's row: enabled, its partitions, capacity
    /// and origin as the engine has them.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn record_topic(&self, t: &TopicDesc) -> Result<(), StoreError> {
        let now = rfc3339(realtime_ns());
        let origin = if t.runtime { "runtime" } else { "config" };
        let q = sqlx::query(
            "INSERT INTO topics (id, topic_name, partitions, enabled, created_at, updated_at, origin, capacity, retention_policy) \
             VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $8) \
             ON CONFLICT (topic_name) DO UPDATE SET partitions = excluded.partitions, \
             enabled = 1, updated_at = excluded.updated_at, origin = excluded.origin, \
             capacity = excluded.capacity, retention_policy = excluded.retention_policy \
             WHERE topics.partitions <> excluded.partitions OR topics.enabled <> 1 \
             OR topics.origin <> excluded.origin OR topics.capacity IS NULL \
             OR topics.capacity <> excluded.capacity \
             OR topics.retention_policy <> excluded.retention_policy",
        )
        .bind(uuid())
        .bind(&t.name)
        .bind(i64::from(t.partitions))
        .bind(&now)
        .bind(&now)
        .bind(origin)
        .bind(t.capacity as i64)
        .bind(t.retention_policy());
        self.execute(q).await?;
        Ok(())
    }

    /// Marks a topic's row disabled (deleted, or gone from the
    /// configuration).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn disable_topic(&self, name: &str) -> Result<(), StoreError> {
        let q = sqlx::query("UPDATE topics SET enabled = 0, updated_at = $1 WHERE topic_name = $2")
            .bind(rfc3339(realtime_ns()))
            .bind(name);
        self.execute(q).await?;
        Ok(())
    }

    /// Every `topics` row, by name.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn topics(&self) -> Result<Vec<TopicRow>, StoreError> {
        self.fetch(
            sqlx::query(
                "SELECT topic_name, partitions, retention_policy, compression_type, enabled, \
                 created_at, updated_at, origin, capacity FROM topics ORDER BY topic_name",
            ),
            |r| {
                Ok(TopicRow {
                    topic_name: r.try_get(0)?,
                    partitions: r.try_get(1)?,
                    retention_policy: r.try_get(2)?,
                    compression_type: r.try_get(3)?,
                    enabled: r.try_get::<i64, _>(4)? != 0,
                    created_at: r.try_get(5)?,
                    updated_at: r.try_get(6)?,
                    runtime: r.try_get::<String, _>(7)? == "runtime",
                    capacity: r.try_get(8)?,
                })
            },
        )
        .await
    }

    /// Inserts a subscription.
    ///
    /// # Errors
    /// [`StoreError::Exists`] for a taken `subscription_id`;
    /// [`StoreError::Query`].
    pub async fn insert_subscription(&self, s: &SubscriptionRow) -> Result<(), StoreError> {
        let r = sqlx::query(
            "INSERT INTO subscriptions (id, subscription_id, topic_name, subscription_name, \
             subscription_type, consumer_group, filters, start_position, status, created_at, \
             last_activity) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(uuid())
        .bind(&s.subscription_id)
        .bind(&s.topic_name)
        .bind(&s.subscription_name)
        .bind(&s.subscription_type)
        .bind(s.consumer_group.clone())
        .bind(&s.filters)
        .bind(&s.start_position)
        .bind(&s.status)
        .bind(&s.created_at)
        .bind(&s.last_activity);
        self.write(r, "subscription", &s.subscription_id).await
    }

    /// Sets a subscription's status (and last activity); false when there is
    /// no such subscription.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn set_subscription_status(
        &self,
        subscription_id: &str,
        status: &str,
    ) -> Result<bool, StoreError> {
        let q = sqlx::query(
            "UPDATE subscriptions SET status = $1, last_activity = $2 WHERE subscription_id = $3",
        )
        .bind(status)
        .bind(rfc3339(realtime_ns()))
        .bind(subscription_id);
        let r = self.execute(q).await?;
        Ok(r > 0)
    }

    /// Deletes a subscription; false when there was none.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn delete_subscription(&self, subscription_id: &str) -> Result<bool, StoreError> {
        let q = sqlx::query("DELETE FROM subscriptions WHERE subscription_id = $1")
            .bind(subscription_id);
        let r = self.execute(q).await?;
        Ok(r > 0)
    }

    /// A subscription group's acknowledged cursors: (partition, first
    /// sequence not yet done).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn cursors(&self, subscription_id: &str) -> Result<Vec<(u32, u64)>, StoreError> {
        self.fetch(
            sqlx::query(
                "SELECT partition_id, next_sequence FROM subscription_cursors \
                 WHERE subscription_id = $1 ORDER BY partition_id",
            )
            .bind(subscription_id),
            |r| {
                let p: i64 = r.try_get(0)?;
                let n: i64 = r.try_get(1)?;
                Ok((p as u32, n.max(0) as u64))
            },
        )
        .await
    }

    /// Writes a subscription group's cursors (one transaction).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn save_cursors(
        &self,
        subscription_id: &str,
        cursors: &[(u32, u64)],
    ) -> Result<(), StoreError> {
        let now = rfc3339(realtime_ns());
        let mut tx = self.pool.begin().await.map_err(|e| self.query_err(e))?;
        for &(p, next) in cursors {
            sqlx::query(
                "INSERT INTO subscription_cursors (subscription_id, partition_id, next_sequence, updated_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (subscription_id, partition_id) \
                 DO UPDATE SET next_sequence = excluded.next_sequence, updated_at = excluded.updated_at",
            )
            .bind(subscription_id)
            .bind(i64::from(p))
            .bind(next as i64)
            .bind(&now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.query_err(e))?;
        }
        tx.commit().await.map_err(|e| self.query_err(e))
    }

    /// Forgets a subscription group's cursors and dead letters (the
    /// subscription was deleted).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn delete_cursors(&self, subscription_id: &str) -> Result<(), StoreError> {
        self.execute(
            sqlx::query("DELETE FROM subscription_cursors WHERE subscription_id = $1")
                .bind(subscription_id),
        )
        .await?;
        self.execute(
            sqlx::query("DELETE FROM dead_letters WHERE subscription_id = $1")
                .bind(subscription_id),
        )
        .await
        .map(|_| ())
    }

    /// Records events a subscription group gave up on.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn insert_dead_letters(&self, rows: &[DeadLetterRow]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.query_err(e))?;
        for r in rows {
            sqlx::query(
                "INSERT INTO dead_letters (id, subscription_id, topic_name, partition_id, sequence_number, \
                 message_id, deliveries, reason, event, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(&r.subscription_id)
            .bind(&r.topic_name)
            .bind(i64::from(r.partition))
            .bind(r.sequence as i64)
            .bind(&r.message_id)
            .bind(i64::from(r.deliveries))
            .bind(&r.reason)
            .bind(&r.event)
            .bind(&r.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.query_err(e))?;
        }
        tx.commit().await.map_err(|e| self.query_err(e))
    }

    /// A subscription's dead letters, oldest first, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn dead_letters(
        &self,
        subscription_id: &str,
        limit: u32,
    ) -> Result<Vec<DeadLetterRow>, StoreError> {
        self.fetch(
            sqlx::query(
                "SELECT subscription_id, topic_name, partition_id, sequence_number, message_id, \
                 deliveries, reason, event, created_at FROM dead_letters \
                 WHERE subscription_id = $1 ORDER BY created_at, partition_id, sequence_number LIMIT $2",
            )
            .bind(subscription_id)
            .bind(i64::from(limit)),
            |r| {
                let p: i64 = r.try_get(2)?;
                let q: i64 = r.try_get(3)?;
                let d: i64 = r.try_get(5)?;
                Ok(DeadLetterRow {
                    subscription_id: r.try_get(0)?,
                    topic_name: r.try_get(1)?,
                    partition: p as u32,
                    sequence: q as u64,
                    message_id: r.try_get(4)?,
                    deliveries: d as u32,
                    reason: r.try_get(6)?,
                    event: r.try_get(7)?,
                    created_at: r.try_get(8)?,
                })
            },
        )
        .await
    }

    /// Every subscription, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn subscriptions(&self) -> Result<Vec<SubscriptionRow>, StoreError> {
        self.fetch(
            sqlx::query(
                "SELECT subscription_id, topic_name, subscription_name, subscription_type, \
                 consumer_group, filters, start_position, status, created_at, last_activity \
                 FROM subscriptions ORDER BY created_at, subscription_id",
            ),
            subscription_row,
        )
        .await
    }

    /// Appends a `distribution_stats` row.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn record_stats(&self, s: &StatsRow) -> Result<(), StoreError> {
        let q = sqlx::query(
            "INSERT INTO distribution_stats (id, timestamp, topic_name, messages_distributed, \
             bytes_distributed, avg_latency_ms, error_count, active_subscriptions, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(uuid())
        .bind(&s.timestamp)
        .bind(&s.topic_name)
        .bind(s.messages_distributed)
        .bind(s.bytes_distributed)
        .bind(s.avg_latency_ms)
        .bind(s.error_count)
        .bind(s.active_subscriptions)
        .bind(rfc3339(realtime_ns()));
        self.execute(q).await?;
        Ok(())
    }

    /// A topic's newest `limit` stats rows, newest first.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn stats(&self, topic: &str, limit: i64) -> Result<Vec<StatsRow>, StoreError> {
        self.fetch(
            sqlx::query(
                "SELECT timestamp, topic_name, messages_distributed, bytes_distributed, \
                 avg_latency_ms, error_count, active_subscriptions FROM distribution_stats \
                 WHERE topic_name = $1 ORDER BY timestamp DESC LIMIT $2",
            )
            .bind(topic)
            .bind(limit),
            |r| {
                Ok(StatsRow {
                    timestamp: r.try_get(0)?,
                    topic_name: r.try_get(1)?,
                    messages_distributed: r.try_get(2)?,
                    bytes_distributed: r.try_get(3)?,
                    avg_latency_ms: r.try_get(4)?,
                    error_count: r.try_get(5)?,
                    active_subscriptions: r.try_get(6)?,
                })
            },
        )
        .await
    }

    /// Appends `distribution_metrics_ts` rows (one statement per row, in one
    /// transaction).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn record_metrics(&self, rows: &[MetricsRow]) -> Result<(), StoreError> {
        let (ts, p50, p99) = if self.backend == Backend::Postgres {
            ("$1::timestamptz", "$6::float8", "$7::float8")
        } else {
            ("$1", "$6", "$7")
        };
        let sql = format!(
            "INSERT INTO distribution_metrics_ts (timestamp, ts_ns, topic_name, partition_id, \
             throughput_per_second, latency_p50_ms, latency_p99_ms, error_rate, backlog_size, \
             consumer_count, producer_count) VALUES ({ts}, $2, $3, $4, $5, {p50}, {p99}, $8, $9, $10, $11)"
        );
        let mut tx = self.pool.begin().await.map_err(|e| self.query_err(e))?;
        for r in rows {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(rfc3339(r.ts_ns.max(0) as u64))
                .bind(r.ts_ns)
                .bind(&r.topic_name)
                .bind(r.partition_id)
                .bind(r.throughput_per_second)
                .bind(r.latency_p50_ms)
                .bind(r.latency_p99_ms)
                .bind(r.error_rate)
                .bind(r.backlog_size)
                .bind(r.consumer_count)
                .bind(r.producer_count)
                // Not prepared once for all rows: the Any driver types a
                // NULL on its own, and a later value would not match it.
                .persistent(false)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.query_err(e))?;
        }
        tx.commit().await.map_err(|e| self.query_err(e))
    }

    /// Appends `message_delivery_log` rows: `message_id` is
    /// `partition:from` (`partition:from-to` for a range), `offset_position`
    /// the first sequence.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn record_deliveries(
        &self,
        rows: &[crate::dispatch::DeliveryRecord],
    ) -> Result<(), StoreError> {
        let ts = if self.backend == Backend::Postgres {
            "$1::timestamptz"
        } else {
            "$1"
        };
        // Optional values typed in the statement: PostgreSQL prepares it
        // once, and a NULL first must not fix a parameter's type.
        let (lat, err) = if self.backend == Backend::Postgres {
            ("$7::float8", "$9::text")
        } else {
            ("$7", "$9")
        };
        let sql = format!(
            "INSERT INTO message_delivery_log (timestamp, ts_ns, message_id, topic_name, partition_id, \
             offset_position, delivery_latency_ms, retry_count, status, error_message) \
             VALUES ({ts}, $2, $3, $4, $5, $6, {lat}, 0, $8, {err})"
        );
        let mut tx = self.pool.begin().await.map_err(|e| self.query_err(e))?;
        for r in rows {
            let id = if r.from == r.to {
                format!("{}:{}", r.partition, r.from)
            } else {
                format!("{}:{}-{}", r.partition, r.from, r.to)
            };
            let error = (r.status != "delivered").then(|| {
                format!(
                    "{}: sequences {}..={} ({} events) not sent to subscription {}",
                    r.reason,
                    r.from,
                    r.to,
                    r.to - r.from + 1,
                    r.subscription
                )
            });
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(rfc3339(r.ts_ns))
                .bind(r.ts_ns as i64)
                .bind(id)
                .bind(&r.topic)
                .bind(i64::from(r.partition))
                .bind(r.from as i64)
                .bind(r.latency_ms)
                .bind(r.status)
                .bind(error)
                // Not prepared once for all rows: the Any driver types a
                // NULL on its own, and a later value would not match it.
                .persistent(false)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.query_err(e))?;
        }
        tx.commit().await.map_err(|e| self.query_err(e))
    }

    /// The query side's `[$2, $3)` UTC ns condition: PostgreSQL prunes
    /// partitions on `timestamp`; SQLite has `ts_ns` indexed.
    fn time_range(&self) -> &'static str {
        if self.backend == Backend::Postgres {
            // `timestamp` lets PostgreSQL skip partitions; `ts_ns` decides.
            // The former is widened by a millisecond each way: the column
            // holds microseconds, and a double today's nanoseconds to
            // ~256 ns, so a row within a microsecond of an end could be cut
            // by the wrong side.
            "timestamp >= to_timestamp($2::float8 / 1e9) - interval '1 millisecond' \
             AND timestamp < to_timestamp($3::float8 / 1e9) + interval '1 millisecond' \
             AND ts_ns >= $2 AND ts_ns < $3"
        } else {
            "ts_ns >= $2 AND ts_ns < $3"
        }
    }

    /// `message_delivery_log` rows of a topic in `[from_ns, to_ns)`, of
    /// `status` when given, oldest first, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn deliveries(
        &self,
        topic: &str,
        from_ns: i64,
        to_ns: i64,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        let range = self.time_range();
        let status_is = if status.is_some() {
            "AND status = $5"
        } else {
            ""
        };
        let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT ts_ns, message_id, partition_id, offset_position, delivery_latency_ms, \
             status, error_message FROM message_delivery_log \
             WHERE topic_name = $1 AND {range} {status_is} ORDER BY ts_ns LIMIT $4"
        )))
        .bind(topic)
        .bind(from_ns)
        .bind(to_ns)
        .bind(limit);
        if let Some(s) = status {
            q = q.bind(s);
        }
        self.fetch(q, |r| {
            Ok(DeliveryRow {
                ts_ns: r.try_get(0)?,
                message_id: r.try_get(1)?,
                partition_id: r.try_get(2)?,
                offset_position: r.try_get(3)?,
                delivery_latency_ms: r.try_get(4)?,
                status: r.try_get(5)?,
                error_message: r.try_get(6)?,
            })
        })
        .await
    }

    /// A topic's metrics rows in `[from_ns, to_ns)`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn metrics(
        &self,
        topic: &str,
        from_ns: i64,
        to_ns: i64,
        limit: i64,
    ) -> Result<Vec<MetricsRow>, StoreError> {
        let range = self.time_range();
        self.fetch(
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT ts_ns, topic_name, partition_id, throughput_per_second, latency_p50_ms, \
                 latency_p99_ms, error_rate, backlog_size, consumer_count, producer_count \
                 FROM distribution_metrics_ts WHERE topic_name = $1 AND {range} \
                 ORDER BY ts_ns, partition_id LIMIT $4"
            )))
            .bind(topic)
            .bind(from_ns)
            .bind(to_ns)
            .bind(limit),
            |r| {
                Ok(MetricsRow {
                    ts_ns: r.try_get(0)?,
                    topic_name: r.try_get(1)?,
                    partition_id: r.try_get(2)?,
                    throughput_per_second: r.try_get(3)?,
                    latency_p50_ms: r.try_get(4)?,
                    latency_p99_ms: r.try_get(5)?,
                    error_rate: r.try_get(6)?,
                    backlog_size: r.try_get(7)?,
                    consumer_count: r.try_get(8)?,
                    producer_count: r.try_get(9)?,
                })
            },
        )
        .await
    }

    /// Keeps the query side's time partitions: on PostgreSQL without
    /// TimescaleDB, creates the hourly `distribution_metrics_ts` and daily
    /// `message_delivery_log` partitions from the one holding `now_ns` to
    /// two ahead, and drops those wholly older than `retention`; with
    /// TimescaleDB, drops chunks past it; on SQLite, deletes rows past it.
    /// Returns the partitions (or chunks, or rows) dropped.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn maintain_query_side(
        &self,
        now_ns: u64,
        retention: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let cutoff = now_ns.saturating_sub(retention.as_nanos() as u64);
        if self.backend == Backend::Sqlite {
            let mut n = 0;
            for t in ["distribution_metrics_ts", "message_delivery_log"] {
                n += self
                    .execute(
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DELETE FROM {t} WHERE ts_ns < $1"
                        )))
                        .bind(cutoff as i64),
                    )
                    .await?;
            }
            return Ok(n);
        }
        let timescale = !self
            .fetch(
                sqlx::query("SELECT 1::bigint FROM pg_extension WHERE extname = 'timescaledb'"),
                |r| r.try_get::<i64, _>(0),
            )
            .await?
            .is_empty();
        if timescale {
            let mut n = 0;
            for t in ["distribution_metrics_ts", "message_delivery_log"] {
                n += self
                    .fetch(
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "SELECT count(*)::bigint FROM drop_chunks('{t}', older_than => to_timestamp($1::float8 / 1e9))"
                        )))
                        .bind(cutoff as i64),
                        |r| r.try_get::<i64, _>(0),
                    )
                    .await?
                    .first()
                    .copied()
                    .unwrap_or(0) as u64;
            }
            return Ok(n);
        }
        const HOUR: u64 = 3_600_000_000_000;
        const DAY: u64 = 24 * HOUR;
        let mut dropped = 0;
        for (table, every) in [
            ("distribution_metrics_ts", HOUR),
            ("message_delivery_log", DAY),
        ] {
            let first = now_ns - now_ns % every;
            for k in 0..3 {
                let from = first + k * every;
                let name = format!("{table}_p{}", from / 1_000_000_000);
                self.execute(sqlx::query(sqlx::AssertSqlSafe(format!(
                    "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} \
                     FOR VALUES FROM ('{}') TO ('{}')",
                    rfc3339(from),
                    rfc3339(from + every)
                ))))
                .await?;
            }
            let parts = self
                .fetch(
                    sqlx::query(
                        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                         JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = $1",
                    )
                    .bind(table),
                    |r| r.try_get::<String, _>(0),
                )
                .await?;
            // Rows outside every partition (the DEFAULT one) age out too.
            dropped += self
                .execute(
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DELETE FROM {table}_default WHERE timestamp < to_timestamp($1::float8 / 1e9)"
                    )))
                    .bind(cutoff as i64),
                )
                .await?;
            for part in parts {
                let Some(start) = part
                    .strip_prefix(&format!("{table}_p"))
                    .and_then(|s| s.parse::<u64>().ok())
                else {
                    continue;
                };
                if (start * 1_000_000_000).saturating_add(every) <= cutoff {
                    self.execute(sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP TABLE IF EXISTS {part}"
                    ))))
                    .await?;
                    dropped += 1;
                }
            }
        }
        Ok(dropped)
    }

    /// Every routing rule, highest priority first.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn rules(&self) -> Result<Vec<crate::RoutingRule>, StoreError> {
        self.fetch(
            sqlx::query(
                "SELECT rule_name, source_pattern, target_topic, routing_key_template, \
                 conditions, priority, enabled, created_at FROM routing_rules \
                 ORDER BY priority DESC, rule_name",
            ),
            |r| {
                let conditions: String = r.try_get(4)?;
                Ok(crate::RoutingRule {
                    rule_name: r.try_get(0)?,
                    source_pattern: r.try_get(1)?,
                    target_topic: r.try_get(2)?,
                    routing_key_template: r.try_get(3)?,
                    conditions: serde_json::from_str(&conditions).unwrap_or_default(),
                    priority: r.try_get(5)?,
                    enabled: r.try_get::<i64, _>(6)? != 0,
                    created_at: r.try_get(7)?,
                })
            },
        )
        .await
    }

    /// Inserts a rule, or (`replace`) overwrites the one of that name.
    ///
    /// # Errors
    /// [`StoreError::Exists`] when inserting a taken name;
    /// [`StoreError::Query`].
    pub async fn put_rule(&self, r: &crate::RoutingRule, replace: bool) -> Result<(), StoreError> {
        let conditions = serde_json::to_string(&r.conditions).unwrap_or_else(|_| "{}".into());
        let q = if replace {
            sqlx::query(
                "UPDATE routing_rules SET source_pattern = $1, target_topic = $2, \
                 routing_key_template = $3, conditions = $4, priority = $5, enabled = $6 \
                 WHERE rule_name = $7",
            )
            .bind(&r.source_pattern)
            .bind(&r.target_topic)
            .bind(r.routing_key_template.clone())
            .bind(conditions)
            .bind(r.priority)
            .bind(i64::from(r.enabled))
            .bind(&r.rule_name)
        } else {
            sqlx::query(
                "INSERT INTO routing_rules (id, rule_name, source_pattern, target_topic, \
                 routing_key_template, conditions, priority, enabled, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(uuid())
            .bind(&r.rule_name)
            .bind(&r.source_pattern)
            .bind(&r.target_topic)
            .bind(r.routing_key_template.clone())
            .bind(conditions)
            .bind(r.priority)
            .bind(i64::from(r.enabled))
            .bind(&r.created_at)
        };
        self.write(q, "routing rule", &r.rule_name).await
    }

    /// Deletes a rule; false when there was none.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn delete_rule(&self, name: &str) -> Result<bool, StoreError> {
        let q = sqlx::query("DELETE FROM routing_rules WHERE rule_name = $1").bind(name);
        let r = self.execute(q).await?;
        Ok(r > 0)
    }

    /// Closes the pool (waits for queries in flight).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn subscription_row(r: &AnyRow) -> Result<SubscriptionRow, sqlx::Error> {
    Ok(SubscriptionRow {
        subscription_id: r.try_get(0)?,
        topic_name: r.try_get(1)?,
        subscription_name: r.try_get(2)?,
        subscription_type: r.try_get(3)?,
        consumer_group: r.try_get(4)?,
        filters: r.try_get(5)?,
        start_position: r.try_get(6)?,
        status: r.try_get(7)?,
        created_at: r.try_get(8)?,
        last_activity: r.try_get(9)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact("postgres://tickwire:secret@127.0.0.1:5432/tickwire"),
            "postgres://tickwire:***@127.0.0.1:5432/tickwire"
        );
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}

-- The command side (spec: "Database Schema, Command Side"), PostgreSQL form.
-- Timestamps are RFC 3339 text and ids are text, in both databases: one set
-- of queries serves both through sqlx's Any driver, which has no timestamp
-- or UUID type (cast with created_at::timestamptz to query by time).
-- Booleans are stored as 0/1 and every integer is BIGINT (Any decodes one width).

CREATE TABLE topics (
    id TEXT PRIMARY KEY,
    topic_name VARCHAR(200) NOT NULL UNIQUE,
    partitions BIGINT NOT NULL DEFAULT 1,
    retention_policy VARCHAR(50) NOT NULL DEFAULT '7d',
    compression_type VARCHAR(20) NOT NULL DEFAULT 'LZ4',
    schema_version VARCHAR(10),
    enabled BIGINT NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY,
    subscription_id VARCHAR(301) NOT NULL UNIQUE,
    topic_name VARCHAR(200) NOT NULL,
    subscription_name VARCHAR(100) NOT NULL,
    subscription_type VARCHAR(20) NOT NULL,
    consumer_group VARCHAR(100),
    filters TEXT NOT NULL DEFAULT '{}',
    start_position VARCHAR(20) NOT NULL DEFAULT 'Latest',
    status VARCHAR(20) NOT NULL DEFAULT 'active',
    created_at TEXT NOT NULL,
    last_activity TEXT NOT NULL
);

CREATE TABLE distribution_stats (
    id TEXT PRIMARY KEY,
    timestamp TEXT NOT NULL,
    topic_name VARCHAR(200) NOT NULL,
    messages_distributed BIGINT NOT NULL DEFAULT 0,
    bytes_distributed BIGINT NOT NULL DEFAULT 0,
    avg_latency_ms DOUBLE PRECISION,
    error_count BIGINT NOT NULL DEFAULT 0,
    active_subscriptions BIGINT NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);

CREATE TABLE routing_rules (
    id TEXT PRIMARY KEY,
    rule_name VARCHAR(100) NOT NULL UNIQUE,
    source_pattern VARCHAR(200) NOT NULL,
    target_topic VARCHAR(200) NOT NULL,
    routing_key_template VARCHAR(200),
    conditions TEXT NOT NULL DEFAULT '{}',
    priority BIGINT NOT NULL DEFAULT 1,
    enabled BIGINT NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL
);

CREATE INDEX idx_topics_enabled ON topics (enabled);
CREATE INDEX idx_subscriptions_topic_status ON subscriptions (topic_name, status);
CREATE INDEX idx_distribution_stats_topic_time ON distribution_stats (topic_name, timestamp DESC);
CREATE INDEX idx_routing_rules_priority ON routing_rules (priority, enabled);

-- The command side (spec: "Database Schema, Command Side"), SQLite form.
-- Timestamps are RFC 3339 text and ids are text, in both databases: one set
-- of queries serves both through sqlx's Any driver, which has no timestamp
-- or UUID type. Booleans are stored as 0/1 and read as integers.

CREATE TABLE topics (
    id TEXT PRIMARY KEY,
    topic_name TEXT NOT NULL UNIQUE CHECK (length(topic_name) <= 200),
    partitions INTEGER NOT NULL DEFAULT 1,
    retention_policy TEXT NOT NULL DEFAULT '7d' CHECK (length(retention_policy) <= 50),
    compression_type TEXT NOT NULL DEFAULT 'LZ4' CHECK (length(compression_type) <= 20),
    schema_version TEXT CHECK (length(schema_version) <= 10),
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY,
    subscription_id TEXT NOT NULL UNIQUE CHECK (length(subscription_id) <= 100 + 201),
    topic_name TEXT NOT NULL CHECK (length(topic_name) <= 200),
    subscription_name TEXT NOT NULL CHECK (length(subscription_name) <= 100),
    subscription_type TEXT NOT NULL CHECK (length(subscription_type) <= 20),
    consumer_group TEXT CHECK (length(consumer_group) <= 100),
    filters TEXT NOT NULL DEFAULT '{}',
    start_position TEXT NOT NULL DEFAULT 'Latest' CHECK (length(start_position) <= 20),
    status TEXT NOT NULL DEFAULT 'active' CHECK (length(status) <= 20),
    created_at TEXT NOT NULL,
    last_activity TEXT NOT NULL
);

CREATE TABLE distribution_stats (
    id TEXT PRIMARY KEY,
    timestamp TEXT NOT NULL,
    topic_name TEXT NOT NULL CHECK (length(topic_name) <= 200),
    messages_distributed INTEGER NOT NULL DEFAULT 0,
    bytes_distributed INTEGER NOT NULL DEFAULT 0,
    avg_latency_ms REAL,
    error_count INTEGER NOT NULL DEFAULT 0,
    active_subscriptions INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);

CREATE TABLE routing_rules (
    id TEXT PRIMARY KEY,
    rule_name TEXT NOT NULL UNIQUE CHECK (length(rule_name) <= 100),
    source_pattern TEXT NOT NULL CHECK (length(source_pattern) <= 200),
    target_topic TEXT NOT NULL CHECK (length(target_topic) <= 200),
    routing_key_template TEXT CHECK (length(routing_key_template) <= 200),
    conditions TEXT NOT NULL DEFAULT '{}',
    priority INTEGER NOT NULL DEFAULT 1,
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL
);

CREATE INDEX idx_topics_enabled ON topics (enabled);
CREATE INDEX idx_subscriptions_topic_status ON subscriptions (topic_name, status);
CREATE INDEX idx_distribution_stats_topic_time ON distribution_stats (topic_name, timestamp DESC);
CREATE INDEX idx_routing_rules_priority ON routing_rules (priority, enabled);

-- The query side (spec: "Query Side"), SQLite form: plain tables, the
-- retention a DELETE by time. `timestamp` is RFC 3339 text, `ts_ns` UTC ns.

CREATE TABLE distribution_metrics_ts (
    timestamp TEXT NOT NULL,
    ts_ns BIGINT NOT NULL,
    topic_name VARCHAR(200) NOT NULL,
    partition_id BIGINT NOT NULL,
    throughput_per_second DOUBLE PRECISION,
    latency_p50_ms DOUBLE PRECISION,
    latency_p99_ms DOUBLE PRECISION,
    error_rate DOUBLE PRECISION,
    backlog_size BIGINT,
    consumer_count BIGINT,
    producer_count BIGINT
);

CREATE TABLE message_delivery_log (
    timestamp TEXT NOT NULL,
    ts_ns BIGINT NOT NULL,
    message_id VARCHAR(100) NOT NULL,
    topic_name VARCHAR(200) NOT NULL,
    partition_id BIGINT NOT NULL,
    offset_position BIGINT NOT NULL,
    delivery_latency_ms DOUBLE PRECISION,
    retry_count BIGINT NOT NULL DEFAULT 0,
    status VARCHAR(20) NOT NULL,
    error_message TEXT
);

CREATE INDEX idx_distribution_metrics_topic_time ON distribution_metrics_ts (topic_name, ts_ns DESC);
CREATE INDEX idx_delivery_log_message_time ON message_delivery_log (message_id, ts_ns DESC);

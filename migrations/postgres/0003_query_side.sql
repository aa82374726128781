-- The query side (spec: "Query Side"): time series written every interval,
-- kept for a retention and read by time range. A TimescaleDB hypertable
-- when the extension is available (chunks of 1 hour and 1 day, as the spec
-- says), native declarative range partitioning by time otherwise: the
-- edge creates the hourly (daily) partitions ahead of the rows and drops
-- those past the retention; a DEFAULT partition keeps any row outside
-- them, so nothing is ever refused. `ts_ns` (UTC ns) is what the edge
-- reads back (sqlx's Any driver has no timestamp type).

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        CREATE TABLE distribution_metrics_ts (
            timestamp TIMESTAMPTZ NOT NULL,
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
        PERFORM create_hypertable('distribution_metrics_ts', 'timestamp', chunk_time_interval => INTERVAL '1 hour');
        CREATE TABLE message_delivery_log (
            timestamp TIMESTAMPTZ NOT NULL,
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
        PERFORM create_hypertable('message_delivery_log', 'timestamp', chunk_time_interval => INTERVAL '1 day');
    ELSE
        CREATE TABLE distribution_metrics_ts (
            timestamp TIMESTAMPTZ NOT NULL,
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
        ) PARTITION BY RANGE (timestamp);
        CREATE TABLE distribution_metrics_ts_default PARTITION OF distribution_metrics_ts DEFAULT;
        CREATE TABLE message_delivery_log (
            timestamp TIMESTAMPTZ NOT NULL,
            ts_ns BIGINT NOT NULL,
            message_id VARCHAR(100) NOT NULL,
            topic_name VARCHAR(200) NOT NULL,
            partition_id BIGINT NOT NULL,
            offset_position BIGINT NOT NULL,
            delivery_latency_ms DOUBLE PRECISION,
            retry_count BIGINT NOT NULL DEFAULT 0,
            status VARCHAR(20) NOT NULL,
            error_message TEXT
        ) PARTITION BY RANGE (timestamp);
        CREATE TABLE message_delivery_log_default PARTITION OF message_delivery_log DEFAULT;
    END IF;
END
$$;

CREATE INDEX idx_distribution_metrics_topic_time ON distribution_metrics_ts (topic_name, timestamp DESC);
CREATE INDEX idx_delivery_log_message_time ON message_delivery_log (message_id, timestamp DESC);

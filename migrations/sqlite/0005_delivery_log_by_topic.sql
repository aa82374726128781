-- GET /api/v1/stats/deliveries reads a topic's rows over a time range.
CREATE INDEX idx_delivery_log_topic_time ON message_delivery_log (topic_name, ts_ns);

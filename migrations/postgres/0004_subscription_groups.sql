-- Subscription groups (AT_LEAST_ONCE): each partition's acknowledged
-- cursor (the first sequence not yet done: everything before it was
-- acknowledged, filtered out or dead-lettered), written in batches by the
-- group, never per event; and the events given up on after the most
-- redeliveries a subscription allows, with the reason.
CREATE TABLE subscription_cursors (
    subscription_id TEXT NOT NULL CHECK (length(subscription_id) <= 301),
    partition_id INTEGER NOT NULL,
    next_sequence BIGINT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (subscription_id, partition_id)
);

CREATE TABLE dead_letters (
    id TEXT PRIMARY KEY,
    subscription_id TEXT NOT NULL CHECK (length(subscription_id) <= 301),
    topic_name TEXT NOT NULL CHECK (length(topic_name) <= 200),
    partition_id INTEGER NOT NULL,
    sequence_number BIGINT NOT NULL,
    message_id TEXT NOT NULL,
    deliveries INTEGER NOT NULL,
    reason TEXT NOT NULL,
    event TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE INDEX idx_dead_letters_subscription ON dead_letters (subscription_id, created_at);

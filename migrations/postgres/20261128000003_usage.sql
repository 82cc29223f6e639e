-- Metered usage: one row per finished request, exactly once.
--
-- usage_request_ids is the idempotency record: its primary key makes
-- (tenant_id, request_id) unique across all time, which the month-partitioned
-- events table cannot do on its own (a partitioned table's unique keys must
-- contain the partition key). An event is inserted only in the statement
-- that inserted its id.

CREATE TABLE usage_request_ids (
    tenant_id  TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, request_id)
);

CREATE TABLE usage_events (
    tenant_id         TEXT NOT NULL,
    request_id        TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    device_profile    TEXT NOT NULL,
    prompt_tokens     BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens BIGINT NOT NULL CHECK (completion_tokens >= 0),
    queue_time_us     BIGINT NOT NULL,
    ttft_us           BIGINT NOT NULL,
    total_time_us     BIGINT NOT NULL,
    device_time_us    BIGINT NOT NULL,
    energy_mj         BIGINT NOT NULL,
    mean_power_mw     BIGINT NOT NULL,
    finish_reason     TEXT NOT NULL,
    started_at_us     BIGINT NOT NULL,
    finished_at_us    BIGINT NOT NULL,
    recorded_at_us    BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, finished_at_us, request_id)
) PARTITION BY RANGE (finished_at_us);

-- Monthly partitions are created by the writer before it inserts into a
-- month; this one only catches what falls outside them.
CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT;

-- Hourly rollups per tenant and model, updated in the same statement that
-- inserts the events, so they always equal the sum of the events.
CREATE TABLE usage_hourly (
    tenant_id         TEXT NOT NULL,
    model             TEXT NOT NULL,
    hour_us           BIGINT NOT NULL,
    requests          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    device_time_us    BIGINT NOT NULL,
    energy_mj         BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, hour_us, model)
);

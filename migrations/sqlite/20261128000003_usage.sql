-- Metered usage: one row per finished request, exactly once. Same logical
-- schema as migrations/postgres, without partitions.

CREATE TABLE usage_request_ids (
    tenant_id  TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, request_id)
) STRICT;

CREATE TABLE usage_events (
    tenant_id         TEXT NOT NULL,
    request_id        TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    device_profile    TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
    queue_time_us     INTEGER NOT NULL,
    ttft_us           INTEGER NOT NULL,
    total_time_us     INTEGER NOT NULL,
    device_time_us    INTEGER NOT NULL,
    energy_mj         INTEGER NOT NULL,
    mean_power_mw     INTEGER NOT NULL,
    finish_reason     TEXT NOT NULL,
    started_at_us     INTEGER NOT NULL,
    finished_at_us    INTEGER NOT NULL,
    recorded_at_us    INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, finished_at_us, request_id)
) STRICT;

CREATE TABLE usage_hourly (
    tenant_id         TEXT NOT NULL,
    model             TEXT NOT NULL,
    hour_us           INTEGER NOT NULL,
    requests          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    device_time_us    INTEGER NOT NULL,
    energy_mj         INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, hour_us, model)
) STRICT;

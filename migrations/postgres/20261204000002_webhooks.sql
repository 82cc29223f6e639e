-- Webhooks (issue 21): endpoints, the durable outbox of events, and one
-- delivery row per (event, endpoint). An event is written in the transaction
-- of the change that caused it (or, for thresholds read off the metered
-- usage, once per dedupe_key by whichever replica sees it first), together
-- with its deliveries; replicas claim due deliveries with a lease, so each
-- is sent by one replica at a time and at least once.

CREATE TABLE webhooks (
    id            TEXT PRIMARY KEY,
    -- NULL: the operator's endpoint, for every tenant's events.
    tenant_id     TEXT REFERENCES tenants (id),
    url           TEXT NOT NULL,
    -- Space-separated event types, with a space at each end for matching.
    events        TEXT NOT NULL,
    -- The HMAC key; shown once at creation.
    signing_secret TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    deleted_at_us BIGINT
);

CREATE TABLE webhook_events (
    id            TEXT PRIMARY KEY,
    type          TEXT NOT NULL,
    tenant_id     TEXT,
    -- What makes two events one: a threshold of a month, a key's expiry...
    dedupe_key    TEXT NOT NULL UNIQUE,
    -- The exact body every delivery of the event sends.
    body          TEXT NOT NULL,
    created_at_us BIGINT NOT NULL
);

CREATE TABLE webhook_deliveries (
    id                 TEXT PRIMARY KEY,
    event_id           TEXT NOT NULL REFERENCES webhook_events (id),
    webhook_id         TEXT NOT NULL REFERENCES webhooks (id),
    attempts           BIGINT NOT NULL DEFAULT 0,
    next_attempt_at_us BIGINT NOT NULL,
    -- A replica's claim: others leave the row alone until it passes.
    locked_until_us    BIGINT,
    delivered_at_us    BIGINT,
    -- Given up on (retries exhausted, or the endpoint deleted).
    failed_at_us       BIGINT,
    last_status        BIGINT,
    last_error         TEXT NOT NULL DEFAULT '',
    UNIQUE (event_id, webhook_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at_us)
    WHERE delivered_at_us IS NULL AND failed_at_us IS NULL;
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, id);

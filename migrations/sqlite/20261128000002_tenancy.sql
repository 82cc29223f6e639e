-- Tenants, price plan names, API keys and the append-only admin audit log.
-- Same logical schema as migrations/postgres. Times are microseconds since
-- the Unix epoch (UTC).

CREATE TABLE price_plans (
    name          TEXT PRIMARY KEY,
    currency_code TEXT NOT NULL CHECK (length(currency_code) = 3 AND currency_code = upper(currency_code)),
    description   TEXT NOT NULL DEFAULT '',
    created_at_us INTEGER NOT NULL
) STRICT;

INSERT INTO price_plans (name, currency_code, description, created_at_us)
VALUES ('standard', 'USD', 'Example plan; prices are set by billing', 0);

CREATE TABLE tenants (
    id                      TEXT PRIMARY KEY,
    slug                    TEXT NOT NULL UNIQUE,
    display_name            TEXT NOT NULL,
    status                  TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'deleted')),
    status_reason           TEXT NOT NULL DEFAULT '',
    price_plan              TEXT NOT NULL REFERENCES price_plans (name),
    scheduling_weight       INTEGER NOT NULL CHECK (scheduling_weight >= 1),
    requests_per_second     REAL CHECK (requests_per_second > 0),
    burst                   INTEGER CHECK (burst >= 1),
    tokens_per_minute       INTEGER CHECK (tokens_per_minute > 0),
    max_concurrent_requests INTEGER CHECK (max_concurrent_requests > 0),
    monthly_token_quota     INTEGER CHECK (monthly_token_quota > 0),
    created_at_us           INTEGER NOT NULL,
    updated_at_us           INTEGER NOT NULL
) STRICT;

CREATE TABLE api_keys (
    key_id                    TEXT PRIMARY KEY,
    tenant_id                 TEXT NOT NULL REFERENCES tenants (id),
    name                      TEXT NOT NULL,
    scopes                    TEXT NOT NULL,
    secret_hash               TEXT NOT NULL,
    previous_secret_hash      TEXT,
    previous_expires_at_us    INTEGER,
    created_at_us             INTEGER NOT NULL,
    expires_at_us             INTEGER,
    revoked_at_us             INTEGER,
    last_used_at_us           INTEGER
) STRICT;
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, key_id);

CREATE TABLE admin_audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at_us       INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    tenant_id   TEXT,
    before_json TEXT NOT NULL,
    after_json  TEXT NOT NULL
);
CREATE INDEX admin_audit_log_by_tenant ON admin_audit_log (tenant_id, id);

CREATE TRIGGER admin_audit_log_no_update BEFORE UPDATE ON admin_audit_log
BEGIN
    SELECT RAISE(ABORT, 'admin_audit_log is append-only');
END;

CREATE TRIGGER admin_audit_log_no_delete BEFORE DELETE ON admin_audit_log
BEGIN
    SELECT RAISE(ABORT, 'admin_audit_log is append-only');
END;

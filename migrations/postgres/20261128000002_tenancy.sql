-- Tenants, price plan names, API keys and the append-only admin audit log.
-- Same logical schema as migrations/sqlite. Times are microseconds since the
-- Unix epoch (UTC); every integer is BIGINT so the Any driver reads it as i64.

CREATE TABLE price_plans (
    name          TEXT PRIMARY KEY,
    currency_code TEXT NOT NULL CHECK (currency_code ~ '^[A-Z]{3}$'),
    description   TEXT NOT NULL DEFAULT '',
    created_at_us BIGINT NOT NULL
);

-- An example plan so a fresh gateway can create tenants; its prices arrive
-- with billing. Operators add their own plans.
INSERT INTO price_plans (name, currency_code, description, created_at_us)
VALUES ('standard', 'USD', 'Example plan; prices are set by billing', 0);

CREATE TABLE tenants (
    id                      TEXT PRIMARY KEY,
    slug                    TEXT NOT NULL UNIQUE,
    display_name            TEXT NOT NULL,
    status                  TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'deleted')),
    status_reason           TEXT NOT NULL DEFAULT '',
    price_plan              TEXT NOT NULL REFERENCES price_plans (name),
    scheduling_weight       BIGINT NOT NULL CHECK (scheduling_weight >= 1),
    requests_per_second     DOUBLE PRECISION CHECK (requests_per_second > 0),
    burst                   BIGINT CHECK (burst >= 1),
    tokens_per_minute       BIGINT CHECK (tokens_per_minute > 0),
    max_concurrent_requests BIGINT CHECK (max_concurrent_requests > 0),
    monthly_token_quota     BIGINT CHECK (monthly_token_quota > 0),
    created_at_us           BIGINT NOT NULL,
    updated_at_us           BIGINT NOT NULL
);

CREATE TABLE api_keys (
    key_id                    TEXT PRIMARY KEY,
    tenant_id                 TEXT NOT NULL REFERENCES tenants (id),
    name                      TEXT NOT NULL,
    -- Space-separated, e.g. 'inference billing:read'.
    scopes                    TEXT NOT NULL,
    -- Hex SHA-256 of the full key; the key itself is never stored.
    secret_hash               TEXT NOT NULL,
    -- During a rotation's overlap the previous secret is still accepted.
    previous_secret_hash      TEXT,
    previous_expires_at_us    BIGINT,
    created_at_us             BIGINT NOT NULL,
    expires_at_us             BIGINT,
    revoked_at_us             BIGINT,
    last_used_at_us           BIGINT
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, key_id);

CREATE TABLE admin_audit_log (
    id          BIGSERIAL PRIMARY KEY,
    at_us       BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    tenant_id   TEXT,
    before_json TEXT NOT NULL,
    after_json  TEXT NOT NULL
);
CREATE INDEX admin_audit_log_by_tenant ON admin_audit_log (tenant_id, id);

-- Append-only, enforced by the database: no role the application uses can
-- edit or remove history.
CREATE FUNCTION admin_audit_log_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'admin_audit_log is append-only';
END;
$$;

CREATE TRIGGER admin_audit_log_no_update BEFORE UPDATE OR DELETE ON admin_audit_log
FOR EACH ROW EXECUTE FUNCTION admin_audit_log_is_append_only();

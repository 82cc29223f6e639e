-- Named operators with roles (issue 22): who did what in the audit log.
-- Tokens are agwop_<id>_<secret>; only the SHA-256 of the whole token is kept.
CREATE TABLE operators (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'billing', 'viewer')),
    token_hash    TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    revoked_at_us BIGINT
);

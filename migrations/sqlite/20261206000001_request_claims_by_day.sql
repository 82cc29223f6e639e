-- Idempotency claims kept only over the window in which a duplicate can
-- arrive (the PostgreSQL migration of the same name explains the design):
-- one row per attempt, decided in one writer transaction, and the
-- idempotency sweep deletes claims made before the window.
CREATE TABLE request_claims_by_attempt (
    tenant_id      TEXT NOT NULL,
    request_id     TEXT NOT NULL,
    attempt        INTEGER NOT NULL CHECK (attempt >= 0),
    state          TEXT NOT NULL CHECK (state IN ('running', 'completed', 'released', 'vacated')),
    fingerprint    TEXT NOT NULL,
    claimed_at_us  INTEGER NOT NULL,
    lease_until_us INTEGER NOT NULL,
    expires_at_us  INTEGER NOT NULL,
    answer         BLOB,
    PRIMARY KEY (tenant_id, request_id, attempt, claimed_at_us)
) STRICT;

INSERT INTO request_claims_by_attempt
SELECT tenant_id, request_id, attempt, state, fingerprint, claimed_at_us, lease_until_us,
       expires_at_us, answer
FROM request_claims
WHERE state = 'running' OR answer IS NOT NULL;

DROP TABLE request_claims;
ALTER TABLE request_claims_by_attempt RENAME TO request_claims;

CREATE INDEX request_claims_answers ON request_claims (expires_at_us) WHERE answer IS NOT NULL;
-- The sweep of claims made before the window.
CREATE INDEX request_claims_claimed ON request_claims (claimed_at_us);

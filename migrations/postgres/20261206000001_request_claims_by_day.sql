-- Idempotency claims kept only over the window in which a duplicate can
-- arrive, and dropped a whole day at a time, never row by row.
--
-- The claims table was one row per (tenant_id, request_id) forever: at
-- thousands of requests per second a B-tree that every admission probes
-- and that grows without end. Now it is partitioned by the day a claim was
-- made (request_claims_d<days since the epoch>), and the idempotency sweep
-- drops a day once no claim in it can still matter: its answers' retention
-- and its leases are over (idempotency.retention + idempotency.in_progress_ttl
-- + one day after the day ends).
--
-- A partitioned table's unique keys must hold its partition key, so the
-- database no longer makes (tenant_id, request_id) unique by itself: each
-- claim is decided in a transaction under an advisory lock on the id, which
-- serializes the claims of one id on every replica, and each attempt is a
-- row of its own (the newest decides). An id reused after its day was
-- dropped starts again at attempt 0; its execution is metered as its own
-- event (the usage key holds the finish time), so nothing is billed twice.
--
-- Upgrade every replica together: a gateway of the previous version finds no
-- unique key to upsert on, takes that for an outage, and decides claims on
-- its own node until it is upgraded.
ALTER TABLE request_claims RENAME TO request_claims_unbounded;
ALTER INDEX request_claims_answers RENAME TO request_claims_unbounded_answers;
ALTER TABLE request_claims_unbounded
    RENAME CONSTRAINT request_claims_pkey TO request_claims_unbounded_pkey;

CREATE TABLE request_claims (
    tenant_id      TEXT NOT NULL,
    request_id     TEXT NOT NULL,
    attempt        BIGINT NOT NULL CHECK (attempt >= 0),
    state          TEXT NOT NULL CHECK (state IN ('running', 'completed', 'released', 'vacated')),
    fingerprint    TEXT NOT NULL,
    claimed_at_us  BIGINT NOT NULL,
    lease_until_us BIGINT NOT NULL,
    expires_at_us  BIGINT NOT NULL,
    answer         BYTEA,
    PRIMARY KEY (tenant_id, request_id, attempt, claimed_at_us)
) PARTITION BY RANGE (claimed_at_us);

-- The days the kept claims were made on, and today and the next two (the
-- gateway creates later days ahead of time).
DO $$
DECLARE
    day BIGINT;
BEGIN
    FOR day IN
        SELECT DISTINCT claimed_at_us / 86400000000 FROM request_claims_unbounded
        WHERE state = 'running' OR answer IS NOT NULL
        UNION
        SELECT floor(extract(epoch FROM now()) / 86400)::bigint + ahead
        FROM generate_series(0, 2) AS ahead
    LOOP
        EXECUTE format(
            'CREATE TABLE request_claims_d%s PARTITION OF request_claims FOR VALUES FROM (%s) TO (%s)',
            day, day * 86400000000, (day + 1) * 86400000000);
    END LOOP;
END $$;

-- What can still matter: claims running, and answers still replayed.
INSERT INTO request_claims
SELECT tenant_id, request_id, attempt, state, fingerprint, claimed_at_us, lease_until_us,
       expires_at_us, answer
FROM request_claims_unbounded
WHERE state = 'running' OR answer IS NOT NULL;

DROP TABLE request_claims_unbounded;

CREATE INDEX request_claims_answers ON request_claims (expires_at_us) WHERE answer IS NOT NULL;

-- Idempotency claims: the first request with a (tenant_id, request_id)
-- claims it at admission, before any limit or work. While it runs, a
-- duplicate is refused; once it completed, a duplicate within the retention
-- gets the stored answer; after that (or after a release: the request was
-- refused or failed) the id may be claimed anew, as the next attempt.
--
-- attempt numbers the executions of one id: metering records attempt 0 as
-- the request id itself and attempt n as "<request id> #<n>", so each
-- execution is billed once and a replay never is. A claim released before
-- any work ran ('vacated': refused by a limit, the queue full) leaves its
-- number to the next claim; one released after work ran ('released':
-- cancelled, failed, its usage metered) does not.
CREATE TABLE request_claims (
    tenant_id      TEXT NOT NULL,
    request_id     TEXT NOT NULL,
    attempt        BIGINT NOT NULL CHECK (attempt >= 0),
    state          TEXT NOT NULL CHECK (state IN ('running', 'completed', 'released', 'vacated')),
    -- SHA-256 of the request as sent, without its request_id: a reuse of the
    -- id for another request is refused rather than answered.
    fingerprint    TEXT NOT NULL,
    claimed_at_us  BIGINT NOT NULL,
    -- A running claim is abandoned (its gateway died) after this.
    lease_until_us BIGINT NOT NULL,
    -- A completed claim's answer is replayed until this.
    expires_at_us  BIGINT NOT NULL,
    answer         BYTEA,
    PRIMARY KEY (tenant_id, request_id)
);

-- The sweep that drops answers past their retention.
CREATE INDEX request_claims_answers ON request_claims (expires_at_us) WHERE answer IS NOT NULL;

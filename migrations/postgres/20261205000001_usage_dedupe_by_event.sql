-- The idempotency record of metering is the events table's own primary key,
-- (tenant_id, finished_at_us, request_id): a shipped record and its replay
-- are the same bytes, so they meet on it, in the month partition the event
-- lives in, and the key goes when that partition is archived and dropped.
-- The all-time usage_request_ids grew by one row per request forever and
-- every insert probed it; two executions of one client request id are
-- already metered under ids of their own (request_claims' attempts).
DROP TABLE usage_request_ids;

-- Per-key limits inside the tenant's (issue 21): a request passes its key's
-- limits and its tenant's. NULL: the key has no limit of that kind. The
-- budget is in the currency of the tenant's plan when it was set.
ALTER TABLE api_keys ADD COLUMN requests_per_second DOUBLE PRECISION CHECK (requests_per_second > 0);
ALTER TABLE api_keys ADD COLUMN burst BIGINT CHECK (burst >= 1);
ALTER TABLE api_keys ADD COLUMN tokens_per_minute BIGINT CHECK (tokens_per_minute > 0);
ALTER TABLE api_keys ADD COLUMN max_concurrent_requests BIGINT CHECK (max_concurrent_requests > 0);
ALTER TABLE api_keys ADD COLUMN monthly_budget_nanos BIGINT CHECK (monthly_budget_nanos > 0);
ALTER TABLE api_keys ADD COLUMN monthly_budget_currency TEXT;

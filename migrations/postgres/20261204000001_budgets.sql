-- Monthly spend budgets (issue 21): a cap on a tenant's spend in a calendar
-- month (UTC), in billionths of the currency's major unit, in the currency of
-- the tenant's price plan when it was set. Both NULL: no budget.
ALTER TABLE tenants
    ADD COLUMN monthly_budget_nanos BIGINT CHECK (monthly_budget_nanos > 0);
ALTER TABLE tenants
    ADD COLUMN monthly_budget_currency TEXT;

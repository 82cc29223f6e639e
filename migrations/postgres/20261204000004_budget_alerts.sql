-- The percentages of a tenant's monthly budget that send
-- budget.threshold_reached (issue 21), space-separated, ascending; NULL: the
-- gateway's webhooks.budget_thresholds.
ALTER TABLE tenants ADD COLUMN budget_alert_percents TEXT;

-- The default served model is now `v4-small` (DeepSeek V4's tokenizer): the
-- example `standard` plan prices it as it prices the other presets, unless the
-- plan already has a price of its own for the id (any device class, any time).
INSERT INTO prices (plan, model, device_class, effective_from_us, prompt_per_million_nanos,
                    completion_per_million_nanos, per_kwh_nanos, created_at_us)
SELECT 'standard', 'v4-small', device_class, 0, nanos, nanos, NULL, 0
FROM (SELECT 'ascend-910b' AS device_class, 80000000 AS nanos
      UNION ALL SELECT 'h100-sxm', 140000000) AS example
WHERE EXISTS (SELECT 1 FROM price_plans WHERE name = 'standard')
  AND NOT EXISTS (SELECT 1 FROM prices WHERE plan = 'standard' AND model = 'v4-small');

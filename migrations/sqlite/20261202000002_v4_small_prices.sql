-- The default served model is now `v4-small` (DeepSeek V4's tokenizer): the
-- example `standard` plan prices it as it prices the other presets. A plan
-- that already has a price for the id keeps its own.
INSERT INTO prices (plan, model, device_class, effective_from_us, prompt_per_million_nanos,
                    completion_per_million_nanos, per_kwh_nanos, created_at_us)
VALUES ('standard', 'v4-small', 'ascend-910b', 0, 80000000, 80000000, NULL, 0),
       ('standard', 'v4-small', 'h100-sxm',    0, 140000000, 140000000, NULL, 0)
ON CONFLICT DO NOTHING;

-- Context caching: prompt tokens whose KV came from the prefix cache are
-- metered apart (a part of prompt_tokens) and may have their own price.

-- No CHECK: on PostgreSQL it would scan every partition under an exclusive
-- lock at startup (NOT VALID is not allowed on partitioned tables), and one
-- violating row would fail a whole batch; serving keeps it <= prompt_tokens.
ALTER TABLE usage_events
    ADD COLUMN cached_prompt_tokens BIGINT NOT NULL DEFAULT 0;

ALTER TABLE usage_hourly
    ADD COLUMN cached_prompt_tokens BIGINT NOT NULL DEFAULT 0;

-- Per million cache-hit prompt tokens; NULL: the prompt price.
ALTER TABLE prices
    ADD COLUMN cached_prompt_per_million_nanos BIGINT
    CHECK (cached_prompt_per_million_nanos >= 0);

-- Invoice lines bill cache hits on lines of their own; prompt_tokens lines
-- bill the prompt tokens that were computed.
ALTER TABLE invoice_lines DROP CONSTRAINT invoice_lines_kind_check;
ALTER TABLE invoice_lines ADD CONSTRAINT invoice_lines_kind_check
    CHECK (kind IN ('prompt_tokens', 'cached_prompt_tokens', 'completion_tokens', 'energy'));

-- Whose cached prompt prefixes a tenant's requests may reuse: its own
-- ('tenant', the default) or the pool every opted-in tenant shares ('shared').
ALTER TABLE tenants
    ADD COLUMN cache_scope TEXT NOT NULL DEFAULT 'tenant'
    CHECK (cache_scope IN ('tenant', 'shared'));

-- Context caching: prompt tokens whose KV came from the prefix cache are
-- metered apart (a part of prompt_tokens) and may have their own price.
-- Same logical schema as migrations/postgres.

-- No CHECK: on PostgreSQL it would scan every partition under an exclusive
-- lock at startup (NOT VALID is not allowed on partitioned tables), and one
-- violating row would fail a whole batch; serving keeps it <= prompt_tokens.
ALTER TABLE usage_events
    ADD COLUMN cached_prompt_tokens INTEGER NOT NULL DEFAULT 0;

ALTER TABLE usage_hourly
    ADD COLUMN cached_prompt_tokens INTEGER NOT NULL DEFAULT 0;

-- Per million cache-hit prompt tokens; NULL: the prompt price.
ALTER TABLE prices
    ADD COLUMN cached_prompt_per_million_nanos INTEGER
    CHECK (cached_prompt_per_million_nanos >= 0);

-- Invoice lines bill cache hits on lines of their own; prompt_tokens lines
-- bill the prompt tokens that were computed. SQLite cannot change a CHECK in
-- place: the table is rebuilt (its rows copied as they are; DROP TABLE fires
-- no trigger) and its immutability triggers are made again.
CREATE TABLE invoice_lines_new (
    invoice_id           TEXT NOT NULL REFERENCES invoices (id),
    line_number          INTEGER NOT NULL CHECK (line_number >= 1),
    model                TEXT NOT NULL,
    device_class         TEXT NOT NULL,
    kind                 TEXT NOT NULL
        CHECK (kind IN ('prompt_tokens', 'cached_prompt_tokens', 'completion_tokens', 'energy')),
    quantity             INTEGER NOT NULL CHECK (quantity >= 0),
    unit_price_nanos     INTEGER NOT NULL,
    amount_nanos         INTEGER NOT NULL,
    adjusts_period       TEXT NOT NULL DEFAULT '',
    price_effective_from_us INTEGER NOT NULL,
    PRIMARY KEY (invoice_id, line_number)
) STRICT;

INSERT INTO invoice_lines_new SELECT * FROM invoice_lines;
DROP TABLE invoice_lines;
ALTER TABLE invoice_lines_new RENAME TO invoice_lines;

CREATE TRIGGER invoice_lines_no_insert BEFORE INSERT ON invoice_lines
WHEN (SELECT status FROM invoices WHERE id = NEW.invoice_id) = 'finalized'
BEGIN
    SELECT RAISE(ABORT, 'invoice is finalized and immutable');
END;

CREATE TRIGGER invoice_lines_no_update BEFORE UPDATE ON invoice_lines
WHEN (SELECT status FROM invoices WHERE id = OLD.invoice_id) = 'finalized'
  OR (SELECT status FROM invoices WHERE id = NEW.invoice_id) = 'finalized'
BEGIN
    SELECT RAISE(ABORT, 'invoice is finalized and immutable');
END;

CREATE TRIGGER invoice_lines_no_delete BEFORE DELETE ON invoice_lines
WHEN (SELECT status FROM invoices WHERE id = OLD.invoice_id) = 'finalized'
BEGIN
    SELECT RAISE(ABORT, 'invoice is finalized and immutable');
END;

-- Whose cached prompt prefixes a tenant's requests may reuse: its own
-- ('tenant', the default) or the pool every opted-in tenant shares ('shared').
ALTER TABLE tenants
    ADD COLUMN cache_scope TEXT NOT NULL DEFAULT 'tenant'
    CHECK (cache_scope IN ('tenant', 'shared'));

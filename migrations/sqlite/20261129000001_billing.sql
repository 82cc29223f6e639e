-- Billing: prices (insert-only), invoices and their lines (immutable once
-- finalized). Same logical schema as migrations/postgres.

CREATE TABLE prices (
    plan                         TEXT NOT NULL REFERENCES price_plans (name),
    model                        TEXT NOT NULL CHECK (model <> ''),
    device_class                 TEXT NOT NULL,
    effective_from_us            INTEGER NOT NULL,
    prompt_per_million_nanos     INTEGER NOT NULL CHECK (prompt_per_million_nanos >= 0),
    completion_per_million_nanos INTEGER NOT NULL CHECK (completion_per_million_nanos >= 0),
    per_kwh_nanos                INTEGER CHECK (per_kwh_nanos >= 0),
    created_at_us                INTEGER NOT NULL,
    PRIMARY KEY (plan, model, device_class, effective_from_us)
) STRICT;

CREATE TRIGGER prices_no_update BEFORE UPDATE ON prices
BEGIN
    SELECT RAISE(ABORT, 'prices are insert-only: add a price with a later effective_from');
END;

CREATE TRIGGER prices_no_delete BEFORE DELETE ON prices
BEGIN
    SELECT RAISE(ABORT, 'prices are insert-only: add a price with a later effective_from');
END;

UPDATE price_plans
SET description = 'Example plan from the launch figures ($0.08 per million tokens on ascend-910b, $0.14 on h100-sxm); not a real price list'
WHERE name = 'standard';

INSERT INTO prices (plan, model, device_class, effective_from_us, prompt_per_million_nanos,
                    completion_per_million_nanos, per_kwh_nanos, created_at_us)
VALUES ('standard', 'small', 'ascend-910b', 0, 80000000, 80000000, NULL, 0),
       ('standard', 'small', 'h100-sxm',    0, 140000000, 140000000, NULL, 0),
       ('standard', 'tiny',  'ascend-910b', 0, 80000000, 80000000, NULL, 0),
       ('standard', 'tiny',  'h100-sxm',    0, 140000000, 140000000, NULL, 0);

CREATE TABLE invoices (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants (id),
    period          TEXT NOT NULL CHECK (period GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]'),
    status          TEXT NOT NULL CHECK (status IN ('draft', 'finalized')),
    price_plan      TEXT,
    currency_code   TEXT,
    total_nanos     INTEGER,
    created_at_us   INTEGER NOT NULL,
    finalized_at_us INTEGER,
    UNIQUE (tenant_id, period),
    CHECK ((status = 'draft') = (finalized_at_us IS NULL))
) STRICT;

CREATE TABLE invoice_lines (
    invoice_id           TEXT NOT NULL REFERENCES invoices (id),
    line_number          INTEGER NOT NULL CHECK (line_number >= 1),
    model                TEXT NOT NULL,
    device_class         TEXT NOT NULL,
    kind                 TEXT NOT NULL CHECK (kind IN ('prompt_tokens', 'completion_tokens', 'energy')),
    quantity             INTEGER NOT NULL CHECK (quantity >= 0),
    unit_price_nanos     INTEGER NOT NULL,
    amount_nanos         INTEGER NOT NULL,
    adjusts_period       TEXT NOT NULL DEFAULT '',
    price_effective_from_us INTEGER NOT NULL,
    PRIMARY KEY (invoice_id, line_number)
) STRICT;

CREATE TRIGGER invoices_no_update BEFORE UPDATE ON invoices
WHEN OLD.status = 'finalized'
BEGIN
    SELECT RAISE(ABORT, 'invoice is finalized and immutable');
END;

CREATE TRIGGER invoices_no_delete BEFORE DELETE ON invoices
WHEN OLD.status = 'finalized'
BEGIN
    SELECT RAISE(ABORT, 'invoice is finalized and immutable');
END;

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

-- Late usage is found by when it was recorded: an invoice's adjustments are
-- the events recorded since the previous finalization.
CREATE INDEX usage_events_by_recorded ON usage_events (tenant_id, recorded_at_us);

-- Billing: prices (insert-only), invoices and their lines (immutable once
-- finalized). Same logical schema as migrations/sqlite. Money is BIGINT
-- nanos of the plan's currency (billionths of the major unit).

-- A price of one model on one device class, from `effective_from_us` on. A
-- change is a new row with a later effective_from; rows are never edited, so
-- a price change never rewrites an invoice already computed.
CREATE TABLE prices (
    plan                         TEXT NOT NULL REFERENCES price_plans (name),
    model                        TEXT NOT NULL CHECK (model <> ''),
    -- A device profile such as 'ascend-910b'; '' matches any device.
    device_class                 TEXT NOT NULL,
    effective_from_us            BIGINT NOT NULL,
    prompt_per_million_nanos     BIGINT NOT NULL CHECK (prompt_per_million_nanos >= 0),
    completion_per_million_nanos BIGINT NOT NULL CHECK (completion_per_million_nanos >= 0),
    per_kwh_nanos                BIGINT CHECK (per_kwh_nanos >= 0),
    created_at_us                BIGINT NOT NULL,
    PRIMARY KEY (plan, model, device_class, effective_from_us)
);

CREATE FUNCTION prices_are_insert_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'prices are insert-only: add a price with a later effective_from';
END;
$$;

CREATE TRIGGER prices_no_update BEFORE UPDATE OR DELETE ON prices
FOR EACH ROW EXECUTE FUNCTION prices_are_insert_only();

-- Example prices from the launch material (about $0.08 per million tokens on
-- an Ascend 910B against $0.14 on an H100), for the two model presets.
UPDATE price_plans
SET description = 'Example plan from the launch figures ($0.08 per million tokens on ascend-910b, $0.14 on h100-sxm); not a real price list'
WHERE name = 'standard';

INSERT INTO prices (plan, model, device_class, effective_from_us, prompt_per_million_nanos,
                    completion_per_million_nanos, per_kwh_nanos, created_at_us)
VALUES ('standard', 'small', 'ascend-910b', 0, 80000000, 80000000, NULL, 0),
       ('standard', 'small', 'h100-sxm',    0, 140000000, 140000000, NULL, 0),
       ('standard', 'tiny',  'ascend-910b', 0, 80000000, 80000000, NULL, 0),
       ('standard', 'tiny',  'h100-sxm',    0, 140000000, 140000000, NULL, 0);

-- One invoice per tenant and calendar month (UTC). A draft's lines are
-- computed from usage on read; finalization writes the lines, the total and
-- the status in one transaction, after which the database refuses changes.
CREATE TABLE invoices (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants (id),
    period          TEXT NOT NULL CHECK (period ~ '^[0-9]{4}-[0-9]{2}$'),
    status          TEXT NOT NULL CHECK (status IN ('draft', 'finalized')),
    -- Set at finalization (plan and currency in force then).
    price_plan      TEXT,
    currency_code   TEXT,
    total_nanos     BIGINT,
    created_at_us   BIGINT NOT NULL,
    finalized_at_us BIGINT,
    UNIQUE (tenant_id, period),
    CHECK ((status = 'draft') = (finalized_at_us IS NULL))
);

CREATE TABLE invoice_lines (
    invoice_id           TEXT NOT NULL REFERENCES invoices (id),
    line_number          BIGINT NOT NULL CHECK (line_number >= 1),
    model                TEXT NOT NULL,
    device_class         TEXT NOT NULL,
    kind                 TEXT NOT NULL CHECK (kind IN ('prompt_tokens', 'completion_tokens', 'energy')),
    quantity             BIGINT NOT NULL CHECK (quantity >= 0),
    unit_price_nanos     BIGINT NOT NULL,
    amount_nanos         BIGINT NOT NULL,
    -- '' for usage of the invoice's own period; else the finalized period
    -- whose late usage this line adjusts.
    adjusts_period       TEXT NOT NULL DEFAULT '',
    price_effective_from_us BIGINT NOT NULL,
    PRIMARY KEY (invoice_id, line_number)
);

CREATE FUNCTION invoices_finalized_are_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'finalized' THEN
        RAISE EXCEPTION 'invoice % is finalized and immutable', OLD.id;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER invoices_immutable BEFORE UPDATE OR DELETE ON invoices
FOR EACH ROW EXECUTE FUNCTION invoices_finalized_are_immutable();

CREATE FUNCTION invoice_lines_of_finalized_are_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    target TEXT;
BEGIN
    IF TG_OP = 'INSERT' THEN
        target := NEW.invoice_id;
    ELSE
        target := OLD.invoice_id;
    END IF;
    IF EXISTS (SELECT 1 FROM invoices WHERE id = target AND status = 'finalized') THEN
        RAISE EXCEPTION 'invoice % is finalized and immutable', target;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.invoice_id <> OLD.invoice_id
       AND EXISTS (SELECT 1 FROM invoices WHERE id = NEW.invoice_id AND status = 'finalized') THEN
        RAISE EXCEPTION 'invoice % is finalized and immutable', NEW.invoice_id;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER invoice_lines_immutable BEFORE INSERT OR UPDATE OR DELETE ON invoice_lines
FOR EACH ROW EXECUTE FUNCTION invoice_lines_of_finalized_are_immutable();

-- Late usage is found by when it was recorded: an invoice's adjustments are
-- the events recorded since the previous finalization.
CREATE INDEX usage_events_by_recorded ON usage_events (tenant_id, recorded_at_us);

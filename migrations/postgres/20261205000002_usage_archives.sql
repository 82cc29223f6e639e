-- Months whose raw usage events were archived to a Parquet file and left the
-- database (hourly rollups and invoices stay). The metering writer refuses
-- an event of such a month: its key may have gone with the partition, so it
-- could be a replay of an archived record. A run archiving a month claims
-- it first ('archiving'), so two runs never write one month's files.
CREATE TABLE usage_archives (
    month_start_us BIGINT PRIMARY KEY,
    period         TEXT NOT NULL UNIQUE,
    state          TEXT NOT NULL CHECK (state IN ('archiving', 'archived', 'restored')),
    -- The run that holds an 'archiving' claim, and since when.
    claim          TEXT NOT NULL,
    claimed_at_us  BIGINT NOT NULL,
    file           TEXT NOT NULL,
    sha256         TEXT NOT NULL,
    events         BIGINT NOT NULL,
    prompt_tokens  BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    archived_at_us BIGINT NOT NULL,
    restored_at_us BIGINT
);

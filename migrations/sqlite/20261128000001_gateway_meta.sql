-- Facts about this installation (its id, and later schema-level flags),
-- one row per key. Same logical schema as migrations/postgres.
CREATE TABLE gateway_meta (
    key           TEXT PRIMARY KEY,
    value         TEXT NOT NULL,
    updated_at_us INTEGER NOT NULL
) STRICT;

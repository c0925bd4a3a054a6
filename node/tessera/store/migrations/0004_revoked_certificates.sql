-- Tessera schema, version 5: certificate serials revoked through any replica.
-- (Run through str.format: literal braces are doubled.)
-- Replicas sharing this database refuse every serial listed here; a new row is announced
-- with NOTIFY on the channel tessera_revocations (payload: the serial in hex).
CREATE TABLE revoked_certificates (
    -- Lowercase hex without 0x, as `tessera certs status` prints serials.
    serial      text        PRIMARY KEY CHECK (serial ~ '^[0-9a-f]+$'),
    reason      text        NOT NULL DEFAULT '',
    revoked_at  timestamptz NOT NULL DEFAULT now()
);

-- Tessera schema, version 8: the event log as a durable, ordered, resumable stream.
-- (Run through str.format: literal braces are doubled.)

-- The log's head and retention watermark. Appends lock this one row (UPDATE ... RETURNING)
-- until they commit, so sequences are dense and assigned in commit order: a reader that has
-- seen sequence s can never later find a committed s' < s it did not see. Pruning never
-- resets the counter (max(sequence) + 1 would, once the table is empty).
CREATE TABLE event_log (
    id              smallint PRIMARY KEY CHECK (id = 1),
    -- Names this log in cursors, so a cursor of another node (database) is refused.
    log_id          uuid     NOT NULL DEFAULT gen_random_uuid(),
    last_sequence   bigint   NOT NULL
);
INSERT INTO event_log (id, last_sequence) SELECT 1, coalesce(max(sequence), 0) FROM events;

-- Separate from event_log so a prune never waits on (or blocks) appends.
CREATE TABLE event_retention (
    id              smallint    PRIMARY KEY CHECK (id = 1),
    -- Every event up to and including this sequence has been pruned.
    pruned_through  bigint      NOT NULL DEFAULT 0,
    pruned_at       timestamptz
);
INSERT INTO event_retention (id, pruned_through) VALUES (1, 0);

-- What scope decisions use is recorded at append time: the subject's team and owner (with
-- workspace and kind, already there), so a later change of the resource does not widen
-- who may see an old event.
ALTER TABLE events
    ADD COLUMN id               uuid        NOT NULL DEFAULT gen_random_uuid(),
    ADD COLUMN team             text        NOT NULL DEFAULT '',
    ADD COLUMN owner            text        NOT NULL DEFAULT '',
    ADD COLUMN origin           text        NOT NULL DEFAULT '',
    ADD COLUMN idempotency_key  text        NOT NULL DEFAULT '',
    ADD COLUMN request_hash     text        NOT NULL DEFAULT '';
CREATE UNIQUE INDEX events_id_idx ON events (id);
CREATE UNIQUE INDEX events_idempotency_idx ON events (actor, idempotency_key)
    WHERE idempotency_key <> '';
CREATE INDEX events_created_idx ON events USING brin (created_at);

-- Durable subscriptions: the server keeps the acknowledged position per (caller, name).
CREATE TABLE event_subscriptions (
    caller          text        NOT NULL,
    name            text        NOT NULL,
    type_patterns   text[]      NOT NULL DEFAULT '{{}}',
    acked_sequence  bigint      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, name)
);

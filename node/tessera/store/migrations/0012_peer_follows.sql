-- Following peers: events received from a followed peer live in this node's own log,
-- tagged with where they came from, and never leave this node again.
-- (Run through str.format: literal braces are doubled.)

-- `peer` is the local name of the followed peer an event was received from; '' marks this
-- node's own events (the only ones a peer may ever be served). `origin_id` is the event's
-- id on the node that produced it: duplicates are dropped by (peer, origin_id). `origin`
-- (from 0008) holds this node's name for its own events and the followed peer's SPIFFE id
-- for received ones.
ALTER TABLE events
    ADD COLUMN peer       text NOT NULL DEFAULT '',
    ADD COLUMN origin_id  uuid,
    -- When the origin appended it (created_at stays this node's receive time, so retention
    -- by age keeps following sequence order).
    ADD COLUMN origin_time timestamptz,
    ADD CONSTRAINT events_received_has_origin_id CHECK (peer = '' OR origin_id IS NOT NULL);
CREATE UNIQUE INDEX events_received_idx ON events (peer, origin_id) WHERE peer <> '';

-- The only relation the statements that serve a peer read: this node's own events. A
-- received event is not in it, whatever a grant says (the no-re-sharing rule).
CREATE VIEW events_shareable AS SELECT * FROM events WHERE peer = '';

-- One row per followed peer (outbound: a peer this node joined). `cursor` is the peer's
-- cursor after the last event whose local insert committed (written in that transaction);
-- the follower acks it on the peer only afterwards.
CREATE TABLE peer_follows (
    peer              text        PRIMARY KEY,
    enabled           boolean     NOT NULL DEFAULT true,
    type_patterns     text[]      NOT NULL DEFAULT '{{}}',
    cursor            text        NOT NULL DEFAULT '',
    state             text        NOT NULL DEFAULT 'starting',
    last_error        text        NOT NULL DEFAULT '',
    received          bigint      NOT NULL DEFAULT 0,
    duplicates        bigint      NOT NULL DEFAULT 0,
    last_event_time   timestamptz,
    last_received_at  timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

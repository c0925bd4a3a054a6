-- The audit log: one row per call, chained by hash (see tessera.audit).
-- Rows are only ever inserted by tessera_audit_append and deleted as a prefix by pruning.
CREATE TABLE audit_log (
    sequence     bigint      PRIMARY KEY,
    time         timestamptz NOT NULL,
    identity     text        NOT NULL DEFAULT '',
    peer         text        NOT NULL DEFAULT '',
    grant_name   text        NOT NULL DEFAULT '',
    service      text        NOT NULL,
    method       text        NOT NULL,
    kind         text        NOT NULL DEFAULT '',
    query_hash   text        NOT NULL DEFAULT '',
    outcome      text        NOT NULL,
    status_code  text        NOT NULL,
    bytes_out    bigint      NOT NULL DEFAULT 0,
    latency_us   bigint      NOT NULL DEFAULT 0,
    trace_id     text        NOT NULL DEFAULT '',
    reason       text        NOT NULL DEFAULT '',
    hash         bytea       NOT NULL
);
-- Time follows sequence closely (rows are appended in time order), so a BRIN index is
-- enough for time filters and costs next to nothing per insert.
CREATE INDEX audit_log_time_idx ON audit_log USING brin (time);
CREATE INDEX audit_log_peer_idx ON audit_log (peer, sequence) WHERE peer <> '';
CREATE INDEX audit_log_grant_idx ON audit_log (grant_name, sequence) WHERE grant_name <> '';

-- The last record written. Writers lock this one row (FOR UPDATE) per batch, so the chain
-- stays linear across replicas sharing the database, and verification notices removed
-- trailing records.
CREATE TABLE audit_head (
    id        smallint PRIMARY KEY CHECK (id = 1),
    sequence  bigint   NOT NULL,
    hash      bytea    NOT NULL
);
INSERT INTO audit_head (id, sequence, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'));

-- The last pruned record: verification of what remains starts from it. A separate row
-- from the head so a long prune never blocks the writers.
CREATE TABLE audit_anchor (
    id         smallint    PRIMARY KEY CHECK (id = 1),
    sequence   bigint      NOT NULL,
    hash       bytea       NOT NULL,
    pruned_at  timestamptz
);
INSERT INTO audit_anchor (id, sequence, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'));

-- Appends one batch in the statement's own transaction: locks the head (so the chain stays
-- linear across replicas), chains each record, inserts the rows, moves the head. One round
-- trip per batch. Each payload is the record's canonical encoding without its sequence
-- (a compact JSON array, see tessera.audit._chain.payload); its hash is
-- sha256(previous hash || sequence || '\n' || payload), and the columns are read back out
-- of the same payload so they cannot differ from what was hashed.
CREATE FUNCTION tessera_audit_append(payloads bytea[]) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    seq   bigint;
    h     bytea;
    seqs  bigint[] := ARRAY[]::bigint[];
    hs    bytea[]  := ARRAY[]::bytea[];
    i     integer;
BEGIN
    -- COMMIT must mean durable, whatever the server's default.
    PERFORM set_config('synchronous_commit', 'on', true);
    SELECT a.sequence, a.hash INTO seq, h FROM audit_head a WHERE a.id = 1 FOR UPDATE;
    FOR i IN 1 .. coalesce(array_length(payloads, 1), 0) LOOP
        seq := seq + 1;
        h := sha256(h || convert_to(seq::text || chr(10), 'UTF8') || payloads[i]);
        seqs := seqs || seq;
        hs := hs || h;
    END LOOP;
    INSERT INTO audit_log (sequence, time, identity, peer, grant_name, service, method, kind,
                           query_hash, outcome, status_code, bytes_out, latency_us, trace_id,
                           reason, hash)
    SELECT r.s,
           to_timestamp(((r.j->>0)::bigint / 1000000)::double precision)
               + ((r.j->>0)::bigint % 1000000) * interval '1 microsecond',
           r.j->>1, r.j->>2, r.j->>3, r.j->>4, r.j->>5, r.j->>6, r.j->>7, r.j->>8, r.j->>9,
           (r.j->>10)::bigint, (r.j->>11)::bigint, r.j->>12, r.j->>13, r.h
    FROM (SELECT u.s, convert_from(u.p, 'UTF8')::jsonb AS j, u.h
          FROM unnest(seqs, payloads, hs) AS u(s, p, h)) AS r;
    UPDATE audit_head SET sequence = seq, hash = h WHERE id = 1;
    RETURN seq;
END
$$;

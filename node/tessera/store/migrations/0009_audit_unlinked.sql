-- Audit records written in the same transaction as the effect they record (a command, a
-- publish, an admin change), so either both commit or neither does. They are not chained
-- yet: the chain needs the head lock, which an effect's transaction must not hold. The
-- audit writer links them into audit_log (oldest first) at its next batch; verification
-- flags rows left here too long.
-- (Run through str.format: literal braces are doubled.)
CREATE TABLE audit_unlinked (
    id          bigserial   PRIMARY KEY,
    payload     bytea       NOT NULL,
    written_at  timestamptz NOT NULL DEFAULT now()
);

-- Called inside the effect's transaction: COMMIT must mean durable, whatever the default.
CREATE FUNCTION tessera_audit_pending(p bytea) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    INSERT INTO audit_unlinked (payload) VALUES (p);
END
$$;

-- As in 0005 (with the detail object), and first links the unlinked rows (they were
-- committed before this batch).
-- A call with nothing to append and nothing to link takes no lock and writes nothing.
CREATE OR REPLACE FUNCTION tessera_audit_append(payloads bytea[]) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    seq      bigint;
    h        bytea;
    pending  bytea[];
    has_pending boolean;
    seqs     bigint[] := ARRAY[]::bigint[];
    hs       bytea[]  := ARRAY[]::bytea[];
    i        integer;
BEGIN
    -- Usually there is nothing to link: one cheap probe, and the batch goes on as in 0005.
    has_pending := EXISTS (SELECT 1 FROM audit_unlinked);
    IF coalesce(array_length(payloads, 1), 0) = 0 AND NOT has_pending THEN
        SELECT a.sequence INTO seq FROM audit_head a WHERE a.id = 1;
        RETURN seq;
    END IF;
    PERFORM set_config('synchronous_commit', 'on', true);
    SELECT a.sequence, a.hash INTO seq, h FROM audit_head a WHERE a.id = 1 FOR UPDATE;
    IF has_pending THEN
        WITH linked AS (
            DELETE FROM audit_unlinked u
            WHERE u.id IN (SELECT x.id FROM audit_unlinked x ORDER BY x.id LIMIT 10000)
            RETURNING u.id, u.payload
        )
        SELECT coalesce(array_agg(l.payload ORDER BY l.id), ARRAY[]::bytea[]) INTO pending
        FROM linked l;
        payloads := pending || coalesce(payloads, ARRAY[]::bytea[]);
    END IF;
    FOR i IN 1 .. coalesce(array_length(payloads, 1), 0) LOOP
        seq := seq + 1;
        h := sha256(h || convert_to(seq::text || chr(10), 'UTF8') || payloads[i]);
        seqs := seqs || seq;
        hs := hs || h;
    END LOOP;
    INSERT INTO audit_log (sequence, time, identity, peer, grant_name, service, method, kind,
                           query_hash, outcome, status_code, bytes_out, latency_us, trace_id,
                           reason, detail, hash)
    SELECT r.s,
           to_timestamp(((r.j->>0)::bigint / 1000000)::double precision)
               + ((r.j->>0)::bigint % 1000000) * interval '1 microsecond',
           r.j->>1, r.j->>2, r.j->>3, r.j->>4, r.j->>5, r.j->>6, r.j->>7, r.j->>8, r.j->>9,
           (r.j->>10)::bigint, (r.j->>11)::bigint, r.j->>12, r.j->>13,
           coalesce(r.j->14, '{{}}'::jsonb), r.h
    FROM (SELECT u.s, convert_from(u.p, 'UTF8')::jsonb AS j, u.h
          FROM unnest(seqs, payloads, hs) AS u(s, p, h)) AS r;
    UPDATE audit_head SET sequence = seq, hash = h WHERE id = 1;
    RETURN seq;
END
$$;

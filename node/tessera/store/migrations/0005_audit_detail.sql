-- Audit records gain an optional detail object, and the prune anchor is chained.
-- (Run through str.format: literal braces are doubled.)
--
-- A payload may now carry a 15th element, a JSON object with sorted keys (see
-- tessera.audit._chain.payload). Payloads without it hash exactly as before, so existing
-- rows verify unchanged. Uses: the prune record (the anchor it left: anchor_sequence,
-- anchor_hash) and aggregated enrolment refusals (source, count).
ALTER TABLE audit_log ADD COLUMN detail jsonb NOT NULL DEFAULT '{{}}'::jsonb;

CREATE OR REPLACE FUNCTION tessera_audit_append(payloads bytea[]) RETURNS bigint
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

-- A log pruned before this version has an anchor no record names: chain it now, so that
-- verification (which from now on requires the anchor to be named by the newest prune
-- record) accepts the anchor as it stands at upgrade time.
SELECT tessera_audit_append(ARRAY[convert_to(
    '[' || ((extract(epoch FROM date_trunc('microseconds', now())) * 1000000)::bigint)::text
    || ',"","","","tessera.audit","Prune","","","ALLOWED","OK",0,0,"","AUDIT_PRUNED",'
    || '{{"anchor_hash":"' || encode(a.hash, 'hex') || '","anchor_sequence":'
    || a.sequence::text || '}}]', 'UTF8')])
FROM audit_anchor a WHERE a.id = 1 AND a.sequence > 0;

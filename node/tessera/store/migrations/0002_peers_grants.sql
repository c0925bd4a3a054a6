-- Tessera schema, version 2: peers, grants and single-use enrolment tokens.
-- (Run through str.format: literal braces are doubled.)
CREATE TABLE peers (
    name                text        PRIMARY KEY,
    -- The SPIFFE URI the peer calls with; admission looks peers up by it on every call.
    identity            text        NOT NULL UNIQUE,
    address             text        NOT NULL DEFAULT '',
    state               text        NOT NULL
                        CHECK (state IN ('INVITED', 'ACTIVE', 'SUSPENDED', 'REVOKED')),
    -- Hex serial of the client certificate signed at enrolment.
    certificate_serial  text        NOT NULL DEFAULT '',
    state_reason        text        NOT NULL DEFAULT '',
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE grants (
    id                uuid             PRIMARY KEY,
    peer              text             NOT NULL REFERENCES peers (name),
    kinds             text[]           NOT NULL DEFAULT '{{}}',
    excluded_kinds    text[]           NOT NULL DEFAULT '{{}}',
    workspaces        text[]           NOT NULL DEFAULT '{{}}',
    teams             text[]           NOT NULL DEFAULT '{{}}',
    subject_user      text             NOT NULL DEFAULT '',
    include_personal  boolean          NOT NULL DEFAULT false,
    row_cap           integer          NOT NULL DEFAULT 0 CHECK (row_cap >= 0),
    command_types     text[]           NOT NULL DEFAULT '{{}}',
    event_types       text[]           NOT NULL DEFAULT '{{}}',
    rate_per_s        double precision NOT NULL DEFAULT 0 CHECK (rate_per_s >= 0),
    burst             integer          NOT NULL DEFAULT 0 CHECK (burst >= 0),
    expire_time       timestamptz,
    created_at        timestamptz      NOT NULL DEFAULT now(),
    revoked_at        timestamptz
);
-- Admission reads the newest unrevoked grant of a peer on every call: keep it one probe.
CREATE INDEX grants_peer_active_idx ON grants (peer, created_at DESC) WHERE revoked_at IS NULL;
CREATE INDEX grants_peer_idx ON grants (peer, created_at, id);

-- Only a hash of a token's secret is stored; the token itself is shown once.
CREATE TABLE enrolment_tokens (
    id           uuid        PRIMARY KEY,
    secret_hash  bytea       NOT NULL,
    peer         text        NOT NULL REFERENCES peers (name),
    expire_time  timestamptz NOT NULL,
    used_at      timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

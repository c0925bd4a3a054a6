-- Tessera schema, version 1: resources with embeddings, the event outbox, operations.
-- {dimension} and {opclass} are filled in from store.embedding_dimension and store.metric.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE node_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE resources (
    workspace   text        NOT NULL,
    kind        text        NOT NULL,
    id          text        NOT NULL,
    title       text        NOT NULL DEFAULT '',
    body        text        NOT NULL DEFAULT '',
    attributes  jsonb       NOT NULL DEFAULT '{{}}'::jsonb,
    embedding   vector({dimension}),
    owner       text        NOT NULL DEFAULT '',
    team        text        NOT NULL DEFAULT '',
    version     bigint      NOT NULL DEFAULT 1,
    fts         tsvector GENERATED ALWAYS AS (
                    to_tsvector('simple', coalesce(title, '') || ' ' || coalesce(body, ''))
                ) STORED,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, kind, id)
);
CREATE INDEX resources_kind_idx ON resources (kind, workspace, id);
CREATE INDEX resources_updated_idx ON resources (updated_at DESC, workspace, kind, id);
CREATE INDEX resources_attributes_idx ON resources USING gin (attributes jsonb_path_ops);
CREATE INDEX resources_fts_idx ON resources USING gin (fts);
CREATE INDEX resources_embedding_idx ON resources USING hnsw (embedding {opclass});

-- The transactional outbox: every write appends its event in the same transaction.
-- Appends take a transaction-level advisory lock so sequence order equals commit order,
-- which lets a follower resume from a sequence without missing late commits.
CREATE TABLE events (
    sequence     bigint      PRIMARY KEY,
    type         text        NOT NULL,
    workspace    text        NOT NULL DEFAULT '',
    kind         text        NOT NULL DEFAULT '',
    resource_id  text        NOT NULL DEFAULT '',
    data         jsonb       NOT NULL DEFAULT '{{}}'::jsonb,
    actor        text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_type_idx ON events (type, sequence);

CREATE TABLE operations (
    name             uuid        PRIMARY KEY,
    caller           text        NOT NULL,
    idempotency_key  text        NOT NULL,
    request_hash     text        NOT NULL,
    command_type     text        NOT NULL,
    state            text        NOT NULL,
    result           jsonb,
    error_code       integer,
    error_message    text,
    event_sequence   bigint,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (caller, idempotency_key)
);
CREATE INDEX operations_caller_idx ON operations (caller, created_at DESC, name);

-- Long-running operations: progress, plugin output, leases held by the runner that executes
-- them, cancellation requests and retry accounting. Existing rows are finished built-ins.
ALTER TABLE operations
    ADD COLUMN progress_percent  integer     NOT NULL DEFAULT -1,
    ADD COLUMN progress_message  text        NOT NULL DEFAULT '',
    ADD COLUMN input             jsonb,
    ADD COLUMN error_reason      text,
    ADD COLUMN lease_owner       text,
    ADD COLUMN lease_expires     timestamptz,
    ADD COLUMN retry_safe        boolean     NOT NULL DEFAULT false,
    ADD COLUMN attempts          integer     NOT NULL DEFAULT 0,
    ADD COLUMN cancel_requested  boolean     NOT NULL DEFAULT false,
    ADD COLUMN started_at        timestamptz,
    ADD COLUMN finished_at       timestamptz;

-- The recovery sweep and the claim of pending work read only unfinished rows.
CREATE INDEX operations_running_lease_idx ON operations (lease_expires)
    WHERE state = 'RUNNING';
CREATE INDEX operations_pending_idx ON operations (created_at)
    WHERE state = 'PENDING';
-- Pruning reads finished rows by age.
CREATE INDEX operations_finished_idx ON operations (finished_at)
    WHERE finished_at IS NOT NULL;
-- ListOperations filters by state and type within a caller.
CREATE INDEX operations_caller_state_idx ON operations (caller, state, created_at DESC, name);

-- Finished built-ins finished when they were created.
UPDATE operations SET finished_at = updated_at WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED');

-- WatchOperation reads one operation's events (kind 'operation', resource_id = its uuid).
CREATE INDEX events_operation_idx ON events (resource_id, sequence)
    WHERE kind = 'operation' AND workspace = '';

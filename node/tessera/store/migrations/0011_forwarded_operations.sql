-- Commands to peers: a local caller's operation that runs on a peer. Its row (state
-- 'FORWARDED', never claimed by a runner) maps the caller's name and key to the peer and
-- the peer's operation name; GetOperation, WatchOperation and CancelOperation relay there.
ALTER TABLE operations
    ADD COLUMN forward_peer      text,
    ADD COLUMN forward_operation text;
-- Pruning finds forwarded rows never seen done by age.
CREATE INDEX operations_forwarded_idx ON operations (created_at) WHERE state = 'FORWARDED';

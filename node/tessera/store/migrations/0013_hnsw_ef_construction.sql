-- The HNSW graph over resources' embeddings is built with ef_construction = 128 instead of
-- pgvector's default of 64. On the 100,000 x 384 benchmark (bench.search), recall@10 at
-- the node's ef_search of 150 was 0.977-0.986 over three index builds at 64 and
-- 0.994-1.000 at 128; a larger ef_search did not make up for the weaker graph (0.977-0.987
-- at 200). Building the index took 20-22 s instead of 14-16 s, and each row inserted into
-- it does about as much more work.
--
-- The option applies to rows inserted from now on. An index that already holds rows keeps
-- their part of the graph until it is rebuilt; this migration does not rebuild it (an
-- upgrade must not block on minutes of index build). To rebuild it on a live node:
--   REINDEX INDEX CONCURRENTLY resources_embedding_idx;
--
-- The ALTER takes a ShareUpdateExclusiveLock on the index, or an AccessExclusiveLock when
-- pgvector's library is already loaded in this session (pgvector declares the option so):
-- queued behind a long reader, that lock would hold up every new query on resources. So
-- the wait is bounded: after 2 s the migration fails (the node does not start and says
-- why) and the next start tries again.
SET LOCAL lock_timeout = '2s';
ALTER INDEX resources_embedding_idx SET (ef_construction = 128);
SET LOCAL lock_timeout = DEFAULT;

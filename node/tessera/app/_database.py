"""The node's database for commands that run beside the node or without it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tessera.app._lock import DataDirLock
from tessera.app._node import prepare_data_dir
from tessera.config import Config
from tessera.core.paths import NodePaths
from tessera.embedded import EmbeddedPostgres, running_postgres_dsn


def running_dsn(cfg: Config) -> str | None:
    """store.dsn, else the DSN of the data directory's embedded PostgreSQL if it runs."""
    return cfg.store.dsn or running_postgres_dsn(NodePaths(cfg.node.data_dir).pgdata)


@contextlib.contextmanager
def database(cfg: Config) -> Iterator[str]:
    """A DSN for the duration: store.dsn, the running embedded PostgreSQL, or else the
    embedded PostgreSQL started here (stopped at the end). Starting it takes the data
    directory's lock, as the node would: the embedded PostgreSQL belongs to its holder."""
    dsn = running_dsn(cfg)
    if dsn:
        yield dsn
        return
    paths = NodePaths(cfg.node.data_dir)
    prepare_data_dir(paths)
    lock = DataDirLock(paths.lock_file)
    lock.acquire()
    try:
        pg = EmbeddedPostgres(paths.pgdata)
        dsn = pg.start()
        try:
            yield dsn
        finally:
            pg.stop()
    finally:
        lock.release()

"""Writing key material safely: atomic replace, private files at mode 0600."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write `data` to `path` atomically; with `private`, the file is 0600 from birth."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic_pair(cert: Path, cert_pem: bytes, key: Path, key_pem: bytes) -> None:
    """Replace a certificate chain and its private key together.

    Both are written and fsynced under temporary names first, so the two renames follow
    each other immediately: a reader sees a mismatched pair only in that instant, and
    after a crash between them the pair does not match and is enrolled again (see
    `credentials_valid`, `needs_reissue`). The key is renamed last, so the new key is
    never on disk under its name before a certificate for it is.
    """
    temps: list[tuple[str, Path]] = []
    try:
        for path, data, private in ((cert, cert_pem, False), (key, key_pem, True)):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            temps.append((tmp, path))
            os.fchmod(fd, 0o600 if private else 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
    for parent in {cert.parent, key.parent}:
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

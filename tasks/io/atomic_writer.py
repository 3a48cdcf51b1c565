"""Atomic writers: a reader sees either the old file/object or the complete new one, never
a torn one.

:class:`AtomicWriter` is the contract both backends keep: ``commit`` publishes what was
written, ``abort`` throws it away, ``close`` (what webdataset and ``with open(...)`` call)
commits, and a writer dropped without ``close`` was abandoned, so it aborts instead of
publishing half a file. :class:`LocalAtomicWriter` is the filesystem backend (temp file in
the same directory + fsync + ``os.replace`` + fsync of the directory); the S3 one is
``tasks/io/s3.py``'s ``S3AtomicWriter``.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

TMP_MARK = ".condgen-tmp-"  # temp names carry this so listings can hide them


class AtomicWriter(io.RawIOBase):
    """A binary writer whose data appears at its target only on :meth:`commit`."""

    _done = True  # until a subclass has set itself up, there is nothing to abort

    def writable(self) -> bool:
        return True

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        # close() = success, like a normal file (webdataset/gopen writers call close()).
        self.commit()
        super().close()

    def __del__(self) -> None:
        # IOBase.__del__ would call close() and publish a half-written file; a writer
        # dropped without close() was abandoned, so throw its data away instead.
        if not self._done:
            self.abort()


class LocalAtomicWriter(AtomicWriter):
    """Writes to a hidden temp file beside the target; ``commit`` renames it into place."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as the target, so os.replace is a rename on one filesystem.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)
        self._path = path
        self._done = False

    def write(self, b: Any) -> int:  # type: ignore[override]
        return self._file.write(b)

    def commit(self) -> None:
        if self._done:
            return
        self._done = True
        self._file.flush()
        os.fsync(self._file.fileno())  # data on disk before the rename makes it visible
        self._file.close()
        os.chmod(self._tmp, 0o644)  # mkstemp creates 0600; shards are shared artefacts
        os.replace(self._tmp, self._path)
        _fsync_dir(self._path.parent)  # make the rename itself durable

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

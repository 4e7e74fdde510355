"""Cache entries built once, safely, by any number of processes at once.

Array jobs that start together on a cold cache all need the same entries: a wheel's
file, the converted bundled model, a synthetic checkpoint, a GPTQ checkpoint. Each
entry is built in a scratch folder beside it and renamed into place, so it is whole or
absent. Around "look, build, rename" each process takes an exclusive ``fcntl.flock``
on a lock file beside the entry: one process builds while the others wait, and each
looks again once it holds the lock, so the waiters reuse what the first one made. The
kernel releases the lock of a process that dies, and the next waiter builds instead.

Entries are keyed by what determines their content (``content_key``), never by where
their inputs happen to lie, so a later run finds what an earlier one made.

On NFS, Linux arbitrates ``flock`` through the server's locks. Where a file system
has no locks at all (Lustre mounted without ``-o flock``), every process builds and
the first rename wins; the others discard their copy and use the winner's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# flock's errors on a file system that has no locks
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


def cache_dir() -> Path:
    """The cache's root: ``$QPEFT_CACHE``, else ~/.cache/qpeft-bench (shared with compute nodes:
    experiments.assets)."""
    root = os.environ.get("QPEFT_CACHE") or Path.home() / ".cache" / "qpeft-bench"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_key(*parts, length: int = 16) -> str:
    """A short hex digest of JSON-serialisable ``parts``: what determines an entry's content."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def lock_path(entry: Path) -> Path:
    """The lock file beside ``entry``. It stays after use: removing it would let two processes hold
    locks on two different files of the same name."""
    return entry.with_name(f".{entry.name}.lock")


@contextlib.contextmanager
def exclusive_lock(path: Path, waiting_for: str) -> Iterator[bool]:
    """Hold an exclusive flock on ``path``; yield False when the file system has no locks."""
    with open(path, "a") as handle:
        locked = _acquire(handle, waiting_for)
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _acquire(handle, waiting_for: str) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("waiting for another process to build %s", waiting_for)
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError as error:
        if error.errno not in _NO_LOCKS:
            raise
        log.warning("%s: no file locks on this file system (%s); building without one", handle.name, error)
        return False
    return True


def build_once(entry: Path, build: Callable[[Path], Path]) -> Path:
    """Return ``entry``, building it first if it does not exist.

    ``build(scratch)`` makes the entry inside the empty folder ``scratch`` (on the same file
    system) and returns the file or folder to rename into place (``scratch`` itself for a
    folder entry).
    """
    if entry.exists():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(lock_path(entry), waiting_for=str(entry)):
        if entry.exists():  # built by the process that held the lock before us
            return entry
        log.info("building %s", entry)
        scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            _rename_into_place(build(scratch), entry)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return entry


def _rename_into_place(made: Path, entry: Path):
    try:
        os.replace(made, entry)
    except OSError as error:
        # Only without working locks can another process have renamed its copy first.
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not entry.exists():
            raise
        log.info("%s was built by another process at the same time; using that one", entry)

"""One writer per run directory: every run that writes a workdir (training, label generation) holds its lock.

The lock is a JSON file, ``WORKDIR/qzoom.lock``, naming its holder: host, PID, start time and command line. A
second run on the same workdir stops with a :class:`RunError` that names the holder, instead of interleaving
its checkpoints, metrics and label parts with the first one's. A lock whose holder is gone -- same host, PID no
longer alive (a run killed with SIGKILL, a crashed machine rebooted) -- is taken over with a warning; a lock of
another host cannot be checked from here, so it stops the run and the message says which file to delete.

Multi-process runs share one workdir, so only process 0 takes the lock; the others work under it.

Local workdirs are locked atomically (a hard link, which fails when the lock exists). Object stores (``gs://``) have no exclusive create
through ``etils.epath``, so there the lock is best effort: a held lock is still found and reported, but two runs
started within the same moment can both pass the check. A lock is never waited for: a run either gets it or stops.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator

import jax
from etils import epath

from qzoom_jax.runtime.errors import RunError

log = logging.getLogger(__name__)

LOCK_NAME = "qzoom.lock"


@contextlib.contextmanager
def lock(workdir: epath.PathLike) -> Iterator[None]:
    """Holds ``workdir``'s lock for the duration of the block (process 0 only); see the module docstring."""
    if jax.process_index() != 0:
        yield
        return
    path = epath.Path(workdir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    _acquire(path, holder)
    try:
        yield
    finally:
        if _read_holder(path) == holder:  # a lock deleted by hand and taken by another run stays theirs
            path.unlink()


def _acquire(path: epath.Path, holder: dict) -> None:
    text = json.dumps(holder)
    if _create_exclusive(path, text):
        return
    other = _read_holder(path)
    if other is not None and not _is_stale(other):
        raise RunError(f"{path.parent} is in use by another run: PID {other['pid']} on {other['host']} since "
                       f"{other['started']} ({other['command']}); wait for it to end, or delete {path} if it is "
                       f"gone")
    log.warning("taking over the stale lock %s: %s", path,
                "no readable holder" if other is None else f"PID {other['pid']} on {other['host']} is not running")
    path.unlink(missing_ok=True)
    if not _create_exclusive(path, text):  # another run took it over in between
        _acquire(path, holder)


def _create_exclusive(path: epath.Path, text: str) -> bool:
    """Writes ``text`` to ``path`` unless it exists; False when it did."""
    if "://" in os.fspath(path):
        if path.exists():  # check-then-write: best effort, see the module docstring
            return False
        path.write_text(text)
        return True
    # Written whole beside it, then hard-linked into place (which fails if the lock exists): a reader never sees
    # a lock file without its holder.
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def _read_holder(path: epath.Path) -> dict | None:
    """The holder a lock file names; None when it was released in between or cannot be read."""
    try:
        holder = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) and {"host", "pid", "started", "command"} <= set(holder) else None


def _is_stale(holder: dict) -> bool:
    """A holder on this host whose PID is gone; another host's process cannot be checked from here."""
    if holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)  # signal 0: checks existence only
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, but another user's
        return False
    return False

"""Replace a directory as a whole: a reader of its name sees the old complete directory or the new complete one,
never a mix, and a writer that fails or is killed midway leaves the old one as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator


@contextlib.contextmanager
def replacing(final: str | os.PathLike) -> Iterator[str]:
    """Yield a new empty sibling of ``final`` (``<final>.tmp-<pid>``) to write into. When the block completes,
    the sibling takes ``final``'s place: an old ``final`` is moved aside (``<final>.old-<pid>``), the new one
    renamed in, then the old one deleted. When the block raises, the sibling is deleted and ``final`` is
    untouched; after a kill the partial sibling stays under its temporary name, never under ``final``.
    Single-process writers only (the names carry this process's pid)."""
    final = os.path.abspath(os.fspath(final))
    tmp, old = f"{final}.tmp-{os.getpid()}", f"{final}.old-{os.getpid()}"
    for leftover in (tmp, old):  # from a killed earlier process that had the same pid
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(final):
        os.rename(final, old)  # renames within one parent directory: atomic on POSIX file systems
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

"""Saving without losing the previous file: write beside it, then replace it in one step."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import pathlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def replaced_when_complete(
    path: str | pathlib.Path | io.BufferedIOBase, suffix: str
) -> Iterator[pathlib.Path | io.BufferedIOBase]:
    """The target to write ``path`` through, so that a file already at ``path`` is replaced only by a
    complete new one (``os.replace`` of a flushed temporary file beside it): a save stopped midway, by an
    error or a kill, leaves the previous file as it was (and no temporary file after an error). A kill
    (SIGTERM, SIGKILL: no ``finally`` runs) leaves its temporary file behind, named with this machine and
    the process id; the next save to the same target deletes those whose process no longer runs here.

    As SB3's ``open_path``: a path without a suffix gets ``.<suffix>`` (none if ``suffix`` is ""), missing
    folders are created; a file object, or a path that is a folder (SB3 then writes to ``<path>_2``), is
    passed on unchanged.
    """
    if isinstance(path, io.IOBase) or not isinstance(path, (str, os.PathLike)):
        yield path
        return
    final = pathlib.Path(path)
    if final.suffix == "" and suffix:
        final = final.with_name(f"{final.name}.{suffix}")
    if final.is_dir():
        yield pathlib.Path(path)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = partial_prefix(final)
    delete_stale_partials(final.parent, prefix)
    partial = final.with_name(f"{prefix}{os.getpid()}.partial")  # a suffix, so SB3 adds none
    try:
        yield partial
        with open(partial, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)


def partial_prefix(final: pathlib.Path) -> str:
    """The start of the temporary files' names for ``final``: ``.<name>.<host>-`` (then the process id),
    the name cut to keep the whole under the usual 255-byte limit of a file name."""
    host = "".join(c for c in socket.gethostname()[:32] if c.isalnum() or c in "-_") or "host"
    return f".{final.name.encode()[:180].decode(errors='ignore')}.{host}-"


def delete_stale_partials(folder: pathlib.Path, prefix: str) -> None:
    """Delete the temporary files in ``folder`` named ``<prefix><pid>.partial`` (:func:`partial_prefix`)
    that saves killed on this machine left behind (their process no longer runs); another machine's, on a
    shared disk, are left alone."""
    for stale in folder.glob(f"{glob.escape(prefix)}*.partial"):
        pid = stale.name[len(prefix) : -len(".partial")]
        if pid.isdigit() and not process_runs(int(pid)):
            stale.unlink(missing_ok=True)


def process_runs(pid: int) -> bool:
    """Whether a process of this id runs on this machine (always True on Windows, where ``os.kill`` with
    signal 0 would send a Ctrl-C event instead of checking)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True

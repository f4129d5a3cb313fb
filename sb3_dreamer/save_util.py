"""Saving without losing the previous file: write beside it, then replace it in one step."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
from collections.abc import Iterator


@contextlib.contextmanager
def replaced_when_complete(
    path: str | pathlib.Path | io.BufferedIOBase, suffix: str
) -> Iterator[pathlib.Path | io.BufferedIOBase]:
    """The target to write ``path`` through, so that a file already at ``path`` is replaced only by a
    complete new one (``os.replace`` of a flushed temporary file beside it): a save stopped midway, by an
    error or a kill, leaves the previous file as it was (and no temporary file after an error).

    As SB3's ``open_path``: a path without a suffix gets ``.<suffix>``, missing folders are created;
    a file object, or a path that is a folder (SB3 then writes to ``<path>_2``), is passed on unchanged.
    """
    if isinstance(path, io.IOBase) or not isinstance(path, (str, os.PathLike)):
        yield path
        return
    final = pathlib.Path(path)
    if final.suffix == "":
        final = final.with_name(f"{final.name}.{suffix}")
    if final.is_dir():
        yield pathlib.Path(path)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.name}.{os.getpid()}.partial")  # a suffix, so SB3 adds none
    try:
        yield partial
        with open(partial, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)

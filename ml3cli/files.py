"""Every file ml3 writes goes through here: atomically (a temp file in the same folder, fsync, rename), so that a
path only ever holds a complete file, even if the process is killed mid-write."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ml3cli.errors import ML3Error


# -- atomic writes --------------------------------------------------------------------------------------------
def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that the final name only ever holds a complete file."""
    path = Path(path)

    def failure(err: OSError) -> ML3Error:
        kept = "the previous file there is unchanged" if path.is_file() else "nothing was written there"
        return ML3Error(f"cannot write {path}: {err.strerror or err}; {kept}")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise failure(err) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)  # mkstemp creates 0600; give the file the mode an ordinary open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise failure(err) from None
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of equal keys as CSV text (header from the first row); empty text for no rows."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON (NaN and infinities allowed), written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def check_writable(path: str | Path) -> None:
    """Fail early (before minutes of work) when ``path`` is a folder, or its folder cannot be created or written."""
    if Path(path).is_dir():
        raise ML3Error(f"cannot write {path}: it is a folder (give a file path)")
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ml3-write-test-"):
            pass
    except OSError as err:
        raise ML3Error(f"cannot write to {folder}: {err.strerror or err}") from None


@contextlib.contextmanager
def exclusive_output(path: str | Path, option: str = "--out") -> Iterator[None]:
    """Hold ``path``'s output set (an artifact with its curves and checkpoint, or a results folder) for one run: a
    second run that asks for the same ``path`` while this one holds it is refused, naming the first and the
    ``option`` that writes elsewhere. An advisory lock (``flock``) on ``PATH.lock``, released by the kernel however
    the holder ends; a no-op where there is no ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "another process"
            raise ML3Error(
                f"{path} is being written by another run ({holder}); wait for it to finish, or write elsewhere "
                f"with {option}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}: {' '.join(sys.argv)[:200]}".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()
    finally:
        os.close(fd)

"""Writing a file so that a reader never sees half of it: write a temporary file beside it, flush it to disk,
rename it over the target (atomic on POSIX and Windows). Outputs, checkpoints and cache markers all use this."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, flush it to disk, then rename it over `path`; on failure `path` is as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """`text` (UTF-8) as the whole content of `path`, atomically; the folder is made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_writable(folder: Path) -> None:
    """Make `folder` if missing and write a byte into it, flushed to disk: a read-only folder, a missing
    permission or a full disk is found before the work it would lose, as an OutputError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".salmonn-write-check-", dir=folder)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {failure_reason(exc)}") from None


def failure_reason(exc: OSError) -> str:
    """The system's words for a failed file operation, to end a one-line message ("no space left on device")."""
    return (exc.strerror or type(exc).__name__).lower()

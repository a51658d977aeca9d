"""Writing a file so that a reader never sees half of it: write a temporary file beside it, flush it to disk,
rename it over the target (atomic on POSIX and Windows). Outputs, checkpoints and cache markers all use this."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


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

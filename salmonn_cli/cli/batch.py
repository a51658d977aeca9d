"""Many inputs: where results go (stdout, or one file per input in `--output-dir` plus `results.jsonl`),
what is already done (re-runs skip it unless `--overwrite`), progress, and the closing summary."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import check_writable, failure_reason, write_text_atomically
from ..errors import OutputError, UsageError
from ..output import EXTENSIONS, Record, write_json

RESULTS_FILE = "results.jsonl"
RANK_RESULTS = "results.rank{rank}.jsonl"  # what each rank of a launched job appends to; merged into RESULTS_FILE


@dataclass(frozen=True)
class OutputPlan:
    """How results are written: format, writer, and optionally a folder with one file per input."""

    fmt: str
    writer: Callable[[Record], str]
    output_dir: Path | None = None
    overwrite: bool = False
    names: dict[Path, str] = field(default_factory=dict)  # input -> output file stem (unique in the run)
    results_name: str = RESULTS_FILE  # a launched job's ranks each append to their own file (RANK_RESULTS)

    def __post_init__(self) -> None:  # refused when the plan is made: before any model loads
        if self.output_dir is not None and self.output_dir.exists() and not self.output_dir.is_dir():
            raise UsageError(
                f"-o/--output-dir {self.output_dir} is not a folder: give a folder (it is created if missing)"
            )
        if self.output_dir is not None:
            check_writable(self.output_dir)

    def target(self, path: Path) -> Path | None:
        if self.output_dir is None:
            return None
        return self.output_dir / (self.names.get(path, path.stem) + EXTENSIONS[self.fmt])

    def done(self, path: Path) -> bool:
        """An input is done when its output file exists (written atomically, so it is whole)."""
        target = self.target(path)
        return target is not None and not self.overwrite and target.is_file()

    def emit(self, record: Record) -> None:
        """Print the result, or write its file atomically and append its line to results.jsonl."""
        text = self.writer(record)
        target = self.target(Path(record.file))
        if target is None:
            print(text, flush=True)
            return
        try:
            write_text_atomically(target, text if text.endswith("\n") else text + "\n")
            append_line(self.output_dir / self.results_name, write_json(record))
        except OSError as exc:  # the disk filled up or went read-only mid-run: every later write would fail too
            raise OutputError(f"cannot write {target}: {failure_reason(exc)}") from None


def merge_results(output_dir: Path) -> None:
    """Fold the ranks' results files into results.jsonl, one line per input (the latest of its lines): what a
    launched job does at its end, and any run at its start, so the shards of a job that crashed are kept."""
    shards = sorted(output_dir.glob(RANK_RESULTS.format(rank="*")))
    if not shards:
        return
    lines: dict[str, str] = {}
    for path in [output_dir / RESULTS_FILE, *shards]:
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    lines[json.loads(line)["file"]] = line
    try:
        write_text_atomically(output_dir / RESULTS_FILE, "".join(f"{line}\n" for line in lines.values()))
        for path in shards:
            path.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write {output_dir / RESULTS_FILE}: {failure_reason(exc)}") from None


def unique_names(paths: list[Path]) -> dict[Path, str]:
    """Output stems: the input's stem, plus a short hash of its path where two inputs share a stem."""
    stems: dict[str, int] = {}
    for path in paths:
        stems[path.stem] = stems.get(path.stem, 0) + 1
    return {p: p.stem if stems[p.stem] == 1 else f"{p.stem}-{_short_hash(p)}" for p in paths}


def _short_hash(path: Path) -> str:
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write (O_APPEND), flushed to disk before returning."""
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Tally:
    """Counts and audio time for progress and the summary."""

    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    audio_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    def speed(self) -> str:
        """Audio seconds per wall second (x real time)."""
        return f"{self.audio_s / self.wall_s:.2f}x real time" if self.wall_s > 0 and self.audio_s else "-"

    def summary(self, stopped: bool = False) -> str:
        """One line; `stopped` (Ctrl-C, SIGTERM) adds the inputs not run (the one in flight among them)."""
        parts = [f"{self.done} done"]
        if self.skipped:
            parts.append(f"{self.skipped} already done (skipped; --overwrite redoes them)")
        if self.failed:
            parts.append(f"{self.failed} failed")
        left = self.total - self.done - self.skipped - self.failed
        if stopped and left:
            parts.append(f"{left} not run (stopped)")
        audio = f"{self.audio_s / 3600:.2f} h" if self.audio_s >= 3600 else f"{self.audio_s:.0f} s"
        return f"{self.total} inputs: {', '.join(parts)}; {audio} of audio in {self.wall_s:.0f} s ({self.speed()})"

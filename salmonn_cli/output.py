"""Writers for results, selected by `--format`: txt, json (one object per input per line), srt, vtt.

Each writer turns one Record into the text of one output (stdout or one file in `--output-dir`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class Cue:
    """One timed piece of a result: a segment's answer, or its speech span for subtitles (seconds)."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Record:
    """The result of one task on one input."""

    file: str
    task: str
    instruction: str
    text: str
    model: str
    checkpoint: str
    quantization: str
    lora_scale: float
    decode: dict[str, Any]
    audio_seconds: float
    timings: dict[str, float]
    token_count: int
    skipped: str | None = None  # why the model was not run (e.g. "silence"), None when it was
    checkpoint_sha256: str | None = None  # from the model file, when the checkpoint came from a known source
    segments: tuple[Cue, ...] = ()  # per-segment answers with their times (long audio); empty cues are dropped
    extra: dict[str, Any] = field(default_factory=dict)


def timestamp(seconds: float, *, millis: bool = False, sep: str = ".") -> str:
    """`mm:ss` (or `h:mm:ss` past an hour); with `millis`, `hh:mm:ss{sep}mmm` as subtitles want."""
    total_ms = max(0, round(seconds * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    if millis:
        return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{ms:03d}"
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def write_txt(record: Record) -> str:
    return record.text


def record_dict(record: Record) -> dict[str, Any]:
    """The record as plain data, `extra` fields merged in (what json output and results.jsonl hold)."""
    data = asdict(record)
    data.update(data.pop("extra"))
    return data


def write_json(record: Record) -> str:
    return json.dumps(record_dict(record), ensure_ascii=False)


def _cues(record: Record) -> list[Cue]:
    cues = [c for c in record.segments if c.text.strip()]
    if not cues and record.text.strip():  # a short file answered in one piece
        cues = [Cue(0.0, record.audio_seconds, record.text)]
    return cues


def write_srt(record: Record) -> str:
    blocks = []
    for index, cue in enumerate(_cues(record), start=1):
        span = f"{timestamp(cue.start, millis=True, sep=',')} --> {timestamp(cue.end, millis=True, sep=',')}"
        blocks.append(f"{index}\n{span}\n{cue.text.strip()}\n")
    return "\n".join(blocks)


def write_vtt(record: Record) -> str:
    blocks = ["WEBVTT\n"]
    for cue in _cues(record):
        blocks.append(
            f"{timestamp(cue.start, millis=True)} --> {timestamp(cue.end, millis=True)}\n{cue.text.strip()}\n"
        )
    return "\n".join(blocks)


WRITERS: dict[str, Callable[[Record], str]] = {"txt": write_txt, "json": write_json, "srt": write_srt, "vtt": write_vtt}
FORMAT_ALIASES = {"text": "txt"}
EXTENSIONS = {"txt": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt"}


def writer_for(name: str) -> tuple[str, Callable[[Record], str]]:
    """The canonical format name and its writer; a name we do not know is a UsageError."""
    fmt = FORMAT_ALIASES.get(name, name)
    if fmt not in WRITERS:
        raise UsageError(f"--format must be one of text, {', '.join(WRITERS)}; got {name!r}")
    return fmt, WRITERS[fmt]

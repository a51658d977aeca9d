"""Writers for results, selected by `--format`. Each writer turns one Record into text for stdout or a file."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Record:
    """The result of one task on one input, as `-f json` prints it (one object per line)."""

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
    extra: dict[str, Any] = field(default_factory=dict)


def write_text(record: Record) -> str:
    return record.text


def write_json(record: Record) -> str:
    data = asdict(record)
    data.update(data.pop("extra"))
    return json.dumps(data, ensure_ascii=False)


WRITERS: dict[str, Callable[[Record], str]] = {"text": write_text, "json": write_json}

"""A test set's manifest: one JSON object per line, `{"audio": ..., "reference": "..." | "references": [...],
"language"?: ..., "target"?: ..., "instruction"?: ...}`; audio paths are relative to the manifest's folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text_atomically
from ..errors import UsageError
from ..inputs import manifest_entry, manifest_lines, resolve_manifest_path


@dataclass(frozen=True)
class EvalItem:
    """One test utterance or clip and what a right answer is."""

    audio: Path
    references: tuple[str, ...]
    where: str  # manifest:line, for messages
    language: str | None = None  # spoken language (asr: its prompt, and whether to score characters)
    target: str | None = None  # the language to translate into (ast)
    instruction: str | None = None  # a question of its own (sqqa with a written question, say)


def read_eval_manifest(manifest: Path) -> list[EvalItem]:
    """Every item of `manifest`; a malformed line is a UsageError naming it, before any model loads."""
    items = [_item(manifest_entry(line, where), manifest.parent, where)
             for where, line in manifest_lines(manifest, "one JSON object per line")]  # fmt: skip
    if not items:
        raise UsageError(f"manifest {manifest} has no items: give one JSON object per line")
    return items


def _item(entry: dict, base: Path, where: str) -> EvalItem:
    return EvalItem(
        audio=resolve_manifest_path(base, entry["audio"]),
        references=_references(entry, where),
        where=where,
        language=_optional_text(entry, "language", where),
        target=_optional_text(entry, "target", where),
        instruction=_optional_text(entry, "instruction", where),
    )


def _references(entry: dict, where: str) -> tuple[str, ...]:
    if "reference" in entry and "references" in entry:
        raise UsageError(f'{where}: give "reference" or "references", not both')
    if isinstance(entry.get("reference"), str):
        return (entry["reference"],)
    many = entry.get("references")
    if isinstance(many, list) and many and all(isinstance(r, str) for r in many):
        return tuple(many)
    raise UsageError(f'{where}: needs a "reference" string or a non-empty "references" list of strings')


def _optional_text(entry: dict, key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f'{where}: "{key}" must be a non-empty string')
    return value.strip()


def write_eval_manifest(manifest: Path, entries: Iterable[dict]) -> int:
    """Write `entries` (each with an absolute or cwd-relative "audio" path) as a manifest at `manifest`, with
    the audio paths relative to its folder so the test set and its manifest can move together. Returns the count."""
    folder = manifest.resolve().parent
    lines = []
    for entry in entries:
        audio = os.path.relpath(Path(entry["audio"]).resolve(), folder)
        lines.append(json.dumps({**entry, "audio": audio}, ensure_ascii=False))
    write_text_atomically(manifest, "".join(f"{line}\n" for line in lines))
    return len(lines)

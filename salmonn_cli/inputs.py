"""Which files to process: paths, folders (`--recursive`, `--glob`) and manifests (one path per line, or jsonl
with per-file instructions). Paths in a manifest are relative to the manifest's folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import AudioError, UsageError

AUDIO_SUFFIXES = frozenset(
    ".wav .flac .ogg .oga .opus .mp3 .m4a .mp4 .aac .webm .mkv .aiff .aif .au .caf .w64 .wma".split()
)


@dataclass(frozen=True)
class InputItem:
    """One input file, with its own instruction when a jsonl manifest gives one."""

    path: Path  # what the user named: results and output files are named after it
    instruction: str | None = None
    read_from: Path | None = None  # where its audio is read instead: the copy of a pipe, which reads only once

    @property
    def audio_path(self) -> Path:
        return self.path if self.read_from is None else self.read_from


def expand_inputs(paths: list[Path], *, recursive: bool = False, glob: str | None = None,
                  manifest: Path | None = None) -> list[InputItem]:  # fmt: skip
    """Files in the order given; a folder contributes its audio files (sorted), a manifest its lines.

    A path that does not exist is kept (its error is reported when it is probed, and the rest go on), and so
    is a folder that cannot be read (at the top or below it); a folder with no matching file is a UsageError,
    as is a malformed manifest line.
    """
    items: list[InputItem] = []
    for path in paths:
        if path.is_dir():
            unreadable = _unreadable_folders(path, recursive=recursive)
            found = _folder_files(path, recursive=recursive, glob=glob)
            items.extend(InputItem(folder) for folder in unreadable)
            if not found and not unreadable:
                where = "or below it " if recursive else ""
                raise UsageError(f"no audio files in {path} {where}(pattern {glob or 'any audio'})")
            items.extend(InputItem(f) for f in found)
        else:
            items.append(InputItem(path))
    if manifest is not None:
        items.extend(read_manifest(manifest))
    if not items:
        raise UsageError("no input files: give audio files, folders, or --manifest")
    return _unique(items)


def _folder_files(folder: Path, *, recursive: bool, glob: str | None) -> list[Path]:
    pattern = glob or "*"
    candidates = folder.rglob(pattern) if recursive else folder.glob(pattern)
    # an explicit --glob is the user's filter; otherwise keep what looks like audio
    return sorted(p for p in candidates if p.is_file() and (glob or p.suffix.lower() in AUDIO_SUFFIXES))


def _unreadable_folders(folder: Path, *, recursive: bool) -> list[Path]:
    """The folders a listing cannot enter (Path.glob passes over them in silence)."""
    unreadable: list[Path] = []
    if recursive:
        for _ in os.walk(folder, onerror=lambda exc: unreadable.append(Path(exc.filename))):
            pass
    else:
        try:
            os.scandir(folder).close()
        except PermissionError:
            unreadable.append(folder)
    return sorted(unreadable)


def read_manifest(manifest: Path) -> list[InputItem]:
    """Lines of a manifest: a path per line (`#` comments), or jsonl objects with `audio` and `instruction`."""
    base = manifest.parent
    items = []
    for where, line in manifest_lines(manifest, "one path or JSON object per line"):
        if line.startswith("{"):
            items.append(_json_item(line, base, where))
        else:
            items.append(InputItem(resolve_manifest_path(base, line)))
    return items


def manifest_lines(manifest: Path, layout: str) -> list[tuple[str, str]]:
    """Each line of `manifest` that is not blank or a `#` comment, stripped, with its "file:line" for messages;
    a manifest that cannot be read is one error (`layout` says what a line should be)."""
    if not manifest.is_file():
        raise AudioError(f"manifest not found: {manifest}")
    try:
        text = manifest.read_text(encoding="utf-8")
    except PermissionError:
        raise AudioError(f"cannot read manifest {manifest}: permission denied") from None
    except UnicodeDecodeError:
        raise UsageError(f"manifest {manifest} is not UTF-8 text: give {layout}") from None
    lines = ((f"{manifest}:{number}", raw.strip()) for number, raw in enumerate(text.splitlines(), start=1))
    return [(where, line) for where, line in lines if line and not line.startswith("#")]


def manifest_entry(line: str, where: str) -> dict:
    """A jsonl manifest line as its object, which names a non-empty "audio" path."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not valid JSON ({exc.msg})") from None
    audio = entry.get("audio") if isinstance(entry, dict) else None
    if not isinstance(audio, str) or not audio.strip():
        raise UsageError(f'{where}: a jsonl manifest line needs an "audio" path')
    return entry


def _json_item(line: str, base: Path, where: str) -> InputItem:
    entry = manifest_entry(line, where)
    instruction = entry.get("instruction")
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise UsageError(f'{where}: "instruction" must be a non-empty string')
    return InputItem(resolve_manifest_path(base, entry["audio"]), instruction.strip() if instruction else None)


def resolve_manifest_path(base: Path, text: str) -> Path:
    """A path as a manifest in folder `base` gives it: `~` expanded, relative ones from `base`."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _unique(items: list[InputItem]) -> list[InputItem]:
    """Drop repeats of the same file with the same instruction (a file listed twice is processed once)."""
    seen: set[tuple[Path, str | None]] = set()
    unique = []
    for item in items:
        key = (Path(os.path.realpath(item.path)), item.instruction)  # never raises, symlink loops included
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique

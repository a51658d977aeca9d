"""A `salmonn eval` manifest from AudioCaps' test split in its standard layout:

    python scripts/eval/prepare_audiocaps.py test.csv --audio audiocaps/test -o audiocaps-test.jsonl
    salmonn eval audiocaps-test.jsonl --task aac --paper audiocaps-test

test.csv is AudioCaps' (columns audiocap_id, youtube_id, start_time, caption; five captions per clip). The
clips are the 10-s audio you fetched, one file per clip, named after its YouTube id (ID.wav, YID.wav,
ID_START.wav or any audio suffix). Clips that are missing (videos taken down) are left out and counted."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from salmonn_cli.evaluation.manifest import write_eval_manifest
from salmonn_cli.inputs import AUDIO_SUFFIXES


def audio_by_clip(folder: Path) -> dict[str, Path]:
    """Audio files by the YouTube id their name starts with (a leading "Y" and a trailing _START dropped)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES:
            stem = path.stem
            found.setdefault(stem, path)
            found.setdefault(stem[1:] if stem.startswith("Y") else stem, path)
            found.setdefault(stem.rsplit("_", 1)[0], path)
    return found


def audiocaps_entries(table: Path, folder: Path) -> tuple[list[dict], int]:
    captions: dict[str, list[str]] = {}
    with table.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            captions.setdefault(row["youtube_id"], []).append(row["caption"].strip())
    audio = audio_by_clip(folder)
    entries = [{"audio": str(audio[clip]), "references": refs} for clip, refs in captions.items() if clip in audio]
    if not entries:
        raise SystemExit(f"none of the {len(captions)} clips of {table} is in {folder}")
    return entries, len(captions) - len(entries)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, help="AudioCaps' test.csv")
    parser.add_argument("--audio", type=Path, required=True, help="the folder of the clips' audio files")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the manifest to write (.jsonl)")
    args = parser.parse_args(argv)
    entries, missing = audiocaps_entries(args.csv, args.audio)
    count = write_eval_manifest(args.output, entries)
    print(f"{args.output}: {count} clips" + (f" ({missing} in the table have no audio)" if missing else ""),
          file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()

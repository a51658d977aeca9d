"""A `salmonn eval` manifest from a LibriSpeech split in its standard layout:

    python scripts/eval/prepare_librispeech.py LibriSpeech/test-clean -o test-clean.jsonl
    salmonn eval test-clean.jsonl --task asr --paper librispeech-test-clean

The split holds SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt (one "UTTERANCE-ID TEXT" per line) beside each
utterance's SPEAKER-CHAPTER-NNNN.flac (as openslr.org/12 unpacks)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from salmonn_cli.evaluation.manifest import write_eval_manifest


def librispeech_entries(split: Path) -> list[dict]:
    entries = []
    for transcript in sorted(split.glob("*/*/*.trans.txt")):
        for line in transcript.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utterance, _, text = line.strip().partition(" ")
            audio = transcript.parent / f"{utterance}.flac"
            if not audio.is_file():
                raise SystemExit(f"{transcript}: {audio.name} is missing")
            entries.append({"audio": str(audio), "reference": text, "language": "en"})
    if not entries:
        raise SystemExit(
            f"no SPEAKER/CHAPTER/*.trans.txt under {split}: give a split folder, e.g. LibriSpeech/test-clean"
        )
    return entries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("split", type=Path, help="a split folder, e.g. LibriSpeech/test-clean")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the manifest to write (.jsonl)")
    args = parser.parse_args(argv)
    count = write_eval_manifest(args.output, librispeech_entries(args.split))
    print(f"{args.output}: {count} utterances", file=sys.stderr)


if __name__ == "__main__":
    main()

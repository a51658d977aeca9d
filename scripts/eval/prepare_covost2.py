"""A `salmonn eval` manifest from CoVoST 2 (English to another language) in its standard layout:

    python scripts/eval/prepare_covost2.py covost_v2.en_zh-CN.test.tsv --clips cv-corpus/en/clips -o en-zh.jsonl
    salmonn eval en-zh.jsonl --task ast --paper covost2-en-zh

The TSV is what CoVoST's get_covost_splits.py writes (columns path, sentence, translation, client_id; named
covost_v2.en_LANG.SPLIT.tsv); the clips are Common Voice's English mp3 files (reading them needs the `av` extra)."""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

from salmonn_cli.evaluation.manifest import write_eval_manifest


def target_language(tsv: Path) -> str:
    """The translation target a CoVoST TSV's name gives: covost_v2.en_zh-CN.test.tsv -> zh."""
    found = re.search(r"\.en_([a-z]+)(?:-[A-Za-z]+)?\.", tsv.name)
    if found is None:
        raise SystemExit(f"{tsv.name}: not a CoVoST English-to-X TSV name (covost_v2.en_LANG.SPLIT.tsv); give --target")
    return found.group(1)


def covost2_entries(tsv: Path, clips: Path, target: str) -> list[dict]:
    entries = []
    with tsv.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            audio = clips / row["path"]
            if not audio.is_file():
                raise SystemExit(f"{tsv}: {audio} is missing (give the Common Voice clips folder with --clips)")
            entries.append({"audio": str(audio), "reference": row["translation"], "language": "en", "target": target})
    if not entries:
        raise SystemExit(f"{tsv} has no rows")
    return entries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tsv", type=Path, help="covost_v2.en_LANG.SPLIT.tsv")
    parser.add_argument("--clips", type=Path, required=True, help="Common Voice English clips folder")
    parser.add_argument("--target", help="translation target (default: from the TSV's name)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the manifest to write (.jsonl)")
    args = parser.parse_args(argv)
    target = args.target or target_language(args.tsv)
    count = write_eval_manifest(args.output, covost2_entries(args.tsv, args.clips, target))
    print(f"{args.output}: {count} utterances, English to {target}", file=sys.stderr)


if __name__ == "__main__":
    main()

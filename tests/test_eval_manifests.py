"""The manifest-preparation scripts on small copies of LibriSpeech's, CoVoST 2's and AudioCaps' standard layouts:
what they write is what `salmonn eval` reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from salmonn_cli.evaluation.manifest import read_eval_manifest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "eval"


def prepare(script: str, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def test_librispeech_split_becomes_one_item_per_utterance(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1089" / "134686"
    chapter.mkdir(parents=True)
    (chapter / "1089-134686.trans.txt").write_text("1089-134686-0000 HE HOPED THERE WOULD BE STEW\n"
                                                   "1089-134686-0001 STUFF IT INTO YOU\n")  # fmt: skip
    for k in range(2):
        (chapter / f"1089-134686-000{k}.flac").write_bytes(b"")
    manifest = tmp_path / "manifests" / "test-clean.jsonl"
    manifest.parent.mkdir()
    done = prepare("prepare_librispeech.py", tmp_path / "LibriSpeech" / "test-clean", "-o", manifest)
    assert "2 utterances" in done.stderr
    items = read_eval_manifest(manifest)
    assert [i.references for i in items] == [("HE HOPED THERE WOULD BE STEW",), ("STUFF IT INTO YOU",)]
    assert items[0].audio.resolve() == (chapter / "1089-134686-0000.flac").resolve() and items[0].language == "en"
    assert '"audio": "../LibriSpeech/' in manifest.read_text()  # relative: the set and its manifest move together


def test_covost2_tsv_becomes_translation_items_with_their_target(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("a.mp3", "b.mp3"):
        (clips / name).write_bytes(b"")
    tsv = tmp_path / "covost_v2.en_zh-CN.test.tsv"
    tsv.write_text("path\tsentence\ttranslation\tclient_id\n"
                   "a.mp3\tHello \"there\".\t你好。\tx\nb.mp3\tGood morning.\t早上好。\ty\n")  # fmt: skip
    manifest = tmp_path / "en-zh.jsonl"
    prepare("prepare_covost2.py", tsv, "--clips", clips, "-o", manifest)
    items = read_eval_manifest(manifest)
    assert [(i.references, i.target, i.language) for i in items] == [
        (("你好。",), "zh", "en"),
        (("早上好。",), "zh", "en"),
    ]


def test_audiocaps_csv_groups_five_captions_per_clip_and_counts_the_missing(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "Yabc123.wav").write_bytes(b"")
    table = tmp_path / "test.csv"
    rows = [f"{k},abc123,30,caption number {k}" for k in range(5)] + ["9,gone456,0,a clip taken down"]
    table.write_text("audiocap_id,youtube_id,start_time,caption\n" + "\n".join(rows) + "\n")
    manifest = tmp_path / "audiocaps.jsonl"
    done = prepare("prepare_audiocaps.py", table, "--audio", audio, "-o", manifest)
    assert "1 clips (1 in the table have no audio)" in done.stderr
    (item,) = read_eval_manifest(manifest)
    assert item.references == tuple(f"caption number {k}" for k in range(5))
    assert item.audio.resolve() == (audio / "Yabc123.wav").resolve()

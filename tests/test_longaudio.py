"""Long audio and many files through the real `salmonn` entry point on tiny components: segments at pauses,
subtitles that parse, per-segment answers with times, --whole, silence, output folders and resuming."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import srt
import webvtt

from salmonn_cli.audio import SAMPLE_RATE
from tests.speech import long_speech

FAST = ["--device", "cpu", "--quant", "none", "--beams", "1", "--max-new-tokens", "3"]


def salmonn(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("salmonn"), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def long_file(tmp_path_factory) -> tuple[Path, list[tuple[float, float]]]:
    """About 3 minutes of espeak-ng speech with 0.6-2 s pauses, and the true span of every utterance."""
    waveform, spans = long_speech(n_utterances=30, seed=1)
    assert waveform.shape[0] / SAMPLE_RATE >= 170, "the long file should last about 3 minutes"
    path = tmp_path_factory.mktemp("long") / "long.wav"
    sf.write(path, waveform, SAMPLE_RATE)
    return path, spans


def model(tiny: Path) -> list[str]:
    return ["--model", str(tiny / "model.toml"), *FAST]


def near(value: float, candidates: list[float], tolerance: float = 0.3) -> bool:
    return min(abs(value - c) for c in candidates) <= tolerance


def test_three_minutes_to_srt_in_a_folder(tiny, long_file, tmp_path):
    path, spans = long_file
    out = tmp_path / "subs"
    run = salmonn("transcribe", str(path), "-f", "srt", "-o", str(out), *model(tiny))
    assert run.returncode == 0, run.stderr
    cues = list(srt.parse((out / "long.srt").read_text(encoding="utf-8")))
    assert len(cues) >= 6  # ~3 minutes in segments of at most 30 s, not one truncated window
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    for cue in cues:
        assert near(cue.start.total_seconds(), starts) and near(cue.end.total_seconds(), ends), cue
        assert cue.end.total_seconds() - cue.start.total_seconds() <= 30.0
    assert cues[0].start.total_seconds() == pytest.approx(spans[0][0], abs=0.3)
    assert cues[-1].end.total_seconds() == pytest.approx(spans[-1][1], abs=0.3)  # nothing cut off at 30 s
    [record] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["audio_seconds"] >= 170 and record["segments_answered"] == len(cues)


def test_vtt_and_json_segments(tiny, long_file, tmp_path):
    path, _ = long_file
    run = salmonn("transcribe", str(path), "-f", "vtt", "-o", str(tmp_path), *model(tiny))
    assert run.returncode == 0, run.stderr
    captions = webvtt.read(str(tmp_path / "long.vtt"))
    assert len(captions) >= 6 and all(c.text.strip() for c in captions)
    as_json = salmonn("transcribe", str(path), "-f", "json", *model(tiny))
    record = json.loads(as_json.stdout)
    assert len(record["segments"]) == len(captions)
    assert record["text"] == " ".join(s["text"] for s in record["segments"] if s["text"])


def test_caption_answers_per_segment_with_times(tiny, tmp_path):
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(70 * SAMPLE_RATE)).astype(np.float32)
    noise[30 * SAMPLE_RATE : 45 * SAMPLE_RATE] = 0.0  # 15 s of silence: no invented text for it
    path = tmp_path / "street.wav"
    sf.write(path, noise, SAMPLE_RATE)
    run = salmonn("caption", str(path), "--no-vad", "-f", "json", *model(tiny))
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["segments_total"] == 3 and record["segments_answered"] == 3
    lines = record["text"].splitlines()
    assert len(lines) == 3 and lines[0].startswith("[00:00–00:") and lines[-1].endswith(record["segments"][-1]["text"])
    silent = np.zeros(70 * SAMPLE_RATE, np.float32)
    silent[:SAMPLE_RATE] = noise[:SAMPLE_RATE]  # one audible second, then a minute of silence
    sf.write(path, silent, SAMPLE_RATE)
    quiet = json.loads(salmonn("caption", str(path), "--no-vad", "-f", "json", *model(tiny)).stdout)
    assert quiet["segments_answered"] == 1 and len(quiet["text"].splitlines()) == 1


def test_whole_gives_one_answer_and_knows_its_limit(tiny, long_file):
    path, _ = long_file
    run = salmonn("ask", str(path), "When does the speaker mention rain?", "--whole", "-f", "json", *model(tiny))
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert len(record["segments"]) == 1 and "\n" not in record["text"]
    too_long = salmonn("ask", str(path), "Hi", "--whole", *model(tiny), "--max-new-tokens", "1900")
    assert too_long.returncode == 2
    assert "--whole:" in too_long.stderr and "at most" in too_long.stderr and "Traceback" not in too_long.stderr


def test_folder_manifest_and_per_file_instructions(tiny, tmp_path):
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    tone = (0.3 * np.sin(np.arange(2 * SAMPLE_RATE) / 4)).astype(np.float32)
    for name in ("a.wav", "b.flac", "sub/c.wav"):
        sf.write(clips / name, tone, SAMPLE_RATE)
    (clips / "notes.txt").write_text("not audio")
    flat = salmonn("caption", str(clips), "-f", "json", *model(tiny))
    assert [Path(r["file"]).name for r in map(json.loads, flat.stdout.splitlines())] == ["a.wav", "b.flac"]
    deep = salmonn("caption", str(clips), "--recursive", "--glob", "*.wav", "-f", "json", *model(tiny))
    assert sorted(Path(r["file"]).name for r in map(json.loads, deep.stdout.splitlines())) == ["a.wav", "c.wav"]
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"audio": "clips/a.wav", "instruction": "Is it loud?"}\n{"audio": "clips/b.flac"}\n')
    listed = salmonn("caption", "--manifest", str(manifest), "-f", "json", *model(tiny))
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["instruction"] for r in records] == ["Is it loud?", "Please describe the audio."]


def test_killed_batch_resumes_without_redoing_finished_files(tiny, tmp_path):
    tone = (0.3 * np.sin(np.arange(2 * SAMPLE_RATE) / 4)).astype(np.float32)
    first, second, third = tmp_path / "one.wav", tmp_path / "two.wav", tmp_path / "three.wav"
    for path in (first, second, third):
        sf.write(path, tone, SAMPLE_RATE)
    out = tmp_path / "out"
    out.mkdir()
    # results.jsonl is a FIFO here only to know the moment to kill: salmonn writes a file's line there right
    # after the file's output, so when `one`'s line arrives, one.txt is whole and two.wav is not done
    results = out / "results.jsonl"
    os.mkfifo(results)
    barrier = os.open(results, os.O_RDONLY | os.O_NONBLOCK)
    proc = subprocess.Popen([shutil.which("salmonn"), "transcribe", str(first), str(second), str(third), "-o", str(out),
                             *model(tiny)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        ready, _, _ = select.select([barrier], [], [], 120)
        assert ready, "salmonn wrote no result line"
        written = os.read(barrier, 1 << 16)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        os.close(barrier)
    assert json.loads(written)["file"] == str(first)
    results.unlink()
    results.write_bytes(written)  # what the disk holds after a kill at that moment
    assert (out / "one.txt").is_file() and not (out / "two.txt").exists()
    finished_at = (out / "one.txt").stat().st_mtime_ns
    rerun = salmonn("transcribe", str(first), str(second), str(third), "-o", str(out), *model(tiny))
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "one.txt").stat().st_mtime_ns == finished_at
    lines = [json.loads(line)["file"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(Path(f).name for f in lines) == ["one.wav", "three.wav", "two.wav"]
    assert "1 already done" in rerun.stderr
    again = salmonn("transcribe", str(first), str(second), str(third), "-o", str(out), *model(tiny))
    assert again.returncode == 0 and "already done" in again.stderr
    redo = salmonn("transcribe", str(first), "-o", str(out), "--overwrite", *model(tiny))
    assert redo.returncode == 0 and (out / "one.txt").stat().st_mtime_ns != finished_at

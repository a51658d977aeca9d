"""scripts/bench.py on the tiny shape runs end to end and reports every field (a test of the script, not of speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAT_FIELDS = {"median", "min", "max", "runs"}


def _positive_stat(stat: dict, repeat: int) -> None:
    assert set(stat) == STAT_FIELDS
    assert len(stat["runs"]) == repeat and all(run > 0 for run in stat["runs"])
    assert 0 < stat["min"] <= stat["median"] <= stat["max"]


def test_bench_tiny_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--shape", "tiny", "--device", "cpu"]
    command += ["--json", str(out), "--repeat", "1", "--warmup", "0", "--long-seconds", "60", "--batch-size", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "long_audio.batch_speedup" in done.stdout  # the table

    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["device"] == "cpu" and report["repeat"] == 1
    assert report["load_s"] > 0
    for name in ("whisper_s", "beats_s", "connector_s"):
        _positive_stat(report["stages"][name], 1)
    _positive_stat(report["first_token"]["first_token_s"], 1)
    decode = report["decode"]
    assert decode["tokens"] > 1 and decode["tokens_per_s"] > 0
    _positive_stat(decode["one_token_s"], 1)
    _positive_stat(decode["all_tokens_s"], 1)

    long = report["long_audio"]
    assert long["audio_s"] == 60 and long["segments"] >= 2 and long["segmenter"]
    assert set(long["by_batch_size"]) == {"1", "2"}
    for run in long["by_batch_size"].values():
        _positive_stat(run["wall_s"], 1)
        assert run["audio_s_per_s"] == 60 / run["wall_s"]["median"]
    assert long["batch_speedup"] > 0

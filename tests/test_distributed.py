"""Batch inference under real launchers on the CPU (gloo): torchrun with 2 processes, a rank killed and the job
finished by a rerun, two "nodes" on 127.0.0.1. Every launch is bounded in time; the rendezvous is loopback only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.launchers import rank_pids
from tests.test_cli_tasks import FAST, salmonn

LAUNCH_TIMEOUT_S = 300
N_INPUTS = 6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Six different tones (different answers), listed one per line."""
    folder = tmp_path_factory.mktemp("dist_inputs")
    t = np.arange(24_000) / 16_000
    paths = []
    for i in range(N_INPUTS):
        paths.append(folder / f"tone{i}.wav")
        sf.write(paths[-1], (0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t)).astype(np.float32), 16_000)
    listing = folder / "inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    return listing


def _task(tiny: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["caption", "--manifest", str(manifest), "-o", str(out), "-f", "json", "--model", str(tiny / "model.toml"),
            *FAST, *extra]  # fmt: skip


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "salmonn_cli"]


def _results(out: Path) -> dict[str, dict]:
    """results.jsonl by input, without the timings (which differ from run to run)."""
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_file = {}
    for line in lines:
        assert line["file"] not in by_file, f"{line['file']} appears twice in results.jsonl"
        line.pop("timings")
        by_file[line["file"]] = line
    return by_file


@pytest.fixture(scope="module")
def alone(tiny, manifest, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("alone")
    result = salmonn(*_task(tiny, manifest, out))
    assert result.returncode == 0, result.stderr
    return _results(out)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes x 1 thread on 2 cores


LAUNCHERS = {
    "torchrun": _torchrun("--standalone", "--nproc_per_node", "2"),
    # accelerate's multi-process launch (torch's elastic launcher underneath); without CUDA its ranks take gloo
    "accelerate": [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "salmonn_cli"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_equal_one(tiny, manifest, alone, tmp_path, launcher):
    out = tmp_path / "out"
    args = LAUNCHERS[launcher] + _task(tiny, manifest, out)
    result = subprocess.run(args, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=_env())
    assert result.returncode == 0, result.stderr
    assert _results(out) == alone
    assert sorted(p.name for p in out.glob("*.json")) == sorted(f"tone{i}.json" for i in range(N_INPUTS))
    assert not list(out.glob("results.rank*.jsonl"))  # folded into results.jsonl
    summaries = [line for line in result.stderr.splitlines() if "inputs:" in line]
    assert summaries == [summaries[0]] and summaries[0].startswith(f"2 processes, {N_INPUTS} inputs: {N_INPUTS} done")


def test_two_nodes_on_loopback(tiny, manifest, alone, tmp_path):
    out, port = tmp_path / "out", _free_port()
    nodes = [
        subprocess.Popen(_torchrun("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                                   "--master_addr", "127.0.0.1", "--master_port", str(port))
                         + _task(tiny, manifest, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env())  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=LAUNCH_TIMEOUT_S) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert _results(out) == alone


def test_a_killed_rank_leaves_whole_files_and_a_rerun_finishes_the_rest(tiny, manifest, alone, tmp_path):
    out = tmp_path / "out"
    slow = ["--max-new-tokens", "60", "--beams", "4"]  # the FAST settings, decoded longer: time to kill mid-run
    launcher = subprocess.Popen(_torchrun("--standalone", "--nproc_per_node", "2") + _task(tiny, manifest, out) + slow,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())  # fmt: skip
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not list(out.glob("results.rank*.jsonl")) and launcher.poll() is None:  # the first answer is in
            assert time.monotonic() < deadline, "no rank answered anything"
            time.sleep(0.05)
        pids = rank_pids(launcher)
        assert 1 in pids, f"rank 1 was not found among the launcher's children: {pids}"
        os.kill(pids[1], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0  # the job says it did not finish
    written = sorted(out.glob("tone*.json"))
    assert 0 < len(written) < N_INPUTS, stderr
    for path in written:  # whole files only
        json.loads(path.read_text())
    rerun = salmonn(*_task(tiny, manifest, out, *slow))  # one process this time
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(written)} already done" in rerun.stderr
    finished = _results(out)
    assert sorted(finished) == sorted(alone)  # every input exactly once (_results checks for twice)
    assert not list(out.glob("results.rank*.jsonl"))


def test_under_a_launcher_without_an_output_folder_is_one_line(tiny, manifest):
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    args = [shutil.which("salmonn"), "caption", "--manifest", str(manifest), "--model", str(tiny / "model.toml"), *FAST]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["salmonn: error: under a launcher (2 processes), give -o DIR: each "
                                                  "process writes its results there"]  # fmt: skip


def test_gpus_without_cuda_is_one_line(tiny, manifest, tmp_path):
    result = salmonn(*_task(tiny, manifest, tmp_path / "out", "--gpus", "all"))
    assert result.returncode == 5
    assert result.stderr.strip().startswith("salmonn: error: --gpus needs CUDA GPUs")


def test_each_rank_takes_every_world_th_input_and_gpu_lists_are_checked():
    from salmonn_cli.cli.launch import gpu_ids, without_gpus_option
    from salmonn_cli.distributed import Ranks
    from salmonn_cli.errors import UsageError

    items = list(range(7))
    shares = [Ranks(rank, 3).share(items) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]] and sorted(sum(shares, [])) == items
    assert gpu_ids("all", 4) == [0, 1, 2, 3] and gpu_ids("1,3", 4) == [1, 3]
    for wrong in ("4", "0,0", "x", ""):
        with pytest.raises(UsageError):
            gpu_ids(wrong, 4)
    argv = ["transcribe", "--gpus", "0,1", "a.wav", "--gpus=all", "-o", "out"]
    assert without_gpus_option(argv) == ["transcribe", "a.wav", "-o", "out"]

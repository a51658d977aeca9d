"""`salmonn download`, `models`, `doctor` through the real entry point; downloads from a local Hub server
(tests/hub_server.py) that serves tiny components, then an offline `ask` from the cache alone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.hub_server import FakeRepo, HubServer


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hub_model(tiny, tmp_path_factory) -> tuple[Path, list[FakeRepo]]:
    """A model file whose four components come from the (local) Hub, and the repos that serve them."""
    beats, ckpt = (tiny / "beats.pt").read_bytes(), (tiny / "salmonn.pth").read_bytes()
    repos = [
        FakeRepo("tiny/whisper", folder_files(tiny / "whisper")),
        FakeRepo("tiny/demo", {"beats/beats.pt": beats, "app.py": b"print()"}, repo_type="space"),
        FakeRepo("tiny/llm", folder_files(tiny / "llm")),
        FakeRepo("tiny/salmonn", {"salmonn.pth": ckpt}),
    ]
    local = (tiny / "model.toml").read_text(encoding="utf-8")
    settings_and_sizes = local[local.index("[settings]") :]
    text = f'''name = "tiny-hub"
description = "tiny components from a local Hub"

[[whisper.sources]]
repo = "tiny/whisper"
folder = ""
allow = ["*.json", "*.safetensors"]

[[beats.sources]]
repo = "tiny/demo"
repo_type = "space"
file = "beats/beats.pt"
size = {len(beats)}
sha256 = "{hashlib.sha256(beats).hexdigest()}"

[[llm.sources]]
repo = "tiny/llm"
folder = ""
allow = ["*.json", "*.safetensors", "tokenizer.model"]

[[checkpoint.sources]]
repo = "tiny/salmonn"
file = "salmonn.pth"
size = {len(ckpt)}
sha256 = "{hashlib.sha256(ckpt).hexdigest()}"

{settings_and_sizes}'''
    path = tmp_path_factory.mktemp("models") / "tiny-hub.toml"
    path.write_text(text, encoding="utf-8")
    return path, repos


def salmonn(*args: str, endpoint: str = "http://127.0.0.1:9", hf_home: Path, offline: bool = False):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith(("HF_", "HUGGINGFACE")) and k != "TRANSFORMERS_OFFLINE"
    }
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([shutil.which("salmonn"), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "tone.wav"
    sf.write(path, (0.3 * np.sin(np.arange(16_000) / 5)).astype(np.float32), 16_000)
    return path


def test_download_then_offline_ask_from_the_cache(hub_model, clip, tmp_path):
    model_file, repos = hub_model
    home = tmp_path / "hf"
    with HubServer(repos) as hub:
        fetched = salmonn("download", "--model", str(model_file), endpoint=hub.url, hf_home=home)
        assert fetched.returncode == 0, fetched.stderr
        paths = dict(line.split("\t") for line in fetched.stdout.splitlines())
        assert set(paths) == {"whisper", "beats", "llm", "checkpoint"}
        assert all(Path(p).exists() for p in paths.values())
        assert not any("app.py" in r.path for r in hub.requests)  # only what the model file allows
        seen = len(hub.requests)
        asked = salmonn(
            "ask",
            str(clip),
            "What is it?",
            "--model",
            str(model_file),
            "--offline",
            "--device",
            "cpu",
            "--quant",
            "none",
            "--beams",
            "1",
            "--max-new-tokens",
            "3",
            "-f",
            "json",
            endpoint=hub.url,
            hf_home=home,
        )
        assert asked.returncode == 0, asked.stderr
        record = json.loads(asked.stdout)
        assert record["model"] == "tiny-hub"
        assert record["checkpoint_sha256"] == hashlib.sha256(Path(paths["checkpoint"]).read_bytes()).hexdigest()
        assert len(hub.requests) == seen  # offline: not one request


def test_ask_downloads_what_is_missing_on_first_use(hub_model, clip, tmp_path):
    model_file, repos = hub_model
    with HubServer(repos) as hub:
        asked = salmonn(
            "ask",
            str(clip),
            "Hi",
            "--model",
            str(model_file),
            "--device",
            "cpu",
            "--quant",
            "none",
            "--beams",
            "1",
            "--max-new-tokens",
            "2",
            endpoint=hub.url,
            hf_home=tmp_path / "hf",
        )
        assert asked.returncode == 0, asked.stderr
        assert any(r.path.endswith("salmonn.pth") for r in hub.requests)


def test_offline_without_cache_is_one_sentence_exit_4(hub_model, clip, tmp_path):
    model_file, _ = hub_model
    run = salmonn("ask", str(clip), "Hi", "--model", str(model_file), hf_home=tmp_path / "empty", offline=True)
    assert run.returncode == 4
    assert "not in the cache and offline mode is on" in run.stderr and "salmonn download" in run.stderr
    assert "Traceback" not in run.stderr


def test_download_refuses_offline_mode(tmp_path):
    run = salmonn("download", "--model", "salmonn-7b", hf_home=tmp_path / "hf", offline=True)
    assert run.returncode == 2 and "offline mode is on" in run.stderr


def test_download_from_an_unreachable_hub_says_so(hub_model, tmp_path):
    model_file, _ = hub_model
    run = salmonn("download", "--model", str(model_file), endpoint="http://127.0.0.1:9", hf_home=tmp_path / "hf")
    assert run.returncode == 4 and "cannot reach the Hub" in run.stderr and "Traceback" not in run.stderr


def test_models_lists_builtins_with_memory_needs(tmp_path):
    run = salmonn("models", "-f", "json", hf_home=tmp_path / "hf", offline=True)
    assert run.returncode == 0, run.stderr
    rows = {row["name"]: row for row in json.loads(run.stdout)}
    assert set(rows) == {"salmonn-13b", "salmonn-7b"}
    big, small = rows["salmonn-13b"]["gpu_memory_gib"], rows["salmonn-7b"]["gpu_memory_gib"]
    assert big["none"] > big["8bit"] > big["4bit"] > small["4bit"]
    assert rows["salmonn-13b"]["cached_components"] == 0 and rows["salmonn-13b"]["components"] == 4
    table = salmonn("models", hf_home=tmp_path / "hf", offline=True)
    assert table.returncode == 0 and "salmonn-13b" in table.stdout


def test_doctor_reports_this_machine(tmp_path):
    run = salmonn("doctor", "-f", "json", hf_home=tmp_path / "hf")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    import torch

    assert report["torch"] == torch.__version__ and report["python"] == sys.version.split()[0]
    assert report["hf_cache"].startswith(str(tmp_path / "hf"))
    assert set(report["fits"]) == {"salmonn-13b", "salmonn-7b"}
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["memory_budget_bytes"] > 0
    text = salmonn("doctor", hf_home=tmp_path / "hf")
    assert text.returncode == 0 and "bitsandbytes" in text.stdout

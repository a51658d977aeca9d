"""Loud failures: every wrong checkpoint is a typed error naming the file and the key; code in a pickle is refused."""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch

import salmonn_cli
from salmonn_cli.checkpoint import read_beats_checkpoint, read_salmonn_checkpoint
from salmonn_cli.errors import (
    CheckpointError,
    MissingKeyError,
    ShapeMismatchError,
    UnexpectedKeyError,
    UnsafeCheckpointError,
)
from salmonn_cli.weights import torch_load

from .reference import reference_dir

COMPONENTS = reference_dir() / "components" / "tiny_a"
PROJ = "speech_llama_proj.weight"
LORA_B = "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
QFORMER_DENSE = "speech_Qformer.bert.encoder.layer.0.attention.output.dense.weight"


def reference_state() -> dict:
    return dict(torch.load(COMPONENTS / "salmonn.pth", map_location="cpu", weights_only=True)["model"])


def write_checkpoint(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "salmonn.pth"
    torch.save({"model": state}, path)
    return path


def load_with(checkpoint: Path, beats: Path = COMPONENTS / "beats.pt"):
    return salmonn_cli.load_model(COMPONENTS / "whisper", beats, COMPONENTS / "llm", checkpoint, qformer_heads=4)


def test_reference_checkpoint_reads_with_sizes_from_tensors():
    ckpt = read_salmonn_checkpoint(COMPONENTS / "salmonn.pth")
    shape = ckpt.connector_shape
    assert (shape.query_tokens, shape.hidden, shape.layers, shape.intermediate) == (1, 64, 2, 128)
    assert (shape.encoder_width, shape.cross_attention_every, shape.llm_hidden) == (128, 1, 64)
    assert (ckpt.lora_shape.rank, ckpt.lora_shape.targets, ckpt.lora_shape.layers) == (8, ("q_proj", "v_proj"), 2)


def test_renamed_key_is_refused_by_name(tmp_path):
    state = reference_state()
    state["speech_llama_projection.weight"] = state.pop(PROJ)
    with pytest.raises(UnexpectedKeyError) as err:
        read_salmonn_checkpoint(write_checkpoint(tmp_path, state))
    assert err.value.key == "speech_llama_projection.weight"
    assert str(tmp_path) in str(err.value) and err.value.exit_code == 4


def test_renamed_lora_key_is_refused(tmp_path):
    state = reference_state()
    state[LORA_B.replace(".default.weight", ".weight")] = state.pop(LORA_B)
    with pytest.raises(UnexpectedKeyError) as err:
        read_salmonn_checkpoint(write_checkpoint(tmp_path, state))
    assert "lora_B.weight" in err.value.key


def test_missing_connector_key_is_named(tmp_path):
    state = reference_state()
    del state["ln_audio.bias"]
    with pytest.raises(MissingKeyError) as err:
        load_with(write_checkpoint(tmp_path, state))
    assert err.value.key == "ln_audio.bias"


def test_missing_lora_key_is_named(tmp_path):
    state = reference_state()
    del state[LORA_B]
    with pytest.raises(MissingKeyError) as err:
        load_with(write_checkpoint(tmp_path, state))
    assert err.value.key == LORA_B


def test_wrong_shape_is_named(tmp_path):
    state = reference_state()
    state[QFORMER_DENSE] = state[QFORMER_DENSE][:, :32].clone()
    with pytest.raises(ShapeMismatchError) as err:
        load_with(write_checkpoint(tmp_path, state))
    assert err.value.key == QFORMER_DENSE


def test_projection_width_must_match_the_llm(tmp_path):
    state = reference_state()
    state[PROJ] = torch.randn(32, 64)
    state["speech_llama_proj.bias"] = torch.randn(32)
    with pytest.raises(ShapeMismatchError) as err:
        load_with(write_checkpoint(tmp_path, state))
    assert err.value.key == PROJ


def test_checkpoint_without_model_dict(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": reference_state()}, path)
    with pytest.raises(CheckpointError, match="not a SALMONN checkpoint"):
        read_salmonn_checkpoint(path)


def test_beats_file_without_cfg(tmp_path):
    raw = torch.load(COMPONENTS / "beats.pt", map_location="cpu", weights_only=True)
    path = tmp_path / "beats.pt"
    torch.save({"model": raw["model"]}, path)
    with pytest.raises(CheckpointError, match="'cfg'") as err:
        read_beats_checkpoint(path)
    assert err.value.key == "cfg"


NOISE = bytes(random.Random(0).randrange(256) for _ in range(4096))


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, I am a text file\n", NOISE, b"\x80" + NOISE, b"PK\x03\x04" + NOISE],
    ids=["empty", "text", "noise", "pickle-like-noise", "zip-like-noise"],
)
def test_non_checkpoint_file(tmp_path, content):
    path = tmp_path / "salmonn.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as err:
        read_salmonn_checkpoint(path)
    assert not isinstance(err.value, UnsafeCheckpointError)


def test_missing_file():
    with pytest.raises(CheckpointError, match="not found"):
        read_salmonn_checkpoint("/nonexistent/salmonn.pth")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_that_runs_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "salmonn.pth"
    payload = {"model": {"x": torch.zeros(1)}, "payload": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafeCheckpointError):
        torch_load(path)
    assert not marker.exists()


def test_whisper_folder_without_weights(tmp_path):
    folder = tmp_path / "whisper"
    shutil.copytree(COMPONENTS / "whisper", folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        salmonn_cli.load_model(folder, COMPONENTS / "beats.pt", COMPONENTS / "llm", COMPONENTS / "salmonn.pth")

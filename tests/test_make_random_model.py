"""scripts/make_random_model.py writes a named shape with random weights in the original formats, LLM sharded."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors import safe_open

import salmonn_cli
from benchmarks.shapes import SHAPES
from salmonn_cli.checkpoint import read_salmonn_checkpoint
from salmonn_cli.model_file import load_model_spec
from salmonn_cli.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # a subprocess run plus two model loads: about 15 s

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_random_model.py"
TINY = SHAPES["tiny"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def script_module():
    spec = importlib.util.spec_from_file_location("make_random_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tone(seconds: float = 1.0, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("random") / "tiny"
    proc = run_script("--shape", "tiny", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tiny-random" in proc.stdout
    return out


def test_llm_is_one_shard_per_decoder_layer_with_an_index_naming_every_tensor(made):
    llm = made / "llm"
    index = json.loads((llm / "model.safetensors.index.json").read_text())
    shards = sorted(llm.glob("*.safetensors"))
    assert len(shards) == TINY.llm.layers + 2  # + embeddings, + final norm and lm_head
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    in_files, total = {}, 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                assert str(tensor.dtype) == "torch.float16", key
                in_files[key], total = shard.name, total + tensor.numel() * tensor.element_size()
    assert index["weight_map"] == in_files
    assert index["metadata"]["total_size"] == total
    for i in range(TINY.llm.layers):
        layer = {index["weight_map"][k] for k in in_files if k.startswith(f"model.layers.{i}.")}
        assert len(layer) == 1 and sum(k.startswith(f"model.layers.{i}.") for k in in_files) == 9


def test_tokenizer_decodes_every_id_of_the_vocabulary(made):
    codec = load_tokenizer(made / "llm")
    config = json.loads((made / "llm" / "config.json").read_text())
    assert len(codec) == config["vocab_size"] == TINY.llm.vocab
    assert (codec.bos_token_id, codec.eos_token_id) == (1, 2)
    for i in range(len(codec)):
        assert isinstance(codec.decode([i]), str)


def test_padding_reaches_llama_vocab_without_changing_how_text_encodes(tmp_path):
    from salmonn_cli.tokenizer import SentencePieceText

    script = script_module()
    padded = tmp_path / "padded"
    padded.mkdir()
    script.write_llama_tokenizer(padded, 32_000)
    (tmp_path / "trained.model").write_bytes(script.tiny.train_sentencepiece(1000))
    codec, trained = load_tokenizer(padded), SentencePieceText(tmp_path / "trained.model")
    assert len(codec) == 32_000
    assert codec.decode([31_999]) == "tok31999"
    assert all(isinstance(codec.decode([i]), str) for i in range(32_000))
    for text in ("USER: <Speech><SpeechHere></Speech> Describe the audio.\nASSISTANT:", "tok12 tok 123 ünï 你"):
        assert codec.encode(text) == trained.encode(text)


def test_model_file_sizes_match_the_shape(made):
    spec = load_model_spec(str(made / "model.toml"))
    assert spec.name == "tiny-random"
    assert spec.settings.qformer_heads == TINY.qformer.heads and spec.settings.lora_scale == 4.0
    params = TINY.params()
    assert spec.sizes.llm_params == TINY.llm.params(lora=False)
    assert spec.sizes.whisper_encoder_params == params["whisper"]
    assert spec.sizes.connector_params == params["connector"]
    ckpt = read_salmonn_checkpoint(made / "salmonn.pth")
    assert ckpt.lora_shape.rank == 8 and ckpt.lora_shape.layers == TINY.llm.layers
    assert all(v.abs().min() > 0 for k, v in ckpt.lora.items() if ".lora_B." in k)


@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_loads_through_the_model_file_and_generates(made, quantization):
    from salmonn_cli.hub import resolve_components

    spec = load_model_spec(str(made / "model.toml"))
    paths = resolve_components(spec, offline=True)
    model = salmonn_cli.load_model(
        paths.whisper,
        paths.beats,
        paths.llm,
        paths.checkpoint,
        quantization=quantization,
        qformer_heads=spec.settings.qformer_heads,
        lora_scale=spec.settings.lora_scale,
    )
    result = model.generate(tone(), "Describe the audio.", max_new_tokens=3)
    assert 1 <= len(result.token_ids) <= 3
    assert result.text == model.tokenizer.decode(result.token_ids)


def test_refuses_a_non_empty_folder_in_one_line(tmp_path):
    (tmp_path / "something").write_text("keep me")
    proc = run_script("--shape", "tiny", str(tmp_path))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not empty" in lines[0] and "--force" in lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["something"]


def test_refuses_a_shape_the_disk_cannot_hold(tmp_path, monkeypatch):
    script = script_module()
    monkeypatch.setattr(script.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**30))
    with pytest.raises(SystemExit, match=r"salmonn-13b needs about \d+\.\d+ GiB but only 1\.00 GiB is free"):
        script.main(["--shape", "salmonn-13b", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()

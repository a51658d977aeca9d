"""Loading the LLM one decoder layer at a time (the optimum-quanto path of `load_model`): the same model as
`from_pretrained` + LoRA + quantising afterwards, from every folder format, with loud key errors and a host-memory
peak that does not grow with the number of layers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantize import QuantSpec, llm_dtype
from salmonn_cli.checkpoint import read_salmonn_checkpoint
from salmonn_cli.errors import MissingKeyError, UnexpectedKeyError
from salmonn_cli.llm import LoraSpec, attach_lora, load_language_model, quantize_base_layers
from salmonn_cli.llm_stream import load_language_model_by_layer
from salmonn_cli.weights import WeightFolder

from .reference import reference_dir

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = reference_dir() / "components" / "tiny_a"
PROMPT_IDS = torch.tensor([[1, 5, 9, 30, 44, 2, 17]])


@pytest.fixture(scope="module")
def checkpoint():
    return read_salmonn_checkpoint(COMPONENTS / "salmonn.pth")


def stream(folder: Path, checkpoint, mode: str):
    spec = QuantSpec(mode, "quanto")
    return load_language_model_by_layer(
        folder,
        dtype=llm_dtype(spec, "cpu", torch.float32),
        device=torch.device("cpu"),
        lora_spec=LoraSpec(checkpoint.lora_shape),
        lora=checkpoint.lora,
        lora_path=checkpoint.path,
        quantization=spec,
    )


def whole_then_quantised(folder: Path, checkpoint, mode: str):
    """The other order: the whole LLM loaded by from_pretrained, LoRA attached, then quantised."""
    spec = QuantSpec(mode, "quanto")
    model = load_language_model(folder, dtype=llm_dtype(spec, "cpu", torch.float32), device="cpu")
    model = attach_lora(model, LoraSpec(checkpoint.lora_shape), checkpoint.lora, path=checkpoint.path)
    return quantize_base_layers(model, spec, "cpu")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT_IDS).logits.float()


def safetensors_copy(tmp_path: Path, *, shards: int = 1) -> Path:
    """The tiny LLM folder with its pytorch_model.bin rewritten as safetensors (sharded with an index if shards>1)."""
    folder = tmp_path / f"llm-{shards}"
    shutil.copytree(COMPONENTS / "llm", folder, ignore=shutil.ignore_patterns("pytorch_model.bin"))
    state = torch.load(COMPONENTS / "llm" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    keys = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in keys}, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for n in range(shards):
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[n::shards]  # interleaved: every shard holds pieces of every layer
        save_file({k: state[k].contiguous() for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_layer_by_layer_is_the_same_model_as_loading_whole_then_quantising(checkpoint, mode):
    folder = COMPONENTS / "llm"  # pytorch_model.bin, as the original Vicuna releases
    streamed, whole = stream(folder, checkpoint, mode), whole_then_quantised(folder, checkpoint, mode)
    assert torch.equal(logits(streamed), logits(whole))
    assert set(streamed.state_dict()) == set(whole.state_dict())
    assert not any(t.is_meta for t in [*streamed.parameters(), *streamed.buffers()])


@pytest.mark.parametrize("shards", [1, 3])
def test_safetensors_single_or_sharded_give_the_same_model(tmp_path, checkpoint, shards):
    expected = logits(stream(COMPONENTS / "llm", checkpoint, "4bit"))
    assert torch.equal(logits(stream(safetensors_copy(tmp_path, shards=shards), checkpoint, "4bit")), expected)


def test_weight_folder_lists_keys_shard_by_shard(tmp_path):
    folder = safetensors_copy(tmp_path, shards=3)
    weights = WeightFolder(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    files = [index[k] for k in weights.keys()]
    assert files == sorted(files) and set(weights.keys()) == set(index)
    key = "model.layers.1.mlp.down_proj.weight"
    copy = weights.get(key, torch.bfloat16)
    assert copy.dtype == torch.bfloat16
    assert torch.equal(copy, load_file(str(folder / index[key]))[key].to(torch.bfloat16))


def test_a_legacy_pickle_shard_is_read_once_and_gives_the_same_model(tmp_path, checkpoint, monkeypatch):
    folder = tmp_path / "legacy"
    shutil.copytree(COMPONENTS / "llm", folder)
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # torch < 1.6's format
    opened = []
    original_init = WeightFolder.__init__

    def remember(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(WeightFolder, "__init__", remember)
    model = stream(folder, checkpoint, "4bit")
    assert torch.equal(logits(model), logits(stream(COMPONENTS / "llm", checkpoint, "4bit")))
    assert opened[0].opened == 1  # not once per decoder layer: the whole pickle is read each time it is opened
    assert opened[1].opened == 1 + len(model.base_model.model.model.layers)  # a zip archive: reopened per layer


def test_a_missing_llm_tensor_is_named(tmp_path, checkpoint):
    folder = safetensors_copy(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.self_attn.q_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(MissingKeyError) as caught:
        stream(folder, checkpoint, "4bit")
    assert caught.value.key == "model.layers.1.self_attn.q_proj.weight" and caught.value.path == str(folder)


def test_an_unexpected_llm_tensor_is_named_but_old_rotary_buffers_are_not(tmp_path, checkpoint):
    folder = safetensors_copy(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # saved by transformers < 4.31
    save_file(state, str(folder / "model.safetensors"))
    stream(folder, checkpoint, "8bit")
    state["model.layers.0.mlp.extra.weight"] = torch.ones(2, 2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(UnexpectedKeyError) as caught:
        stream(folder, checkpoint, "8bit")
    assert caught.value.key == "model.layers.0.mlp.extra.weight"


# A medium LLaMA (8 layers, 1024 wide) written to disk in fp16, then loaded in a fresh process after a tiny warm-up
# load that pays the lazy imports; the peak resident memory the load adds is compared with what it builds.
_WRITE = textwrap.dedent(
    """
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(sys.argv[1])
    """
)
_LOAD_AND_MEASURE = textwrap.dedent(
    """
    import gc, json, sys, torch
    from pathlib import Path
    from quantize import QuantSpec
    from benchmarks.memory import module_bytes
    from salmonn_cli.checkpoint import LoraShape
    from salmonn_cli.llm import LoraSpec
    from salmonn_cli.llm_stream import load_language_model_by_layer

    def status(field):  # Linux: VmRSS (now) / VmHWM (peak since the last reset), in bytes
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def load(folder, mode):
        config = json.loads((folder / "config.json").read_text())
        layers, hidden = config["num_hidden_layers"], config["hidden_size"]
        name = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.default.weight"
        lora = {name.format(i, t, ab): torch.zeros((8, hidden) if ab == "A" else (hidden, 8))
                for i in range(layers) for t in ("q_proj", "v_proj") for ab in "AB"}
        return load_language_model_by_layer(
            folder, dtype=torch.bfloat16, device=torch.device("cpu"),
            lora_spec=LoraSpec(LoraShape(8, ("q_proj", "v_proj"), layers)), lora=lora, lora_path=folder,
            quantization=QuantSpec(mode, "quanto"))

    folder, tiny, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    del_me = load(tiny, mode); del del_me; gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    before = status("VmRSS")
    model = load(folder, mode)
    print(json.dumps({"increase": status("VmHWM") - before, "size": module_bytes(model)}))
    """
)


@pytest.fixture(scope="module")
def medium_llm(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("medium") / "llm"
    done = subprocess.run([sys.executable, "-c", _WRITE, str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_loading_holds_the_finished_model_plus_a_couple_of_layers(medium_llm, mode):
    args = [sys.executable, "-c", _LOAD_AND_MEASURE, str(medium_llm), str(COMPONENTS / "llm"), mode]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    layer_bf16 = 2 * (4 * 1024 * 1024 + 3 * 1024 * 2816)  # one decoder layer before quantising: 25.7 MB
    # Measured: finished + 1.9 layers (4bit), + 1.4 layers (8bit). Loading whole first would add all 8 layers.
    assert figures["increase"] < figures["size"] + 3 * layer_bf16, figures

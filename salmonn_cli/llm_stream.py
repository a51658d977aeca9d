"""Load the LLM one decoder layer at a time, quantising each as it arrives (the optimum-quanto path).

`from_pretrained` would hold the whole LLM in full precision before quanto could quantise it: 13.5 GB of bf16 for
a 7B model that ends at 4 GB in int4. Here the LLM is built on the meta device, LoRA is attached there, and each
decoder layer in turn takes its tensors from the folder, is quantised and gives its float copies back, so the host
holds the finished model plus one full-precision layer. The benchmark builds its random-weight shapes through
the same code, from a `WeightSource` that draws the tensors instead of reading them (benchmarks/build.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from quantize.memory import release_freed_memory

from .errors import CheckpointError, MissingKeyError, UnexpectedKeyError
from .weights import WeightFolder, load_strict

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .llm import LoraSpec

# Saved by older transformers versions; recomputed from the config, so nothing is lost by not reading them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LAYERS = "model.layers."


class WeightSource(Protocol):
    """Where a layer-by-layer build takes its tensors from: a `weights.WeightFolder`, or random weights."""

    folder: Path  # named in error messages

    def keys(self) -> list[str]: ...

    def __contains__(self, key: str) -> bool: ...

    def get(self, key: str, dtype: "torch.dtype | None" = None) -> "torch.Tensor": ...

    def unmap(self) -> None: ...

    def close(self) -> None: ...


def load_language_model_by_layer(folder: str | Path, **build) -> "nn.Module":
    """`build_language_model_by_layer` from a Hugging Face LLaMA folder (safetensors or .bin, sharded or not)."""
    from .llm import read_llm_config

    folder = Path(folder)
    return build_language_model_by_layer(read_llm_config(folder), WeightFolder(folder), **build)


def build_language_model_by_layer(
    config,
    weights: WeightSource,
    *,
    dtype: "torch.dtype",
    device: "torch.device",
    lora_spec: "LoraSpec",
    lora: Mapping[str, "torch.Tensor"],
    lora_path: Path,
    quantization,
) -> "nn.Module":
    """LlamaForCausalLM of `config` + the checkpoint's LoRA (peft), frozen and in eval mode, its base Linear layers
    quantised under `quantization` (a `quantize.QuantSpec` applied after loading) one decoder layer at a time.

    Every tensor of `weights` is accounted for: a missing one or a misshapen one is a CheckpointError naming the
    key as the folder writes it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .llm import attach_lora, decoding_lora_dtype, quantize_base_layers

    folder = weights.folder
    with torch.device("meta"):
        llama = AutoModelForCausalLM.from_config(config, dtype=dtype)
    llama.requires_grad_(False)
    model = attach_lora(llama, lora_spec, lora, path=lora_path)  # on meta: shapes checked, nothing copied yet
    _check_keys(weights, _file_keys_of(llama))  # before any tensor is read: a wrong folder fails at once
    for index, layer in enumerate(llama.model.layers):
        prefix = f"{_LAYERS}{index}."
        tensors = {name: _layer_tensor(weights, lora, prefix, name, dtype) for name in layer.state_dict()}
        load_strict(layer, tensors, path=folder, source_keys=_file_names(prefix, tensors), assign=True)
        del tensors
        weights.unmap()  # pages read from a mapped shard would otherwise stay resident until the end
        release_freed_memory()  # the file's own copies, freed as each was converted to `dtype`
        layer.to(device)
        quantize_base_layers(layer, quantization, device.type)  # this layer's float copies are freed now
        release_freed_memory()
    for name in _outer_modules(llama):
        module = llama.get_submodule(name)
        tensors = {key: weights.get(f"{name}.{key}", dtype) for key in module.state_dict()}
        load_strict(module, tensors, path=folder, source_keys={k: f"{name}.{k}" for k in tensors}, assign=True)
        module.to(device)
    if config.tie_word_embeddings:
        llama.tie_weights()
    decoding_lora_dtype(model)  # the checkpoint's LoRA tensors were assigned as the file holds them
    weights.close()
    reset_rotary(llama, device)
    _check_nothing_on_meta(model, folder)
    return model.eval()


def _layer_tensor(
    weights: WeightSource,
    lora: Mapping[str, "torch.Tensor"],
    prefix: str,
    name: str,
    dtype: "torch.dtype",
) -> "torch.Tensor":
    """The tensor `name` of one decoder layer: LoRA's from the checkpoint, the rest from the folder in `dtype`
    (converted as it is copied out of the file: one copy, not two)."""
    if ".lora_" in name:
        return lora[f"base_model.model.{prefix}{name}"]
    return weights.get(_file_key(prefix + name), dtype)


def _file_key(name: str) -> str:
    """The folder's name for a base-model tensor under peft (which inserts `.base_layer` into adapted Linears)."""
    return name.replace(".base_layer.", ".")


def _file_names(prefix: str, tensors: Mapping[str, object]) -> dict[str, str]:
    return {name: _file_key(prefix + name) for name in tensors if ".lora_" not in name}


def _file_keys_of(llama: "nn.Module") -> set[str]:
    """The keys the folder must hold for `llama` (peft-wrapped, on meta): all but LoRA's and a tied head."""
    tied = llama.config.tie_word_embeddings
    keys = {_file_key(k) for k in llama.state_dict() if ".lora_" not in k}
    return keys - {"lm_head.weight"} if tied else keys


def _check_keys(weights: WeightSource, expected: set[str]) -> None:
    for key in sorted(expected):
        if key not in weights:
            raise MissingKeyError("missing key in the LLM's weights", path=weights.folder, key=key)
    for key in weights.keys():
        # a tied head may still be saved; the copy is not read, the embedding table stands for it
        if key not in expected and not key.endswith(_IGNORED_SUFFIXES) and key != "lm_head.weight":
            raise UnexpectedKeyError("unexpected key in the LLM's weights", path=weights.folder, key=key)


def _outer_modules(llama: "nn.Module") -> list[str]:
    """The modules holding tensors outside the decoder layers (embeddings, final norm, output head)."""
    names = []
    for name, module in llama.named_modules():
        if name.startswith(_LAYERS) or name == "model.layers":
            continue
        if any(True for _ in module.parameters(recurse=False)):
            names.append(name)
    tied = llama.config.tie_word_embeddings
    return [n for n in names if not (tied and n == "lm_head")]


def _check_nothing_on_meta(model: "nn.Module", folder: Path) -> None:
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"the LLM's {left[0]} was never loaded (not a LLaMA-style model?)", path=folder)


def reset_rotary(llama: "nn.Module", device: "torch.device") -> None:
    """Recompute LLaMA's rotary inverse frequencies: computed at construction, so absent when built on meta."""
    import torch

    rotary = llama.model.rotary_emb
    with torch.device(device):  # transformers 5 builds the buffer on the default device
        llama.model.rotary_emb = type(rotary)(llama.config)

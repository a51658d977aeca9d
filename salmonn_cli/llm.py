"""The LLM: LLaMA/Vicuna from a Hugging Face folder, its tokenizer, and LoRA attached with peft.

This is the ONE module that knows how peft wraps the model (PeftModel -> LoraModel -> LlamaForCausalLM) and
where the LoRA scaling lives; everything else calls the functions here.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import LORA_FILE_PREFIX, LoraShape
from .errors import CheckpointError, MissingKeyError, ShapeMismatchError, UnexpectedKeyError
from .model_file import ModelSettings

if TYPE_CHECKING:
    import torch
    from torch import nn

ADAPTER = "default"  # peft's adapter name, also the one in the original checkpoints' keys


@dataclass(frozen=True)
class LoraSpec:
    """How the checkpoint's LoRA was trained: its shape plus the scaling (lora_alpha / r) it was trained at."""

    shape: LoraShape
    trained_scale: float = ModelSettings.lora_scale  # the published models' unless the model file says otherwise
    dropout: float = 0.1  # the original's; only active in training mode


def read_llm_config(folder: str | Path):
    """The transformers config of an HF LLM folder; a missing or unreadable one is a CheckpointError."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError("LLM folder has no config.json", path=folder)
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the LLM's config: {exc}", path=folder) from None


def load_language_model(
    folder: str | Path, *, dtype: "torch.dtype", device: str, quantization_config=None
) -> "nn.Module":
    """LlamaForCausalLM from an HF folder (safetensors or .bin, sharded or not), frozen, in eval mode.

    Holds the whole LLM in `dtype` while loading; `llm_stream.load_language_model_by_layer` does not.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    read_llm_config(folder)
    kwargs = {"dtype": dtype}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the LLM: {exc}", path=folder) from None
    if quantization_config is None:
        model.to(device)
    model.requires_grad_(False)
    return model.eval()


def attach_lora(model: "nn.Module", spec: LoraSpec, lora: Mapping[str, "torch.Tensor"], *, path: Path) -> "nn.Module":
    """Wrap `model` with peft LoRA of the checkpoint's shape and load its tensors, every one accounted for."""
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    if spec.shape.layers != n_layers:
        raise ShapeMismatchError(
            f"the checkpoint's LoRA covers {spec.shape.layers} layers but the LLM has {n_layers}", path=path
        )
    config = LoraConfig(
        r=spec.shape.rank,
        lora_alpha=spec.trained_scale * spec.shape.rank,  # scaling = alpha / r = trained scale
        lora_dropout=spec.dropout,
        target_modules=list(spec.shape.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft still calls a transformers API deprecated in v5; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, config)
    expected = {k: v for k, v in wrapped.state_dict().items() if ".lora_" in k}
    _check_lora_keys(expected, lora, path)
    import torch

    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(lora[key].to(dtype=target.dtype, device=target.device))
    wrapped.requires_grad_(False)
    return wrapped.eval()


# peft's adapter matrices (lora_A/B.<adapter>) and the output head stay in full precision when quantising after
# LoRA is attached: the adapter is tiny and trained, and both backends keep lm_head unquantised.
_KEEP_FULL_PRECISION = ("*.lora_A.*", "*.lora_B.*", "*lm_head")


def quantize_base_layers(model: "nn.Module", spec, device_type: str) -> "nn.Module":
    """Quantise the base Linear layers under the LoRA-wrapped `model` (`quantize.QuantSpec`); LoRA itself is kept.

    For backends applied after loading (optimum-quanto) this turns each `lora.Linear.base_layer` into a quanto
    QLinear, which peft's forward still calls, so `lora_scale` acts as before; for bitsandbytes, already applied
    by `load_language_model`, it only adjusts the CPU kernels.
    """
    from quantize import quantize_in_place

    return quantize_in_place(model, spec, device_type, exclude=_KEEP_FULL_PRECISION)


def _check_lora_keys(expected: Mapping[str, "torch.Tensor"], lora: Mapping[str, "torch.Tensor"], path: Path) -> None:
    original = (LORA_FILE_PREFIX + "{}").format  # how the key is written in the SALMONN file
    for key in lora:
        if key not in expected:
            raise UnexpectedKeyError("unexpected LoRA key in SALMONN checkpoint", path=path, key=original(key))
    for key, target in expected.items():
        if key not in lora:
            raise MissingKeyError("missing LoRA key in SALMONN checkpoint", path=path, key=original(key))
        if tuple(lora[key].shape) != tuple(target.shape):
            raise ShapeMismatchError(
                f"shape {tuple(lora[key].shape)} does not match the LLM's {tuple(target.shape)}",
                path=path,
                key=original(key),
            )


def lora_layers(model: "nn.Module") -> list["nn.Module"]:
    """Every peft LoRA layer of the wrapped model."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def scaled_lora(model: "nn.Module", scale: float | None) -> Iterator[None]:
    """Set the scaling every LoRA layer applies (W x + scale * B A x) for the duration of a call.

    `None` leaves the current scaling; 0 turns LoRA off. The previous values are restored afterwards.
    """
    if scale is None:
        yield
        return
    layers = lora_layers(model)
    saved = [layer.scaling[ADAPTER] for layer in layers]
    try:
        for layer in layers:
            layer.scaling[ADAPTER] = float(scale)
        yield
    finally:
        for layer, value in zip(layers, saved, strict=True):
            layer.scaling[ADAPTER] = value


def input_embeddings(model: "nn.Module") -> "nn.Module":
    """The token-embedding table of the (possibly peft-wrapped) LLM."""
    return model.get_input_embeddings()

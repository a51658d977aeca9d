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


def is_encoder_decoder(folder: str | Path) -> bool:
    """Whether the LLM in `folder` is an encoder-decoder (T5, Flan-T5) rather than a decoder-only causal LM."""
    return bool(getattr(read_llm_config(folder), "is_encoder_decoder", False))


def load_language_model(
    folder: str | Path, *, dtype: "torch.dtype", device: str, quantization_config=None
) -> "nn.Module":
    """The LM of an HF folder (safetensors or .bin, sharded or not), frozen, in eval mode: a causal LM (LLaMA,
    Vicuna, Qwen2, Mistral, ...) or an encoder-decoder one (T5, Flan-T5).

    Holds the whole LLM in `dtype` while loading; `llm_stream.load_language_model_by_layer` does not.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    folder = Path(folder)
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(folder) else AutoModelForCausalLM
    kwargs = {"dtype": dtype}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": device})
    try:
        model = auto.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the LLM: {exc}", path=folder) from None
    if quantization_config is None:
        model.to(device)
    model.requires_grad_(False)
    return model.eval()


def wrap_lora(model: "nn.Module", *, rank: int, scale: float, targets, dropout: float) -> "nn.Module":
    """`model` wrapped by peft with a fresh LoRA adapter (A random, B zero: the wrapped model computes what the
    model did) of `rank` on the modules named `targets`, scaling `scale` (= lora_alpha / r)."""
    from quantize import quiet_bitsandbytes

    quiet_bitsandbytes()  # peft imports bitsandbytes whenever it is installed, which logs what no user can act on
    from peft import LoraConfig, get_peft_model

    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    config = LoraConfig(
        r=rank,
        lora_alpha=scale * rank,  # scaling = alpha / r = the trained scale
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",
        task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft still calls a transformers API deprecated in v5; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def lora_tensors(model: "nn.Module") -> dict[str, "torch.Tensor"]:
    """The adapter's tensors of a wrapped model by their peft names (`base_model.model...lora_A.default.weight`)."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".lora_" in name}


def attach_lora(model: "nn.Module", spec: LoraSpec, lora: Mapping[str, "torch.Tensor"], *, path: Path) -> "nn.Module":
    """Wrap `model` with peft LoRA of the checkpoint's shape and load its tensors, every one accounted for."""
    n_layers = model.config.num_hidden_layers
    if spec.shape.layers != n_layers:
        raise ShapeMismatchError(
            f"the checkpoint's LoRA covers {spec.shape.layers} layers but the LLM has {n_layers}", path=path
        )
    wrapped = wrap_lora(
        model, rank=spec.shape.rank, scale=spec.trained_scale, targets=spec.shape.targets, dropout=spec.dropout
    )
    expected = lora_tensors(wrapped)
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


def lora_scale_tensor(model: "nn.Module") -> "torch.Tensor | None":
    """The one 0-dim tensor every LoRA layer of `model` multiplies by (W x + s * B A x); None without LoRA.

    peft keeps a Python float per layer; the first call puts one shared float32 tensor, on the adapter's device, in
    its place, so changing the scale is a device-side write (`fill_`): a CUDA graph or compiled step that read the
    tensor keeps reading it, and nothing is recorded or compiled again. peft's forward multiplies by whatever the
    dict holds, and the tensor's product is the float's exactly (s = 0 gives the base output to the bit).
    """
    import torch

    layers = lora_layers(model)
    if not layers:
        return None
    device = layers[0].lora_A[ADAPTER].weight.device
    current = layers[0].scaling[ADAPTER]
    shared = current if isinstance(current, torch.Tensor) and current.device == device else None
    if shared is None or any(layer.scaling[ADAPTER] is not shared for layer in layers):
        with torch.inference_mode(False):  # a normal tensor: training multiplies by it and saves it for backward
            shared = torch.tensor(float(current), dtype=torch.float32, device=device)
        for layer in layers:
            layer.scaling[ADAPTER] = shared
    return shared


def lora_scales(model: "nn.Module") -> set[float]:
    """The distinct scalings the LoRA layers of `model` apply now (one value for a model loaded here)."""
    return {float(layer.scaling[ADAPTER]) for layer in lora_layers(model)}


@contextlib.contextmanager
def scaled_lora(model: "nn.Module", scale: float | None) -> Iterator[None]:
    """Set the scaling every LoRA layer applies (W x + scale * B A x) for the duration of a call.

    `None` leaves the current scaling; 0 turns LoRA off. The previous value is restored afterwards. The scale is
    data (`lora_scale_tensor`), so a new value re-records and re-compiles nothing.
    """
    shared = None if scale is None else lora_scale_tensor(model)
    if shared is None:
        yield
        return
    import torch

    saved = float(shared)
    try:
        with torch.inference_mode(False), torch.no_grad():
            shared.fill_(float(scale))
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            shared.fill_(saved)


def input_embeddings(model: "nn.Module") -> "nn.Module":
    """The token-embedding table of the (possibly peft-wrapped) LLM."""
    return model.get_input_embeddings()

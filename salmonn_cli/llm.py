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
    decoding_lora_dtype(wrapped)
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
    """The float32 vector of LoRA scalings, one element per LoRA layer of `model` (W x + s_i * B A x); None
    without LoRA.

    peft keeps a Python float per layer; the first call puts, in each layer's place, a 0-dim view of its own
    element of one vector on the adapter's device. So setting the scale is one device-side write (`fill_`) that a
    CUDA graph or compiled step recorded earlier keeps reading; and peft's own in-place `scale_layer` (`scaling *=
    s`) changes that layer's element alone, as it does to a float, where one shared 0-dim tensor would compound the
    factor over every layer. A layer whose scaling was replaced since (peft's `set_scale` or `unscale_layer` assign a
    new value) gets its value written back into its element and the view back: the vector, and every step recorded
    over it, stays the one to read. The product with a view is the float's exactly (s = 0 gives the base output to
    the bit).
    """
    import torch

    layers = lora_layers(model)
    if not layers:
        return None
    device = layers[0].lora_A[ADAPTER].weight.device
    vector = layers[0].__dict__.get(_SCALE_VECTOR)  # kept on the first layer: found even when peft replaced every view
    if vector is None or vector.numel() != len(layers) or vector.device != device:
        with torch.inference_mode(False):  # a normal tensor: training multiplies by it and saves it for backward
            vector = torch.tensor([float(layer.scaling[ADAPTER]) for layer in layers], dtype=torch.float32,
                                  device=device)  # fmt: skip
            _install_views(layers, vector, range(len(layers)))
        layers[0].__dict__[_SCALE_VECTOR] = vector
        return vector
    stray = [i for i, layer in enumerate(layers) if not _is_view_of(layer.scaling[ADAPTER], vector, i)]
    if stray:
        with torch.inference_mode(False), torch.no_grad():
            for i in stray:  # peft assigned a float (or a new tensor) here: its value, into the bound element
                vector[i] = float(layers[i].scaling[ADAPTER])
            _install_views(layers, vector, stray)
    return vector


_SCALE_VECTOR = "_salmonn_lora_scales"


def _is_view_of(scaling, vector: "torch.Tensor", index: int) -> bool:
    import torch

    return (
        isinstance(scaling, torch.Tensor)
        and scaling._base is vector
        and scaling.dim() == 0
        and scaling.data_ptr() == vector.data_ptr() + index * vector.element_size()
    )


def _install_views(layers: list, vector: "torch.Tensor", indices) -> None:
    import torch

    with torch.inference_mode(False):
        for i in indices:
            layers[i].scaling[ADAPTER] = vector[i]


def lora_scales(model: "nn.Module") -> set[float]:
    """The distinct scalings the LoRA layers of `model` apply now (one value for a model loaded here)."""
    return {float(layer.scaling[ADAPTER]) for layer in lora_layers(model)}


def adapter_state(model: "nn.Module") -> tuple:
    """What a recorded step takes as fixed about the adapter: per LoRA layer, whether it is disabled, merged, and
    which adapters are active. Python branches in peft's forward read these, so a step recorded under one state
    would replay that state's arithmetic under another (the scale, being data, is not part of it)."""
    return tuple((layer.disable_adapters, layer.merged, tuple(layer.active_adapters)) for layer in lora_layers(model))


def set_lora_dtype(model: "nn.Module", dtype: "torch.dtype") -> None:
    """Keep the LoRA matrices of `model` in `dtype` (training: float32 master weights, as peft keeps them)."""
    for layer in lora_layers(model):
        for adapters in (layer.lora_A, layer.lora_B):
            if ADAPTER in adapters:
                adapters[ADAPTER].to(dtype)


def decoding_lora_dtype(model: "nn.Module") -> None:
    """The LoRA matrices of `model` in the dtype its activations run in (the token table's), for decoding.

    peft upcasts them to float32 (`autocast_adapter_dtype`), which costs a cast of the input and one of the output on
    every adapted layer of every step, for a first-logits difference lost in half precision's own: on every reference
    case float16 is 0.0060-0.0100 from float32's logits with float32 LoRA or with float16 LoRA alike, bfloat16
    0.064-0.10 either way, with the same argmax. Training gives them float32 master weights for its duration.
    """
    import torch

    dtype = input_embeddings(model).weight.dtype
    if dtype in (torch.float16, torch.bfloat16):
        set_lora_dtype(model, dtype)


@contextlib.contextmanager
def scaled_lora(model: "nn.Module", scale: float | None) -> Iterator[None]:
    """Set the scaling every LoRA layer applies (W x + scale * B A x) for the duration of a call.

    `None` leaves the current scaling; 0 turns LoRA off. Each layer's previous value is restored afterwards. The
    scale is data (`lora_scale_tensor`), so a new value re-records and re-compiles nothing.
    """
    vector = None if scale is None else lora_scale_tensor(model)
    if vector is None:
        yield
        return
    import torch

    with torch.inference_mode(False), torch.no_grad():
        saved = vector.clone()
        vector.fill_(float(scale))
    try:
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            vector.copy_(saved)


def input_embeddings(model: "nn.Module") -> "nn.Module":
    """The token-embedding table of the (possibly peft-wrapped) LLM."""
    return model.get_input_embeddings()

"""`load_model`: the four published components in their original formats -> one SalmonnModel."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import DependencyError, ShapeMismatchError, UsageError
from .model_file import ComponentPaths, ModelSettings
from .prompt import template_problem

if TYPE_CHECKING:
    import torch
    from torch import nn

    from quantize import QuantSpec

    from .checkpoint import ConnectorShape, SalmonnCheckpoint

BERT_HEAD_WIDTH = 64  # BERT's attention heads are 64 wide: 12 heads for the published 768-wide Q-Former


def resolve_device(device: "str | torch.device") -> "torch.device":
    """`cpu`, `cuda`, `cuda:N` or `auto` (CUDA when there is one) -> torch.device; no CUDA -> DependencyError."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DependencyError(f"device {str(device)!r} was asked for but this machine has no usable CUDA GPU")
    return resolved


def load_model(
    whisper,
    beats,
    llm,
    checkpoint,
    *,
    device: "str | torch.device" = "cpu",
    dtype=None,
    quantization=None,
    settings: ModelSettings | None = None,
    **setting_changes: Any,
):
    """Load SALMONN from its four components and return a `SalmonnModel` in eval mode.

    whisper: HF Whisper folder (only the encoder is read); beats: the BEATs `.pt` as published;
    llm: HF LLaMA/Vicuna folder with its tokenizer; checkpoint: the SALMONN `.pth`.
    Sizes are read from the checkpoint tensors. The facts in no tensor are `settings` (a `ModelSettings`, default
    the published models'), any of whose fields may also be given by keyword: `second_per_window`,
    `second_stride`, `qformer_heads` (the Q-Former's attention heads, default width/64), `lora_scale` (the LoRA
    scaling the checkpoint was trained at, which every call uses unless it names its own) and `prompt_template`.
    dtype: default float32 on CPU, float16 on CUDA. quantization: None/"none", "8bit", "4bit" or a
    `quantize.QuantSpec`: applied to the LLM only (on CUDA torchao where installed, else bitsandbytes;
    optimum-quanto on CPU/MPS; quanto on CPU and torchao int4 run the LLM in bfloat16, which their kernels need).
    """
    import torch

    from .checkpoint import read_salmonn_checkpoint
    from .model.qformer import WindowSpec
    from .model.salmonn import SalmonnModel, SalmonnSettings
    from .model.whisper import load_whisper_encoder
    from .tokenizer import load_tokenizer

    settings = _settings(settings, setting_changes)
    paths = ComponentPaths(Path(whisper), Path(beats), Path(llm), Path(checkpoint))
    torch_device = resolve_device(device)
    dtype = dtype or (torch.float16 if torch_device.type == "cuda" else torch.float32)
    quant = llm_quantization(quantization, torch_device, dtype)  # a missing backend fails before any load

    ckpt = read_salmonn_checkpoint(paths.checkpoint)
    whisper_encoder, extractor = load_whisper_encoder(paths.whisper, device=torch_device, dtype=dtype)
    beats_model = _load_beats(paths.beats, torch_device, dtype)
    _check_widths(ckpt.connector_shape, whisper_encoder.config.d_model, beats_model.cfg.encoder_embed_dim, ckpt.path)
    windows = WindowSpec.from_seconds(settings.second_per_window, settings.second_stride)
    model = SalmonnModel(
        whisper=whisper_encoder,
        whisper_extractor=extractor,
        beats=beats_model,
        connector=_load_connector(ckpt, windows, settings.qformer_heads, torch_device, dtype),
        llm=_load_llm(paths.llm, ckpt, settings.lora_scale, quant, torch_device),
        tokenizer=load_tokenizer(paths.llm),
        settings=SalmonnSettings(windows, settings.lora_scale, settings.prompt_template),
    )
    return model.eval()


def _settings(settings: ModelSettings | None, changes: dict[str, Any]) -> ModelSettings:
    """`settings` (default the published models') with the keyword changes; an unknown name is a UsageError."""
    unknown = sorted(set(changes) - {f.name for f in fields(ModelSettings)})
    if unknown:
        raise UsageError(f"unknown model setting(s): {', '.join(unknown)}")
    changes = {name: value for name, value in changes.items() if value is not None}  # None: not given
    settings = replace(settings or ModelSettings(), **changes)
    problem = template_problem(settings.prompt_template)
    if problem is not None:
        raise UsageError(problem)
    return settings


def _load_beats(path: Path, device: "torch.device", dtype: "torch.dtype") -> "nn.Module":
    from .checkpoint import read_beats_checkpoint
    from .model.beats import build_beats

    config, state = read_beats_checkpoint(path)
    return build_beats(config, state).to(device=device, dtype=dtype).eval()


def _load_connector(ckpt: "SalmonnCheckpoint", windows, heads: int | None, device, dtype) -> "nn.Module":
    from .model.qformer import SpeechConnector
    from .weights import load_strict

    shape = ckpt.connector_shape
    connector = SpeechConnector(shape, windows, heads or max(1, shape.hidden // BERT_HEAD_WIDTH))
    load_strict(connector, ckpt.connector, path=ckpt.path, source_keys=ckpt.source_keys)
    return connector.to(device=device, dtype=dtype).eval()


def _load_llm(
    folder: Path, ckpt: "SalmonnCheckpoint", trained_scale: float, quant: LlmQuantization, device: "torch.device"
) -> "nn.Module":
    """LLaMA + the checkpoint's LoRA, quantised as `quant` says: layer by layer for quanto and torchao (the host or
    GPU holds one full-precision layer at a time), else as it loads."""
    from .llm import LoraSpec, attach_lora, load_language_model, quantize_base_layers, read_llm_config
    from .llm_stream import load_language_model_by_layer

    _check_llm_width(read_llm_config(folder).hidden_size, ckpt.connector_shape.llm_hidden, ckpt.path)
    lora_spec = LoraSpec(ckpt.lora_shape, trained_scale=trained_scale)
    if quant.spec.applied_after_loading(device.type):  # quantised as each layer is read
        return load_language_model_by_layer(
            folder,
            dtype=quant.dtype,
            device=device,
            lora_spec=lora_spec,
            lora=ckpt.lora,
            lora_path=ckpt.path,
            quantization=quant.spec,
        )
    # full precision, or bitsandbytes, which from_pretrained applies tensor by tensor
    language_model = load_language_model(
        folder, dtype=quant.dtype, device=str(device), quantization_config=quant.transformers_config
    )
    language_model = attach_lora(language_model, lora_spec, ckpt.lora, path=ckpt.path)
    return quantize_base_layers(language_model, quant.spec, device.type)  # bitsandbytes CPU kernels


def _check_llm_width(llm_width: int, projected_width: int, path: Path) -> None:
    if llm_width != projected_width:
        raise ShapeMismatchError(
            f"projection outputs {projected_width} features but the LLM is {llm_width} wide"
            " (is this the LLM the checkpoint was trained with?)",
            path=path,
            key="speech_llama_proj.weight",
        )


def _check_widths(shape: "ConnectorShape", whisper_width: int, beats_width: int, path: Path) -> None:
    if shape.speech_width != whisper_width:
        raise ShapeMismatchError(
            f"ln_speech is {shape.speech_width} wide but the Whisper encoder is {whisper_width}",
            path=path,
            key="ln_speech.weight",
        )
    if shape.audio_width != beats_width:
        raise ShapeMismatchError(
            f"ln_audio is {shape.audio_width} wide but BEATs is {beats_width}", path=path, key="ln_audio.weight"
        )
    if shape.encoder_width != whisper_width + beats_width:
        raise ShapeMismatchError(
            f"the Q-Former reads {shape.encoder_width} features per frame, not Whisper + BEATs"
            f" = {whisper_width + beats_width}",
            path=path,
            key="speech_Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
        )


class LlmQuantization(NamedTuple):
    """How the LLM is loaded: the spec, the dtype it runs in, and the transformers config (bitsandbytes) or None."""

    spec: QuantSpec
    dtype: torch.dtype
    transformers_config: object | None


def llm_quantization(quantization, device, dtype) -> LlmQuantization:
    """What `quantization` means for the LLM on `device`; errors become ours.

    Checked before anything is loaded, so a missing backend fails fast.
    """
    from quantize import MissingBackendError, QuantizationError, QuantSpec, llm_dtype, llm_quantization_config

    try:
        spec = QuantSpec.parse(quantization)
        run_dtype = llm_dtype(spec, device.type, dtype)
        return LlmQuantization(spec, run_dtype, llm_quantization_config(spec, device.type, compute_dtype=run_dtype))
    except MissingBackendError as exc:
        raise DependencyError(str(exc)) from None
    except QuantizationError as exc:
        raise UsageError(str(exc)) from None

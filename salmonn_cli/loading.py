"""`load_model`: the four published components in their original formats -> one SalmonnModel."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .errors import DependencyError, ShapeMismatchError, UsageError

DEFAULT_SECOND_PER_WINDOW = 0.333333
BERT_HEAD_WIDTH = 64  # BERT's attention heads are 64 wide: 12 heads for the published 768-wide Q-Former


@dataclass(frozen=True)
class ComponentPaths:
    """Where the four components are: an HF Whisper folder, a BEATs .pt, an HF LLaMA folder, a SALMONN .pth."""

    whisper: Path
    beats: Path
    llm: Path
    checkpoint: Path


def resolve_device(device: str):
    """`cpu`, `cuda`, `cuda:N` or `auto` (CUDA when there is one) -> torch.device; no CUDA -> DependencyError."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DependencyError(f"device {device!r} was asked for but this machine has no usable CUDA GPU")
    return resolved


def load_model(
    whisper,
    beats,
    llm,
    checkpoint,
    *,
    device: str = "cpu",
    dtype=None,
    quantization=None,
    second_per_window: float = DEFAULT_SECOND_PER_WINDOW,
    second_stride: float = DEFAULT_SECOND_PER_WINDOW,
    qformer_heads: int | None = None,
    lora_scale: float = 4.0,
    prompt_template: str | None = None,
):
    """Load SALMONN from its four components and return a `SalmonnModel` in eval mode.

    whisper: HF Whisper folder (only the encoder is read); beats: the BEATs `.pt` as published;
    llm: HF LLaMA/Vicuna folder with its tokenizer; checkpoint: the SALMONN `.pth`.
    Sizes are read from the checkpoint tensors. Two facts are in no tensor: the Q-Former's number of attention
    heads (`qformer_heads`, default width/64) and the LoRA scaling the checkpoint was trained at (`lora_scale`,
    lora_alpha / r = 4.0 for the published models), which every call uses unless it names its own.
    dtype: default float32 on CPU, float16 on CUDA. quantization: None/"none", "8bit", "4bit" or a
    `quantize.QuantSpec`: applied to the LLM only (bitsandbytes on CUDA, optimum-quanto on CPU/MPS; quanto int4
    runs the LLM in bfloat16 on CPU, where its fast kernel needs it).
    prompt_template: the chat template with one `{}` (default the original's `USER: {}\nASSISTANT:`).
    """
    import torch

    from .checkpoint import load_strict, read_beats_checkpoint, read_salmonn_checkpoint
    from .llm import LoraSpec, attach_lora, load_language_model, quantize_base_layers, read_llm_config
    from .llm_stream import load_language_model_by_layer
    from .model.beats import build_beats
    from .model.qformer import SpeechConnector, WindowSpec
    from .model.salmonn import SalmonnModel, SalmonnSettings
    from .model.whisper import load_whisper_encoder
    from .tokenizer import load_text_codec

    paths = ComponentPaths(Path(whisper), Path(beats), Path(llm), Path(checkpoint))
    torch_device = resolve_device(device)
    dtype = dtype or (torch.float16 if torch_device.type == "cuda" else torch.float32)
    spec, llm_dtype, llm_quantization = _llm_quantization(quantization, torch_device, dtype)

    ckpt = read_salmonn_checkpoint(paths.checkpoint)
    shape = ckpt.connector_shape
    whisper_encoder, extractor = load_whisper_encoder(paths.whisper, device=torch_device, dtype=dtype)
    beats_cfg, beats_state = read_beats_checkpoint(paths.beats)
    beats_model = build_beats(beats_cfg, beats_state).to(device=torch_device, dtype=dtype).eval()
    _check_widths(shape, whisper_encoder.config.d_model, beats_model.cfg.encoder_embed_dim, ckpt.path)

    windows = WindowSpec.from_seconds(second_per_window, second_stride)
    connector = SpeechConnector(shape, windows, qformer_heads or max(1, shape.hidden // BERT_HEAD_WIDTH))
    load_strict(connector, ckpt.connector, path=ckpt.path, source_keys=ckpt.source_keys)
    connector = connector.to(device=torch_device, dtype=dtype).eval()

    _check_llm_width(read_llm_config(paths.llm).hidden_size, shape.llm_hidden, ckpt.path)
    lora_spec = LoraSpec(ckpt.lora_shape, trained_scale=lora_scale)
    if spec.enabled and spec.backend_for(torch_device.type) == "quanto":  # quantised as each layer is read
        language_model = load_language_model_by_layer(
            paths.llm,
            dtype=llm_dtype,
            device=torch_device,
            lora_spec=lora_spec,
            lora=ckpt.lora,
            lora_path=ckpt.path,
            quantization=spec,
        )
    else:  # full precision, or bitsandbytes, which from_pretrained applies tensor by tensor
        language_model = load_language_model(
            paths.llm, dtype=llm_dtype, device=str(torch_device), quantization_config=llm_quantization
        )
        language_model = attach_lora(language_model, lora_spec, ckpt.lora, path=ckpt.path)
        language_model = quantize_base_layers(language_model, spec, torch_device.type)  # bitsandbytes CPU kernels
    settings = SalmonnSettings(windows=windows, trained_lora_scale=lora_scale)
    if prompt_template is not None:
        settings = replace(settings, prompt_template=_checked_template(prompt_template))
    model = SalmonnModel(
        whisper=whisper_encoder,
        whisper_extractor=extractor,
        beats=beats_model,
        connector=connector,
        llm=language_model,
        tokenizer=load_text_codec(paths.llm),
        settings=settings,
    )
    return model.eval()


def _check_llm_width(llm_width: int, projected_width: int, path: Path) -> None:
    if llm_width != projected_width:
        raise ShapeMismatchError(
            f"projection outputs {projected_width} features but the LLM is {llm_width} wide"
            " (is this the LLM the checkpoint was trained with?)",
            path=path,
            key="speech_llama_proj.weight",
        )


def _check_widths(shape, whisper_width: int, beats_width: int, path: Path) -> None:
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


def _llm_quantization(quantization, device, dtype):
    """(QuantSpec, the LLM's dtype, the transformers quantisation config or None); errors become ours.

    Checked before anything is loaded, so a missing backend fails fast.
    """
    from quantize import MissingBackendError, QuantizationError, QuantSpec, llm_dtype, llm_quantization_config

    try:
        spec = QuantSpec.parse(quantization)
        run_dtype = llm_dtype(spec, device.type, dtype)
        return spec, run_dtype, llm_quantization_config(spec, device.type, compute_dtype=run_dtype)
    except MissingBackendError as exc:
        raise DependencyError(str(exc)) from None
    except QuantizationError as exc:
        raise UsageError(str(exc)) from None


def _checked_template(template: str) -> str:
    """A prompt template needs exactly one `{}`, where the audio slot and the instruction go."""
    if template.count("{}") != 1:
        raise UsageError(f"a prompt template needs exactly one '{{}}' for the instruction; got {template!r}")
    return template

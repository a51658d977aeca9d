"""Build a SALMONN of a named shape with random weights, one layer at a time, on the target device.

Every component is constructed on the meta device (no memory), then materialised module by module on the
target device. The LLM goes through the loader's own layer-by-layer build and quantisation
(`llm_stream.build_language_model_by_layer`), fed by `RandomWeights` instead of a folder, so the host never holds
more than the finished (quantised) model plus one full-precision decoder layer. bitsandbytes, which the loader
applies inside `from_pretrained`, is applied here layer by layer as `from_pretrained` does it.
The classes are the package's own (transformers' WhisperEncoder, our BEATs and SpeechConnector,
LlamaForCausalLM + `llm.attach_lora`, `quantize` backends), assembled into the `SalmonnModel` the CLI runs; only
the weights' values are random, which changes neither speed nor memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from quantize.memory import release_freed_memory
from salmonn_cli.generate import LLAMA_BOS, LLAMA_EOS, LLAMA_PAD
from salmonn_cli.llm_stream import reset_rotary

from .codec import WordCodec
from .shapes import MEL_BINS, BeatsShape, LlamaShape, ModelShape, WhisperShape

if TYPE_CHECKING:
    from quantize import QuantSpec
    from salmonn_cli.model.salmonn import SalmonnModel

LORA_TARGETS = ("q_proj", "v_proj")
_RANDOM = Path("<random weights>")  # what attach_lora would name in an error message


def build_model(
    shape: ModelShape,
    spec: QuantSpec,
    device: torch.device,
    *,
    llm_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
) -> SalmonnModel:
    """A `SalmonnModel` of `shape` on `device`: encoders in `dtype` (default load_model's), the LLM quantised under
    `spec`.

    llm_dtype: the LLM's (unquantised parts' and activations') dtype; default load_model's (`quantize.llm_dtype`).
    """
    from quantize import llm_dtype as default_llm_dtype
    from quantize import llm_quantization_config
    from salmonn_cli.model.qformer import WindowSpec
    from salmonn_cli.model.salmonn import SalmonnModel, SalmonnSettings
    from salmonn_cli.model_file import ModelSettings

    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)  # as load_model's default
    llm_quantization_config(spec, device.type)  # as load_model: a missing backend fails now; quiets bitsandbytes
    whisper, extractor = build_whisper(shape, device, dtype)
    published = ModelSettings()
    windows = WindowSpec.from_seconds(published.second_per_window, published.second_stride)
    model = SalmonnModel(
        whisper=whisper,
        whisper_extractor=extractor,
        beats=build_beats(shape, device, dtype),
        connector=build_connector(shape, windows, device, dtype),
        llm=build_llm(shape.llm, spec, device, llm_dtype or default_llm_dtype(spec, device.type, dtype)),
        tokenizer=WordCodec(shape.llm.vocab),
        settings=SalmonnSettings(windows, published.lora_scale, published.prompt_template),
    )
    return model.eval()


def build_whisper(shape: ModelShape, device: torch.device, dtype: torch.dtype):
    """(WhisperEncoder, WhisperFeatureExtractor) as `model.whisper.load_whisper_encoder` returns them."""
    from transformers import WhisperFeatureExtractor

    encoder = meta_whisper(shape.whisper)
    materialise(encoder, device, dtype)
    return _frozen(encoder), WhisperFeatureExtractor(feature_size=MEL_BINS)  # large-v2's front end: 80 bins, 30 s


def build_beats(shape: ModelShape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Our BEATs with the iter3 configuration."""
    beats = meta_beats(shape.beats)
    materialise(beats, device, dtype)
    return _frozen(beats)


def build_connector(shape: ModelShape, windows, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Our SpeechConnector (LayerNorms, Q-Former, projection)."""
    connector = meta_connector(shape, windows)
    materialise(connector, device, dtype)
    return _frozen(connector)


def meta_whisper(w: WhisperShape) -> nn.Module:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(
        num_mel_bins=MEL_BINS,
        d_model=w.d_model,
        encoder_layers=w.layers,
        encoder_attention_heads=w.heads,
        encoder_ffn_dim=w.ffn,
        max_source_positions=w.positions,
    )
    with torch.device("meta"):
        return WhisperEncoder(config)


def meta_beats(b: BeatsShape) -> nn.Module:
    from salmonn_cli.model.beats import BEATs, BeatsConfig

    with torch.device("meta"):
        return BEATs(BeatsConfig.from_dict(b.config()))


def meta_connector(shape: ModelShape, windows) -> nn.Module:
    from salmonn_cli.checkpoint import ConnectorShape
    from salmonn_cli.model.qformer import SpeechConnector

    q, speech, audio = shape.qformer, shape.whisper.d_model, shape.beats.encoder_embed_dim
    sizes = ConnectorShape(
        query_tokens=q.query_tokens,
        hidden=q.hidden,
        layers=q.layers,
        intermediate=q.intermediate,
        encoder_width=speech + audio,
        cross_attention_every=1,
        speech_width=speech,
        audio_width=audio,
        llm_hidden=shape.llm.hidden,
    )
    with torch.device("meta"):
        return SpeechConnector(sizes, windows, q.heads)


def meta_llm(shape: LlamaShape, *, lora: bool = True) -> nn.Module:
    """LlamaForCausalLM of `shape` on the meta device, with its LoRA attached unless `lora=False`."""
    from transformers import LlamaForCausalLM

    from salmonn_cli.llm import attach_lora

    with torch.device("meta"):
        llm = LlamaForCausalLM(llama_config(shape))
        lora_tensors = _lora_tensors(shape) if lora else None
    return attach_lora(llm, _lora_spec(shape), lora_tensors, path=_RANDOM) if lora else llm


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_llm(shape: LlamaShape, spec: QuantSpec, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """LlamaForCausalLM + LoRA (peft, via `llm.attach_lora`), quantised decoder layer by decoder layer.

    Full precision, optimum-quanto and torchao: `load_model`'s own layer-by-layer path. bitsandbytes: its layers
    exist before LoRA is attached, as `from_pretrained` makes them.
    """
    from quantize import resolve_backend

    if resolve_backend(spec, device.type) == "bitsandbytes":
        return _build_bitsandbytes_llm(shape, spec, device, dtype)
    from salmonn_cli.llm_stream import build_language_model_by_layer

    return build_language_model_by_layer(
        llama_config(shape),
        RandomWeights(llama_config(shape), device),
        dtype=dtype,
        device=device,
        lora_spec=_lora_spec(shape),
        lora=_lora_tensors(shape),
        lora_path=_RANDOM,
        quantization=spec,
    )


class RandomWeights:
    """The tensors a LLaMA folder of `config` holds, under its keys, drawn at random as each is asked for
    (`llm_stream.WeightSource`): norms 1, biases 0, the rest uniform with std ~ 1/sqrt(fan_in).

    Drawn on `device`: on a GPU a 13B shape is drawn in seconds where the host would take minutes.
    """

    folder = _RANDOM

    def __init__(self, config, device: torch.device | str = "cpu") -> None:
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            shapes = LlamaForCausalLM(config).state_dict()
        self._shapes = {key: tuple(tensor.shape) for key, tensor in shapes.items()}
        self._device = torch.device(device)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = torch.empty(self._shapes[key], dtype=dtype or torch.float32, device=self._device)
        _fill(tensor, key)
        return tensor

    def unmap(self) -> None:
        pass

    def close(self) -> None:
        pass


def _lora_spec(shape: LlamaShape):
    from salmonn_cli.checkpoint import LoraShape
    from salmonn_cli.llm import LoraSpec
    from salmonn_cli.model_file import ModelSettings

    return LoraSpec(LoraShape(shape.lora_rank, LORA_TARGETS, shape.layers), ModelSettings().lora_scale)


def _lora_tensors(shape: LlamaShape) -> dict[str, torch.Tensor]:
    """Adapter tensors of the checkpoint's shapes under peft's names: A random, B zero (as peft starts them)."""
    name = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.default.weight"
    h, r = shape.hidden, shape.lora_rank
    lora = {}
    for i in range(shape.layers):
        for target in LORA_TARGETS:
            lora[name.format(i, target, "A")] = torch.empty(r, h)
            lora[name.format(i, target, "B")] = torch.empty(h, r)
    for key, tensor in lora.items():
        if not tensor.is_meta:
            _fill(tensor, key)
    return lora


def _build_bitsandbytes_llm(shape: LlamaShape, spec: QuantSpec, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    from salmonn_cli.llm import attach_lora, quantize_base_layers

    with torch.device("meta"):
        llm = LlamaForCausalLM(llama_config(shape))
    llm.to(dtype)  # on meta: only the recorded dtype changes
    for layer in llm.model.layers:
        materialise(layer, bitsandbytes_draw_device(spec, device), dtype)
        to_bitsandbytes(layer, spec, device, dtype)
        layer.to(device)  # the norms
        release_freed_memory()
    setattr(llm, f"is_loaded_in_{spec.mode}", True)  # what peft reads to wrap bitsandbytes layers
    materialise(llm, device, dtype)  # embeddings, final norm, lm_head
    llm = attach_lora(llm, _lora_spec(shape), _lora_tensors(shape), path=_RANDOM)
    reset_rotary(llm.base_model.model, next(llm.parameters()).device)
    return quantize_base_layers(llm, spec, device.type)  # bitsandbytes' CPU kernel steering only


def bitsandbytes_draw_device(spec: QuantSpec, device: torch.device) -> torch.device:
    """Where a bitsandbytes layer's random weights are drawn before it is quantised onto `device`.

    NF4 (Params4bit) quantises a weight from any device, so 4-bit layers are drawn on `device` itself: a 13B shape's
    12.7 G random numbers take seconds on a GPU and 60-100 s on the host (~120-150 M per second here). LLM.int8
    (Int8Params) quantises only as it moves a host tensor to the GPU, so its layers are drawn on the host.
    """
    return device if spec.mode == "4bit" else torch.device("cpu")


def llama_config(shape: LlamaShape):
    """Vicuna's LlamaConfig with the sizes of `shape` (special ids <unk> 0, <s> 1, </s> 2)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=LLAMA_BOS,
        eos_token_id=LLAMA_EOS,
        pad_token_id=LLAMA_PAD,
    )


def to_bitsandbytes(layer: nn.Module, spec: QuantSpec, device: torch.device, dtype: torch.dtype) -> None:
    """Replace every nn.Linear of one decoder layer by its bitsandbytes NF4 / LLM.int8 form (as from_pretrained)."""
    import bitsandbytes as bnb

    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            size = (child.in_features, child.out_features)
            weight = child.weight.data
            if spec.mode == "4bit":
                new = bnb.nn.Linear4bit(*size, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
            else:
                new = bnb.nn.Linear8bitLt(*size, bias=False, has_fp16_weights=False, threshold=6.0, device="meta")
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            new.weight = new.weight.to(device)  # bitsandbytes quantises on this move
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, new)


def materialise(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter / buffer under `module` memory on `device` and small random values.

    Module by module (`to_empty(recurse=False)`), so only what is being materialised is allocated.
    """
    for name, sub in _modules_on_meta(module):
        for tensor in _own_tensors(sub).values():
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)  # still on meta: free
        sub.to_empty(device=device, recurse=False)
        for key, tensor in _own_tensors(sub).items():
            _fill(tensor.data, f"{name}.{key}")


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))


def _modules_on_meta(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, sub in module.named_modules():
        if any(t.is_meta for t in _own_tensors(sub).values()):
            yield name, sub


@torch.no_grad()
def _fill(tensor: torch.Tensor, name: str) -> None:
    """Norm weights 1, biases 0, others uniform with std ~ 1/sqrt(fan_in): activations stay finite in fp16."""
    if not tensor.is_floating_point():
        tensor.zero_()
    elif name.endswith("bias") or name.endswith("lora_B.default.weight"):
        tensor.zero_()  # LoRA B starts at zero, as peft initialises it
    elif tensor.dim() == 1 or "norm" in name.lower() or name.endswith(("weight_g", "grep_a")):
        tensor.fill_(1.0)
    else:
        fan_in = tensor[0].numel() if tensor.dim() > 1 else tensor.numel()
        bound = math.sqrt(3.0 / max(fan_in, 1))  # uniform: 4x faster than normal_ on CPU
        tensor.uniform_(-bound, bound)


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()

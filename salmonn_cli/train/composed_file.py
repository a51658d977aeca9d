"""The model file of a trained composed model (`OUT/model.toml`) and the one function that builds the model.

    name = "speechverse-tiny"
    format = "salmonn-composed/1"
    weights = "/abs/weights.safetensors" # what was trained: connector.* and the LLM's LoRA (llm.*)
    prompt_template = "USER: {}\\nASSISTANT:"
    [encoder]                            # kind + a local `path` (or Hub `sources`), as a recipe's encoders
    [connector]                          # as a recipe's
    [llm]
    [lora]                               # rank, alpha, dropout, targets; alpha / rank is the scale calls use

`salmonn ask/transcribe/serve --model OUT/model.toml` open it through `load_composed`; so does training, with no
weights (a fresh connector and LoRA) or a previous stage's.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import CheckpointError
from ..model_file import ComponentSpec, TomlTable, component_spec
from .recipe import ConnectorSpec, EncoderSpec, LoraSettings, TrainRecipe, read_connector, read_lora

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

FORMAT = "salmonn-composed/1"
WEIGHTS_FILE = "weights.safetensors"


@dataclass(frozen=True)
class ComposedSpec:
    name: str
    description: str
    encoder: EncoderSpec
    connector: ConnectorSpec
    llm: ComponentSpec
    lora: LoraSettings
    prompt_template: str | None  # None: chosen when the LLM is first seen (its chat template, else Vicuna's)
    weights: Path | None = None  # None: a fresh connector and LoRA
    file: Path | None = None


def composed_spec_of(recipe: TrainRecipe) -> ComposedSpec:
    """The model a recipe trains, before any weights."""
    return ComposedSpec(recipe.name, recipe.description, recipe.encoders[0], recipe.connector, recipe.llm.component,
                        recipe.lora, recipe.prompt_template)  # fmt: skip


def is_composed_model_file(text: str) -> bool:
    """Whether `--model text` names a composed model file (a .toml whose `format` is ours)."""
    path = Path(text).expanduser()
    if path.suffix != ".toml" or not path.is_file():
        return False
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # the model-file reader reports what is wrong with it


def read_composed_file(path: str | Path) -> ComposedSpec:
    path = Path(path).expanduser().resolve()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CheckpointError(f"cannot read the model file: {exc}", path=path) from None
    top = TomlTable(data, "", path)
    name, description = top.take("name", str), top.take("description", str, "")
    top.take("format", str)
    weights = path.parent / top.take("weights", str)
    template = top.take("prompt_template", str)
    encoder = dict(top.take("encoder", dict))
    kind = encoder.pop("kind", None)
    if kind not in ("whisper", "wavlm"):
        raise top.fail("encoder.kind", f"expected whisper or wavlm, got {kind!r}")
    encoder_spec = EncoderSpec(kind, component_spec(kind, encoder, path, where="encoder"))
    connector = read_connector(top.table("connector"))
    llm = component_spec("llm", top.take("llm", dict), path)
    lora = read_lora(top.table("lora"))
    top.done()
    if not weights.is_file():
        raise CheckpointError("the model's weights file is missing", path=weights)
    return ComposedSpec(name, description, encoder_spec, connector, llm, lora, template, weights, path)


def write_composed_file(out: Path, spec: ComposedSpec, *, weights: Path, encoder_path: Path, llm_path: Path) -> Path:
    """`out/model.toml` naming the weights and the components where they are on this machine (absolute paths)."""
    c, lora = spec.connector, spec.lora
    text = "\n".join([
        f"# written by `salmonn train`: run it with `salmonn ask --model {out / 'model.toml'} clip.wav`",
        f"name = {json.dumps(spec.name)}",
        f"description = {json.dumps(spec.description)}",
        f"format = {json.dumps(FORMAT)}",
        f"weights = {json.dumps(str(Path(weights).resolve()))}",
        f"prompt_template = {json.dumps(spec.prompt_template)}",
        "",
        "[encoder]",
        f"kind = {json.dumps(spec.encoder.kind)}",
        f"path = {json.dumps(str(encoder_path))}",
        "",
        "[connector]",
        f"kind = {json.dumps(c.kind)}",
        f"layers = {json.dumps(c.layers)}",
        f"kernel = {c.kernel}",
        f"strides = {json.dumps(list(c.strides))}",
        "",
        "[llm]",
        f"path = {json.dumps(str(llm_path))}",
        "",
        "[lora]",
        f"rank = {lora.rank}",
        f"alpha = {lora.alpha!r}",
        f"dropout = {lora.dropout!r}",
        f"targets = {json.dumps(list(lora.targets or ()))}",
        "",
    ])  # fmt: skip
    from ..atomic import write_atomically

    path = out / "model.toml"
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def load_composed(spec: ComposedSpec, *, encoder_path: Path, llm_path: Path, device, dtype, quantization=None,
                  seed: int = 0):  # fmt: skip
    """The ComposedModel of `spec` in eval mode: its weights loaded (every tensor accounted for), or with none a
    fresh connector (seeded) and a fresh LoRA (B = 0: the LLM answers as it did). `quantization`: the LLM's
    `loading.LlmQuantization` (None: full precision)."""
    import torch

    from ..llm import is_encoder_decoder, load_language_model, quantize_base_layers, wrap_lora
    from ..model.composed import ComposedModel, ComposedSettings
    from ..model.downsampler import Downsampler
    from ..model.speech_encoder import load_speech_encoder
    from ..tokenizer import load_tokenizer

    seq2seq = is_encoder_decoder(llm_path)
    encoder = load_speech_encoder(spec.encoder.kind, encoder_path, device=device, dtype=dtype)
    llm_dtype = quantization.dtype if quantization is not None else dtype
    config = quantization.transformers_config if quantization is not None else None
    llm = load_language_model(llm_path, dtype=llm_dtype, device=str(device), quantization_config=config)
    llm_width = llm.get_input_embeddings().weight.shape[1]
    c = spec.connector
    torch.manual_seed(seed)  # the fresh connector and LoRA A matrices: the same for the same seed
    connector = Downsampler(encoder.states, encoder.width, llm_width, weighted=c.layers == "weighted",
                            kernel=c.kernel, strides=c.strides)  # fmt: skip
    connector.to(device=device, dtype=torch.float32)  # trained weights are kept in float32 (tiny next to the LLM)
    targets = spec.lora.targets_for(seq2seq)
    llm = wrap_lora(llm, rank=spec.lora.rank, scale=spec.lora.scale, targets=targets, dropout=spec.lora.dropout)
    if spec.weights is not None:
        _load_weights(spec.weights, connector, llm)
    if quantization is not None and quantization.spec.applied_after_loading(torch.device(device).type):
        llm = quantize_base_layers(llm, quantization.spec, torch.device(device).type)
    llm.requires_grad_(False)
    template = spec.prompt_template or chat_template_of(llm_path, seq2seq)
    settings = ComposedSettings(seq2seq, spec.lora.scale, template)
    model = ComposedModel(encoder=encoder, connector=connector, llm=llm.eval(), tokenizer=load_tokenizer(llm_path),
                          settings=settings)  # fmt: skip
    return model.eval(), replace(spec, prompt_template=template, lora=replace(spec.lora, targets=targets))


def trained_tensors(model) -> dict:
    """What a composed model's weights file holds: the connector (`connector.*`) and LoRA (`llm.<peft name>`)."""
    from ..llm import lora_tensors

    out = {f"connector.{k}": v for k, v in model.connector.state_dict().items()}
    out.update({f"llm.{k}": v for k, v in lora_tensors(model.llm).items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _load_weights(path: Path, connector, llm) -> None:
    import torch
    from safetensors.torch import load_file

    from ..errors import MissingKeyError, ShapeMismatchError, UnexpectedKeyError
    from ..llm import lora_tensors

    tensors = load_file(str(path))
    expected = {f"connector.{k}": v for k, v in connector.state_dict().items()}
    expected.update({f"llm.{k}": v for k, v in lora_tensors(llm).items()})
    for key in tensors:
        if key not in expected:
            raise UnexpectedKeyError("the weights hold a tensor this model does not have", path=path, key=key)
    with torch.no_grad():
        for key, target in expected.items():
            if key not in tensors:
                raise MissingKeyError("the weights lack a tensor this model needs", path=path, key=key)
            if tensors[key].shape != target.shape:
                raise ShapeMismatchError(f"shape {tuple(tensors[key].shape)} is not the model's"
                                         f" {tuple(target.shape)}", path=path, key=key)  # fmt: skip
            target.copy_(tensors[key])


def chat_template_of(llm_path: Path, seq2seq: bool) -> str:
    """The prompt template for an LLM: T5 reads the bare prompt; a causal LM with a chat template gets its user
    turn and generation prompt around `{}`; one without gets SALMONN's (Vicuna's) template."""
    from ..prompt import PROMPT_TEMPLATE

    if seq2seq:
        return "{}"
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(llm_path))
        if not getattr(tokenizer, "chat_template", None):
            return PROMPT_TEMPLATE
        marker = "\x00AUDIO_AND_INSTRUCTION\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    except (OSError, ValueError, TypeError, KeyError):
        return PROMPT_TEMPLATE
    if text.count(marker) != 1 or "{" in text or "}" in text:  # the template is filled with str.format
        return PROMPT_TEMPLATE
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):  # the prompt's bos is added as an id, never as text
        text = text[len(bos) :]
    return text.replace(marker, "{}")

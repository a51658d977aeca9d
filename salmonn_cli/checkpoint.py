"""The original checkpoint formats: every SALMONN key map lives here and nowhere else.

- SALMONN `.pth`: `{'model': state_dict, ...}` holding only what was trained (connector + LoRA), maybe
  optimizer state too. The original loads it with `strict=False`, so a wrong key silently does nothing; we
  map every key, account for every tensor and fail loudly on anything unexpected, missing or misshapen.
- BEATs `.pt`: `{'cfg': dict, 'model': state_dict}`.

Files are opened by `weights.torch_load` (weights only). A Whisper folder is read in model/whisper.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, MissingKeyError, ShapeMismatchError, UnexpectedKeyError
from .weights import torch_load

if TYPE_CHECKING:
    import torch

# -- SALMONN checkpoint key map: (the original's prefix, ours: SpeechConnector's names) ------------------------
# "{n}" stands for a layer number; a trailing "$" makes a rule match a whole name. Rules are tried in order, so
# the Q-Former attention names come before the generic layer prefix. Read in both directions.
_CONNECTOR_NAMES: tuple[tuple[str, str], ...] = (
    ("speech_query_tokens$", "query_tokens$"),
    ("ln_speech.", "ln_speech."),
    ("ln_audio.", "ln_audio."),
    ("speech_Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
    ("speech_Qformer.bert.encoder.layer.{n}.attention.self.", "qformer.encoder.layer.{n}.attention.attention."),
    (
        "speech_Qformer.bert.encoder.layer.{n}.crossattention.self.",
        "qformer.encoder.layer.{n}.crossattention.attention.",
    ),
    ("speech_Qformer.bert.encoder.layer.", "qformer.encoder.layer."),
    ("speech_llama_proj.", "proj."),
)
LORA_FILE_PREFIX = "llama_model."  # the original's attribute holding the peft-wrapped LLaMA
_LORA_PATTERN = re.compile(
    rf"^{re.escape(LORA_FILE_PREFIX)}(base_model\.model\.model\.layers\.(\d+)\..+\.(\w+)\.lora_([AB])\.default\.weight)$"
)


def _rule(source: str, target: str) -> tuple[re.Pattern[str], str]:
    """One direction of a `_CONNECTOR_NAMES` pair: the pattern for `source`, the replacement that writes `target`."""
    whole = source.endswith("$")
    pattern = re.escape(source.removesuffix("$")).replace(re.escape("{n}"), r"(\d+)")
    return re.compile("^" + pattern + ("$" if whole else "")), target.removesuffix("$").replace("{n}", r"\1")


_TO_OURS = tuple(_rule(original, ours) for original, ours in _CONNECTOR_NAMES)
_TO_ORIGINAL = tuple(_rule(ours, original) for original, ours in _CONNECTOR_NAMES)
# Saved alongside the trained weights by the original's save filter (buffers, tied copies of frozen tables):
# they carry nothing we need, and ignoring them is safe because their values are fixed by other files.
_IGNORED_PATTERNS = tuple(
    re.compile(p)
    for p in (
        r"^speech_Qformer\.bert\.embeddings\.position_ids$",
        r"^beats\.encoder\.layers\.\d+\.self_attn\.relative_attention_bias\.weight$",
        r"^llama_model\.base_model\.model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",
    )
)


def _renamed(key: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, replacement in rules:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return None


@dataclass(frozen=True)
class ConnectorShape:
    """Sizes of the audio-to-LLM connector, read from the checkpoint tensors (never from a table)."""

    query_tokens: int  # learned queries per window
    hidden: int  # Q-Former width
    layers: int
    intermediate: int
    encoder_width: int  # Whisper width + BEATs width, what cross-attention reads
    cross_attention_every: int  # cross-attention in layers i with i % every == 0
    speech_width: int  # ln_speech size (Whisper d_model)
    audio_width: int  # ln_audio size (BEATs width)
    llm_hidden: int  # projection output


@dataclass(frozen=True)
class LoraShape:
    """LoRA layout read from the checkpoint: rank, the module names it targets and the layers it covers."""

    rank: int
    targets: tuple[str, ...]
    layers: int


@dataclass(frozen=True)
class SalmonnCheckpoint:
    """A SALMONN checkpoint, split into connector tensors (our names) and LoRA tensors (peft names)."""

    path: Path
    connector: dict[str, "torch.Tensor"]
    lora: dict[str, "torch.Tensor"]
    source_keys: dict[str, str]  # our name -> key in the file, for error messages
    connector_shape: ConnectorShape
    lora_shape: LoraShape


def read_salmonn_checkpoint(path: str | Path) -> SalmonnCheckpoint:
    """Read a SALMONN `.pth`, map every key and infer the sizes; raise a typed error for any stray key."""
    path = Path(path)
    raw = torch_load(path)
    if not isinstance(raw, Mapping) or not isinstance(raw.get("model"), Mapping):
        raise CheckpointError("not a SALMONN checkpoint: expected a dict with a 'model' state dict", path=path)
    connector: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, tensor in raw["model"].items():
        if any(p.match(key) for p in _IGNORED_PATTERNS):
            continue
        lora_match = _LORA_PATTERN.match(key)
        if lora_match:
            lora[lora_match.group(1)] = tensor
            source[lora_match.group(1)] = key
            continue
        ours = our_connector_key(key)
        if ours is None:
            raise UnexpectedKeyError("unexpected key in SALMONN checkpoint", path=path, key=key)
        connector[ours] = tensor
        source[ours] = key
    shape = _connector_shape(connector, path)
    return SalmonnCheckpoint(path, connector, lora, source, shape, _lora_shape(lora, path))


def our_connector_key(original: str) -> str | None:
    """Our SpeechConnector name for a SALMONN `.pth` key; None when it is no connector key."""
    return _renamed(original, _TO_OURS)


def original_connector_key(ours: str) -> str:
    """The key a SALMONN `.pth` uses for one of our SpeechConnector tensors (inverse of the reading map)."""
    original = _renamed(ours, _TO_ORIGINAL)
    if original is None:
        raise KeyError(f"no SALMONN checkpoint name for connector tensor {ours!r}")
    return original


def original_lora_key(peft_name: str) -> str | None:
    """The SALMONN `.pth` key of a peft LoRA tensor name (`base_model...lora_A.default.weight`); None if not LoRA."""
    key = LORA_FILE_PREFIX + peft_name
    return key if _LORA_PATTERN.match(key) else None


def salmonn_state_dict(
    connector: Mapping[str, "torch.Tensor"], lora: Mapping[str, "torch.Tensor"]
) -> dict[str, "torch.Tensor"]:
    """Connector tensors (our names) + LoRA tensors (peft names) -> a state dict with the ORIGINAL key names,
    which `read_salmonn_checkpoint` (and the original's `load_state_dict(strict=False)`) read back."""
    out = {original_connector_key(k): v for k, v in connector.items()}
    for name, tensor in lora.items():
        key = original_lora_key(name)
        if key is None:
            raise KeyError(f"not a LoRA tensor name: {name!r}")
        out[key] = tensor
    return out


def _require(tensors: Mapping[str, "torch.Tensor"], name: str, original: str, path: Path) -> "torch.Tensor":
    if name not in tensors:
        raise MissingKeyError("missing key in SALMONN checkpoint", path=path, key=original)
    return tensors[name]


def _connector_shape(t: Mapping[str, "torch.Tensor"], path: Path) -> ConnectorShape:
    query = _require(t, "query_tokens", "speech_query_tokens", path)
    if query.dim() != 3:
        raise ShapeMismatchError(
            f"expected shape (1, Q, H), got {tuple(query.shape)}", path=path, key="speech_query_tokens"
        )
    layer_ids = {int(m.group(1)) for k in t if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.", k))}
    if not layer_ids:
        raise MissingKeyError(
            "missing key in SALMONN checkpoint", path=path, key="speech_Qformer.bert.encoder.layer.0.*"
        )
    cross = sorted(
        {int(m.group(1)) for k in t if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.crossattention\.", k))}
    )
    if not cross:
        raise MissingKeyError(
            "no cross-attention layer in SALMONN checkpoint",
            path=path,
            key="speech_Qformer.bert.encoder.layer.0.crossattention.*",
        )
    every = cross[1] - cross[0] if len(cross) > 1 else max(layer_ids) + 1
    cross_key = f"qformer.encoder.layer.{cross[0]}.crossattention.attention.key.weight"
    ffn_key = "qformer.encoder.layer.0.intermediate_query.dense.weight"
    proj = _require(t, "proj.weight", "speech_llama_proj.weight", path)
    return ConnectorShape(
        query_tokens=query.shape[1],
        hidden=query.shape[2],
        layers=max(layer_ids) + 1,
        intermediate=_require(
            t, ffn_key, "speech_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight", path
        ).shape[0],
        encoder_width=_require(
            t, cross_key, f"speech_Qformer.bert.encoder.layer.{cross[0]}.crossattention.self.key.weight", path
        ).shape[1],
        cross_attention_every=every,
        speech_width=_require(t, "ln_speech.weight", "ln_speech.weight", path).shape[0],
        audio_width=_require(t, "ln_audio.weight", "ln_audio.weight", path).shape[0],
        llm_hidden=proj.shape[0],
    )


def _lora_shape(lora: Mapping[str, "torch.Tensor"], path: Path) -> LoraShape:
    if not lora:
        raise MissingKeyError(
            "no LoRA weights in SALMONN checkpoint", path=path, key="llama_model.*.lora_A.default.weight"
        )
    ranks = {v.shape[0] for k, v in lora.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ShapeMismatchError(f"LoRA A matrices disagree on the rank: {sorted(ranks)}", path=path)
    targets = sorted({m.group(3) for k in lora if (m := _LORA_PATTERN.match(LORA_FILE_PREFIX + k))})
    layers = {int(m.group(2)) for k in lora if (m := _LORA_PATTERN.match(LORA_FILE_PREFIX + k))}
    return LoraShape(rank=ranks.pop(), targets=tuple(targets), layers=max(layers) + 1)


def read_beats_checkpoint(path: str | Path) -> tuple[dict, dict[str, "torch.Tensor"]]:
    """Read a BEATs `.pt` (`{'cfg': dict, 'model': state_dict}`) as published by Microsoft, unchanged."""
    path = Path(path)
    raw = torch_load(path)
    if not isinstance(raw, Mapping) or "model" not in raw:
        raise CheckpointError("not a BEATs checkpoint: expected a dict with 'cfg' and 'model'", path=path)
    if not isinstance(raw.get("cfg"), Mapping):
        raise CheckpointError("BEATs checkpoint has no 'cfg' (its configuration dict)", path=path, key="cfg")
    return dict(raw["cfg"]), dict(raw["model"])



"""Reading the original checkpoint formats. Every key map lives here and nowhere else.

- SALMONN `.pth`: `{'model': state_dict, ...}` holding only what was trained (connector + LoRA), maybe
  optimizer state too. The original loads it with `strict=False`, so a wrong key silently does nothing; we
  map every key, account for every tensor and fail loudly on anything unexpected, missing or misshapen.
- BEATs `.pt`: `{'cfg': dict, 'model': state_dict}`.
- Whisper: a Hugging Face folder (safetensors or .bin, sharded or not); only encoder tensors are read.

Pickles are always read with `torch.load(weights_only=True)`: a pickle that tries to run code is refused.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, MissingKeyError, ShapeMismatchError, UnexpectedKeyError, UnsafeCheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

# -- SALMONN checkpoint key map: original prefix -> our prefix (SpeechConnector / PeftModel names) ----------
_CONNECTOR_RULES: tuple[tuple[str, str], ...] = (
    (r"^speech_query_tokens$", "query_tokens"),
    (r"^ln_speech\.", "ln_speech."),
    (r"^ln_audio\.", "ln_audio."),
    (r"^speech_Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (
        r"^speech_Qformer\.bert\.encoder\.layer\.(\d+)\.attention\.self\.",
        r"qformer.encoder.layer.\1.attention.attention.",
    ),
    (
        r"^speech_Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.self\.",
        r"qformer.encoder.layer.\1.crossattention.attention.",
    ),
    (r"^speech_Qformer\.bert\.encoder\.layer\.", "qformer.encoder.layer."),
    (r"^speech_llama_proj\.", "proj."),
)
_LORA_PATTERN = re.compile(
    r"^llama_model\.(base_model\.model\.model\.layers\.(\d+)\..+\.(\w+)\.lora_([AB])\.default\.weight)$"
)
# The inverse map, our prefix -> original prefix, for writing checkpoints the original (and we) can read. Rules are
# tried in order; the more specific Q-Former attention names come before the generic layer prefix.
_CONNECTOR_RULES_INVERSE: tuple[tuple[str, str], ...] = (
    (r"^query_tokens$", "speech_query_tokens"),
    (r"^ln_speech\.", "ln_speech."),
    (r"^ln_audio\.", "ln_audio."),
    (r"^qformer\.layernorm\.", "speech_Qformer.bert.embeddings.LayerNorm."),
    (
        r"^qformer\.encoder\.layer\.(\d+)\.attention\.attention\.",
        r"speech_Qformer.bert.encoder.layer.\1.attention.self.",
    ),
    (
        r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.attention\.",
        r"speech_Qformer.bert.encoder.layer.\1.crossattention.self.",
    ),
    (r"^qformer\.encoder\.layer\.", "speech_Qformer.bert.encoder.layer."),
    (r"^proj\.", "speech_llama_proj."),
)
_LORA_FILE_PREFIX = "llama_model."  # the original's attribute holding the peft-wrapped LLaMA
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


def torch_load(path: str | Path) -> object:
    """`torch.load` with `weights_only=True`, turning every failure into a CheckpointError naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", path=path)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and not _starts_like_a_pickle(path):
        raise CheckpointError("not a PyTorch checkpoint (neither a zip archive nor a pickle)", path=path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():
            raise UnsafeCheckpointError(
                "refusing to load: the file asks to run code or build objects that are not plain tensors", path=path
            ) from None
        raise CheckpointError("not a PyTorch checkpoint that can be read safely (weights only)", path=path) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"not a PyTorch checkpoint ({_first_line(exc)})", path=path) from None


def _starts_like_a_pickle(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(1) == b"\x80"  # PROTO opcode: every pickle of protocol 2 or later starts with it


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
        ours = _map_connector_key(key)
        if ours is None:
            raise UnexpectedKeyError("unexpected key in SALMONN checkpoint", path=path, key=key)
        connector[ours] = tensor
        source[ours] = key
    shape = _connector_shape(connector, path)
    return SalmonnCheckpoint(path, connector, lora, source, shape, _lora_shape(lora, path))


def original_connector_key(ours: str) -> str:
    """The key a SALMONN `.pth` uses for one of our SpeechConnector tensors (inverse of the reading map)."""
    for pattern, replacement in _CONNECTOR_RULES_INVERSE:
        if re.match(pattern, ours):
            return re.sub(pattern, replacement, ours, count=1)
    raise KeyError(f"no SALMONN checkpoint name for connector tensor {ours!r}")


def original_lora_key(peft_name: str) -> str | None:
    """The SALMONN `.pth` key of a peft LoRA tensor name (`base_model...lora_A.default.weight`); None if not LoRA."""
    key = _LORA_FILE_PREFIX + peft_name
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


def _map_connector_key(key: str) -> str | None:
    for pattern, replacement in _CONNECTOR_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    return None


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
    targets = sorted({m.group(3) for k in lora if (m := _LORA_PATTERN.match("llama_model." + k))})
    layers = {int(m.group(2)) for k in lora if (m := _LORA_PATTERN.match("llama_model." + k))}
    return LoraShape(rank=ranks.pop(), targets=tuple(targets), layers=max(layers) + 1)


def load_strict(
    module: "nn.Module",
    tensors: Mapping[str, "torch.Tensor"],
    *,
    path: Path,
    source_keys: Mapping[str, str] | None = None,
    only_prefix: str = "",
    assign: bool = False,
) -> None:
    """Copy `tensors` into `module`, requiring the key sets (under `only_prefix`) and every shape to match.

    Errors name the key as it is written in the file (`source_keys` maps our names back to the file's).
    `assign=True` adopts the tensors instead of copying (for modules built on the meta device).
    """
    import torch

    source_keys = source_keys or {}
    expected = {k: v for k, v in module.state_dict().items() if k.startswith(only_prefix)}
    for key in tensors:
        if key not in expected:
            raise UnexpectedKeyError("unexpected key in checkpoint", path=path, key=source_keys.get(key, key))
    for key, target in expected.items():
        if key not in tensors:
            raise MissingKeyError("missing key in checkpoint", path=path, key=source_keys.get(key, key))
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise ShapeMismatchError(
                f"shape {tuple(tensors[key].shape)} does not match the model's {tuple(target.shape)}",
                path=path,
                key=source_keys.get(key, key),
            )
    if assign:
        converted = {k: tensors[k].to(dtype=v.dtype) for k, v in expected.items()}
        module.load_state_dict(converted, strict=True, assign=True)
        return
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(dtype=target.dtype))


def read_beats_checkpoint(path: str | Path) -> tuple[dict, dict[str, "torch.Tensor"]]:
    """Read a BEATs `.pt` (`{'cfg': dict, 'model': state_dict}`) as published by Microsoft, unchanged."""
    path = Path(path)
    raw = torch_load(path)
    if not isinstance(raw, Mapping) or "model" not in raw:
        raise CheckpointError("not a BEATs checkpoint: expected a dict with 'cfg' and 'model'", path=path)
    if not isinstance(raw.get("cfg"), Mapping):
        raise CheckpointError("BEATs checkpoint has no 'cfg' (its configuration dict)", path=path, key="cfg")
    return dict(raw["cfg"]), dict(raw["model"])


_WHISPER_ENCODER_PREFIXES = ("model.encoder.", "encoder.")  # WhisperForConditionalGeneration / WhisperModel


def read_whisper_encoder(folder: str | Path) -> dict[str, "torch.Tensor"]:
    """Read only the encoder tensors of a Hugging Face Whisper folder (decoder weights are never loaded).

    Handles `model.safetensors` and `pytorch_model.bin`, single or sharded (with their index files).
    """
    weights = WeightFolder(folder)
    tensors = {}
    for key in weights.keys():
        for prefix in _WHISPER_ENCODER_PREFIXES:
            if key.startswith(prefix):
                tensors[key[len(prefix) :]] = weights.get(key)
                break
    weights.close()
    if not tensors:
        raise CheckpointError("no Whisper encoder weights found (keys 'model.encoder.*' or 'encoder.*')", path=folder)
    return tensors


_INDEXES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


class WeightFolder:
    """The tensors of a Hugging Face model folder by key, read one at a time, with at most one shard open.

    Safetensors and `pytorch_model.bin` (read memory-mapped, weights only), single or sharded with their index.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._open: tuple[Path, object] | None = None
        self.opened = 0  # how many times a shard was opened (re-reading a legacy pickle is costly)
        self._file_of = self._key_files()

    def keys(self) -> list[str]:
        """Every key, shard by shard, so reading them in this order opens each shard once."""
        return sorted(self._file_of, key=lambda key: self._file_of[key].name)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """A copy of the tensor `key` (in `dtype` if given) in memory of its own, not a view of the mapped file."""
        file = self._file_of[key]
        if self._open is None or self._open[0] != file:
            self._open = None  # let the previous shard's mapping go first
            self._open = (file, _open_weights(file))
            self.opened += 1
        handle = self._open[1]
        tensor = handle.get_tensor(key) if file.suffix == ".safetensors" else handle[key]
        wanted = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        return tensor.to(dtype=wanted, copy=True)

    def close(self) -> None:
        self._open = None

    def unmap(self) -> None:
        """Let go of the open shard if it is memory-mapped, so the pages read from it stop counting as resident;
        reopening it costs only its header. A legacy (non-zip) pickle is in memory whole and stays open."""
        if self._open is not None and _memory_mapped(self._open[0]):
            self._open = None

    def _key_files(self) -> dict[str, Path]:
        """Which file holds each key: from the shard index, or from the one file (kept open: it is read next)."""
        folder = self.folder
        if not folder.is_dir():
            raise CheckpointError("model folder not found", path=folder)
        for index_name, single in _INDEXES:
            index = folder / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (ValueError, KeyError, TypeError):
                    raise CheckpointError("the shard index has no readable 'weight_map'", path=index) from None
                return {key: folder / name for key, name in weight_map.items()}
            if (folder / single).is_file():
                self._open = (folder / single, _open_weights(folder / single))
                self.opened += 1
                return dict.fromkeys(self._open[1].keys(), folder / single)
        raise CheckpointError("no model.safetensors or pytorch_model.bin in folder", path=folder)


def _open_weights(file: Path):
    if not file.is_file():
        raise CheckpointError("weight shard named by the index is missing", path=file)
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"not a readable safetensors file ({exc})", path=file) from None
    state = torch_load(file)
    if not isinstance(state, Mapping):
        raise CheckpointError("expected a state dict", path=file)
    return state


def _memory_mapped(file: Path) -> bool:
    return file.suffix == ".safetensors" or zipfile.is_zipfile(file)  # torch_load maps zip archives

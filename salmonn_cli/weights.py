"""Reading weights safely: pickles as weights only, Hugging Face folders tensor by tensor, strict loading.

Pickles are always read with `torch.load(weights_only=True)`: a pickle that tries to run code is refused. Every
failure is a CheckpointError naming the file (and the key, where there is one). The formats built on these
(SALMONN's `.pth`, BEATs' `.pt`, a Whisper folder) are read in checkpoint.py and model/whisper.py.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, MissingKeyError, ShapeMismatchError, UnexpectedKeyError, UnsafeCheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn


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

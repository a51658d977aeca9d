"""A run's resumable state on disk: one `state.pt` written atomically (temporary file, fsync, rename), so a run
killed at any moment leaves either the previous complete state or the new one, never half of one.

Everything in it loads with `torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import write_atomically
from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch

STATE_FILE = "state.pt"
STATE_FORMAT = 1


def capture_rng() -> dict:
    """The state of every random generator a step may draw from: torch (CPU and CUDA), numpy, python."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)],
        "python": _to_lists(random.getstate()),
    }


def restore_rng(state: dict) -> None:
    """Put every generator back where `capture_rng` found it."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def save_state(out_dir: Path, state: dict) -> Path:
    """Write the training state to `out_dir/state.pt` atomically; returns its path."""
    import torch

    path = Path(out_dir) / STATE_FILE
    write_atomically(path, lambda tmp: torch.save({"format": STATE_FORMAT, **state}, tmp))
    return path


def load_state(out_dir: Path) -> dict:
    """The saved training state of a run in `out_dir` (CheckpointError when it is not one of ours)."""
    from ..weights import torch_load

    path = Path(out_dir) / STATE_FILE
    state = torch_load(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError("not a training state written by `salmonn finetune`", path=path)
    return state


def trainable_tensors(named: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Detached CPU copies of the trained parameters (what a state and a checkpoint hold)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in named.items()}

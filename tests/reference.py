"""Reference-parity cases: the folder format of shared/reference (see its README.md).

`SALMONN_REFERENCE_DIR` selects another folder of cases in the same format; by default the copy kept in
tests/data/reference is used, so the suite stands alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

DEFAULT_REFERENCE_DIR = Path(__file__).parent / "data" / "reference"


def reference_dir() -> Path:
    return Path(os.environ.get("SALMONN_REFERENCE_DIR") or DEFAULT_REFERENCE_DIR)


@dataclass(frozen=True)
class Case:
    """One reference case: its JSON description, arrays and component folder."""

    root: Path
    json_path: Path

    @cached_property
    def meta(self) -> dict:
        return json.loads(self.json_path.read_text(encoding="utf-8"))

    @property
    def name(self) -> str:
        return self.meta["name"]

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.root / self.meta["npz"]) as npz:
            return {key: npz[key] for key in npz.files}

    @property
    def audio_path(self) -> Path:
        return self.root / self.meta["audio"]

    @property
    def components(self) -> Path:
        return self.root / self.meta["components"]

    @property
    def vocab_size(self) -> int:
        """SentencePiece vocabulary size V (the reference logits carry one extra [PAD] column)."""
        return self.meta["results"]["llm_vocab_size_with_pad"] - 1


def case_paths() -> list[Path]:
    """Every case JSON of the reference folder; an empty folder is an error, not an empty test run."""
    paths = sorted((reference_dir() / "cases").glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"no reference cases under {reference_dir() / 'cases'}")
    return paths


def load_case(json_path: Path) -> Case:
    return Case(root=json_path.parent.parent, json_path=json_path)


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float, what: str) -> float:
    """Compare in float32 with an absolute tolerance scaled by the reference's magnitude (at least 1).

    Returns the worst absolute difference so callers can report it.
    """
    actual = np.asarray(actual, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    worst = float(np.abs(actual - expected).max(initial=0.0))
    assert worst <= atol * scale, f"{what}: max |diff| {worst:.3g} > {atol:g} x scale {scale:.3g}"
    return worst

"""Fixtures shared by the test modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_tiny(out: Path, *args: str) -> Path:
    """Tiny random components in the original formats (plus model.toml), by scripts/make_tiny_model.py."""
    script = ROOT / "scripts" / "make_tiny_model.py"
    subprocess.run([sys.executable, str(script), str(out), *args], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """One tiny model for the whole session (read-only: tests that change components make their own)."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")

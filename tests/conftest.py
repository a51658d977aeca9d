"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# compiled decode steps go to one folder of this machine's temporary files, shared by the test processes (xdist
# workers, the CLI's subprocesses): never into the user's own cache, and compiled once per shape per machine
COMPILED = Path(tempfile.gettempdir()) / f"salmonn-tests-compile-{os.getuid()}"
os.environ.setdefault("SALMONN_COMPILE_CACHE", str(COMPILED))


def make_tiny(out: Path, *args: str) -> Path:
    """Tiny random components in the original formats (plus model.toml), by scripts/make_tiny_model.py."""
    script = ROOT / "scripts" / "make_tiny_model.py"
    subprocess.run([sys.executable, str(script), str(out), *args], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """One tiny model for the whole session (read-only: tests that change components make their own)."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")

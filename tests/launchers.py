"""Helpers for tests that run real launchers (torchrun): finding the worker processes it started."""

from __future__ import annotations

import subprocess
from pathlib import Path


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """The launcher's worker processes by rank (read from their environments)."""
    pids = {}
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        ranks = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")]
        if ranks:
            pids[int(ranks[0])] = int(child)
    return pids

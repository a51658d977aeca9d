"""The `salmonn` entry point: instant help (no heavy imports), version, usage errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

HEAVY = ["torch", "transformers", "peft", "bitsandbytes", "sounddevice", "numpy", "soundfile"]


def run(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("salmonn")
    assert exe, "the salmonn console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


COMMANDS = [
    "ask",
    "transcribe",
    "translate",
    "caption",
    "story",
    "chat",
    "live",
    "finetune",
    "download",
    "models",
    "doctor",
    "bench",
]


@pytest.mark.parametrize("args", [["--help"], *[[command, "--help"] for command in COMMANDS]], ids=lambda a: a[0])
def test_help_imports_nothing_heavy(args):
    probe = (
        "import sys, json\n"
        "from salmonn_cli.cli.app import main\n"
        f"code = main({args!r})\n"
        f"print(json.dumps({{'code': code, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "loaded": []}


def test_importing_the_package_imports_no_torch():
    probe = "import sys, salmonn_cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_help_and_version_through_the_real_entry_point():
    help_run = run("--help")
    assert help_run.returncode == 0 and "SALMONN" in help_run.stdout
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("salmonn ")


def test_unknown_command_is_a_usage_error():
    result = run("no-such-command")
    assert result.returncode == 2
    assert "No such command" in result.stderr and "Traceback" not in result.stderr

"""Bad inputs through the real `salmonn` command: each is refused with its exit code and one line, no traceback,
no decoder chatter, and (for a run with nothing good to do) before the model loads.

A new case is one row of CASES: how to make the input in a temporary folder, the command's arguments after the
model's, the exit code and a piece of the one line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf

from .conftest import make_tiny


def _bytes(name: str, data: bytes) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        (folder / name).write_bytes(data)
        return str(folder / name)

    return make


def _tone(name: str, seconds: float = 1.0) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        t = np.arange(int(16000 * seconds)) / 16000
        sf.write(folder / name, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
        return str(folder / name)

    return make


def _symlink_loop(folder: Path) -> str:
    (folder / "a.wav").symlink_to(folder / "b.wav")
    (folder / "b.wav").symlink_to(folder / "a.wav")
    return str(folder / "a.wav")


def _dangling(folder: Path) -> str:
    (folder / "gone.wav").symlink_to(folder / "never-there.wav")
    return str(folder / "gone.wav")


def _no_frames(folder: Path) -> str:
    sf.write(folder / "none.wav", np.zeros(0, np.float32), 16000)
    return str(folder / "none.wav")


def _manifest(lines: list[str], *clips: Callable[[Path], str]) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        for clip in clips:
            clip(folder)
        (folder / "list.txt").write_text("".join(line + "\n" for line in lines))
        return ["--manifest", str(folder / "list.txt")]

    return make


def _empty_folder(folder: Path) -> str:
    (folder / "empty").mkdir()
    return str(folder / "empty")


RANDOM = np.random.default_rng(0).integers(0, 256, 6000, dtype=np.uint8).tobytes()


@dataclass(frozen=True)
class Case:
    """`make(folder)` -> the input argument(s); `args`: what follows them; `code` and `says`: what must come out."""

    name: str
    make: Callable[[Path], str | list[str]]
    code: int
    says: str
    args: tuple[str, ...] = ("What is this?",)
    command: str = "ask"


CASES = [
    Case("missing file", lambda f: str(f / "nothing.wav"), 3, "audio file not found"),
    Case("symlink loop", _symlink_loop, 3, "its symbolic links loop"),
    Case("dangling symlink", _dangling, 3, "audio file not found"),
    Case("random bytes named .mp3", _bytes("noise.mp3", RANDOM), 3, "not an audio format we can read"),
    Case("random bytes named .wav", _bytes("noise.wav", RANDOM), 3, "not an audio format we can read"),
    Case("text named .wav", _bytes("notes.wav", b"hello, this is text\n" * 20), 3, "not an audio format we can read"),
    Case("text named .flac", _bytes("notes.flac", b"fLaC but not really" * 10), 3, "not an audio format we can read"),
    Case("random bytes named .ogg", _bytes("noise.ogg", RANDOM), 3, "not an audio format we can read"),
    Case("random bytes named .m4a", _bytes("noise.m4a", RANDOM), 3, "not an audio format we can read"),
    Case("0-byte .wav", _bytes("empty.wav", b""), 3, "empty (0 bytes)"),
    Case("a wav header with no samples", _no_frames, 3, "has no samples"),
    Case("a device file", lambda f: "/dev/zero", 3, "is a device or socket, not an audio file"),
    Case("an empty folder", _empty_folder, 2, "no audio files in"),
    Case("0-byte manifest", _manifest([]), 2, "no input files", args=(), command="caption"),
    Case("manifest: a missing file", _manifest(["gone.wav"]), 3, "audio file not found", args=(), command="caption"),
    Case("manifest: a bad JSON line", _manifest(['{"audio": "a.wav", ']), 2, "not valid JSON", args=(),
         command="caption"),  # fmt: skip
    Case("manifest: JSON without audio", _manifest(['{"instruction": "hi"}']), 2, 'needs an "audio" path', args=(),
         command="caption"),  # fmt: skip
    Case("a negative --lora-scale", _tone("ok.wav"), 2, "greater than or equal to 0",
         args=("What is this?", "--lora-scale", "-1")),  # fmt: skip
    Case("-o pointing at a file", _tone("ok.wav"), 2, "is not a folder: give a folder",
         args=("What is this?", "-o", "/dev/null")),  # fmt: skip
]


def _model_file(text_of: Callable[[str], str]) -> Callable[[Path, Path], Path]:
    """A model file made from the tiny one's text, next to it (its components are found relative to it)."""

    def make(tiny_toml: Path, folder: Path) -> Path:
        path = tiny_toml.parent / f"edited-{folder.name}.toml"
        path.write_text(text_of(tiny_toml.read_text()))
        return path

    return make


MODEL_FILE_CASES = [
    ("an unknown key in the model file", _model_file(lambda t: t + 'colour = "blue"\n'), 4, "unknown field 'colour'"),
    ("a model file that is not TOML", _model_file(lambda t: "not toml [[["), 4, "model file is not valid TOML"),
    ("a missing model file", lambda tiny_toml, folder: folder / "none.toml", 2, "none.toml does not exist"),
]


@pytest.fixture(scope="module")
def model_toml(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("bad-inputs") / "model") / "model.toml"


def salmonn(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("salmonn")
    assert exe, "the salmonn console script is not installed (pip install -e .)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_bad_input_is_one_line_and_its_exit_code_before_the_model_loads(case, model_toml, tmp_path):
    made = case.make(tmp_path)
    inputs = made if isinstance(made, list) else [made]
    done = salmonn(case.command, *inputs, *case.args, "--model", str(model_toml))
    assert done.returncode == case.code, done.stderr[-2000:]
    assert case.says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Note:" not in done.stderr, done.stderr
    assert "Loaded" not in done.stderr, "the model was loaded for nothing"
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(("name", "make", "code", "says"), MODEL_FILE_CASES, ids=[c[0] for c in MODEL_FILE_CASES])
def test_a_bad_model_file_is_one_line_and_its_exit_code(name, make, code, says, model_toml, tmp_path):
    clip = _tone("ok.wav")(tmp_path)
    done = salmonn("ask", clip, "What is this?", "--model", str(make(model_toml, tmp_path)))
    assert done.returncode == code, done.stderr[-2000:]
    assert says in done.stderr and "Traceback" not in done.stderr and "Loaded" not in done.stderr, done.stderr
    assert len([line for line in done.stderr.splitlines() if "error" in line.lower()]) == 1, done.stderr


def test_with_many_files_the_bad_ones_are_reported_first_and_the_rest_run(model_toml, tmp_path):
    good = _tone("good.wav")(tmp_path)
    bad = _bytes("bad.mp3", RANDOM)(tmp_path)
    done = salmonn("caption", bad, good, str(tmp_path / "missing.wav"), "--model", str(model_toml),
                   "--max-new-tokens", "4", "-f", "json")  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]  # the first failure's code
    lines = done.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if "salmonn: error:" in line]
    loaded = next(i for i, line in enumerate(lines) if line.startswith("Loaded"))
    assert len(errors) == 2 and max(errors) < loaded, done.stderr  # both reported before the model loads
    assert "not an audio format we can read" in lines[errors[0]] and "audio file not found" in lines[errors[1]]
    assert [Path(line.split('"file": "')[1].split('"')[0]).name for line in done.stdout.splitlines()] == ["good.wav"]
    assert "1 done" in done.stderr and "2 failed" in done.stderr, done.stderr

"""Bad inputs through the real `salmonn` command: each is refused with its exit code and one line, no traceback,
no decoder chatter, and (for a run with nothing good to do) before the model loads.

A new case is one row of CASES: how to make the input in a temporary folder, the command's arguments, the exit
code and a piece of the one line; optionally an edit of the model file, a Hub that answers HTML or nothing, a
command to run under (a full disk), or a signal to send while the model loads. The command runs without root's
override of file permissions, so the permission rows mean the same as root (as in CI) and as a user.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf

from .conftest import make_tiny
from .signals import default_sigint


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


def _fifo(name: str, data: bytes) -> Callable[[Path], str]:
    """A named pipe whose writer (a thread here) sends `data` once the command opens it, then closes it."""

    def make(folder: Path) -> str:
        path = folder / name
        os.mkfifo(path)
        threading.Thread(target=path.write_bytes, args=(data,), daemon=True).start()
        return str(path)

    return make


def _locked(make_inner: Callable[[Path], str]) -> Callable[[Path], str]:
    """What `make_inner` makes, with no permissions at all (the command runs without root's overrides)."""

    def make(folder: Path) -> str:
        path = Path(make_inner(folder))
        path.chmod(0)
        return str(path)

    return make


def _folder_with(*parts: str) -> Callable[[Path], str]:
    """A folder `top` with the given files (`name.wav`: a tone, `name.txt`: text) and sub-folders (`name/`)."""

    def make(folder: Path) -> str:
        top = folder / "top"
        top.mkdir()
        for part in parts:
            if part.endswith("/"):
                (top / part).mkdir()
            elif part.endswith(".txt"):
                (top / part).write_text("not audio\n")
            else:
                _tone(part)(top)
        return str(top)

    return make


def _locked_subfolder(folder: Path) -> list[str]:
    top = Path(_folder_with("locked/")(folder))
    _tone("inside.wav")(top / "locked")
    (top / "locked").chmod(0)
    return [str(top), "--recursive"]


def _read_only_folder(folder: Path) -> list[str]:
    (folder / "ro").mkdir(mode=0o555)
    return [_tone("ok.wav")(folder), "-o", str(folder / "ro")]


def _edit(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, f"the tiny model file has no {old!r}"
        return text.replace(old, new)

    return edit


def _hub_checkpoint(**fields: str) -> Callable[[str], str]:
    entry = ", ".join(['repo = "org/salmonn"', 'file = "salmonn.pth"', *(f'{k} = "{v}"' for k, v in fields.items())])
    return _edit('checkpoint = { path = "salmonn.pth" }', f"checkpoint = {{ sources = [{{ {entry} }}] }}")


def _full_disk(folder: Path) -> list[str]:
    """The command in a private mount namespace where `full` is a tmpfs of two pages, filled to the last byte."""
    (folder / "full").mkdir()
    fill = 'mount -t tmpfs -o size=8k tmpfs "$0" && head -c 8192 /dev/zero > "$0/fill" 2>/dev/null; exec "$@"'
    return ["unshare", "--mount", "sh", "-c", fill, str(folder / "full")]


@dataclass(frozen=True)
class Case:
    """One bad input and what must come out.

    `make(folder)` -> the input argument(s), made in a temporary folder; `args`: what follows them; `command`: the
    subcommand; `code` and `says`: the exit code and a piece of the one line. `model`: an edit of the tiny model
    file's text (the case runs with the edited copy); `wrap(folder)`: a command line the command runs under;
    `hub`: HF_ENDPOINT is a server answering every request with an HTML page (a captive portal, a proxy's error);
    `stop_at`: send SIGINT/SIGTERM (by `code`) once stderr shows this, leaving no output file in `-o out`.
    """

    name: str
    make: Callable[[Path], str | list[str]]
    code: int
    says: str
    args: tuple[str, ...] = ("What is this?",)
    command: str = "ask"
    model: Callable[[str], str] | None = None
    wrap: Callable[[Path], list[str]] | None = None
    hub: str | None = None
    stop_at: str | None = None


def _no_input(folder: Path) -> list[str]:
    return []


OK = _tone("ok.wav")
CAPTION = dict(args=(), command="caption")
LIVE = dict(args=(), command="live")
MANIFEST = dict(args=(), command="caption")
CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens there

# one row per line where it fits: the table reads as a table
# fmt: off
CASES = [
    # -- an audio file that is not one
    Case("missing file", lambda f: str(f / "nothing.wav"), 3, "audio file not found"),
    Case("symlink loop", _symlink_loop, 3, "its symbolic links loop"),
    Case("dangling symlink", _dangling, 3, "audio file not found"),
    Case("a path through a file", lambda f: OK(f) + "/inner.wav", 3, "inner.wav: not a directory"),
    Case("random bytes named .mp3", _bytes("noise.mp3", RANDOM), 3, "not an audio format we can read"),
    Case("random bytes named .wav", _bytes("noise.wav", RANDOM), 3, "not an audio format we can read"),
    Case("text named .wav", _bytes("notes.wav", b"hello, this is text\n" * 20), 3, "not an audio format we can read"),
    Case("text named .flac", _bytes("notes.flac", b"fLaC but not really" * 10), 3, "not an audio format we can read"),
    Case("random bytes named .ogg", _bytes("noise.ogg", RANDOM), 3, "not an audio format we can read"),
    Case("random bytes named .m4a", _bytes("noise.m4a", RANDOM), 3, "not an audio format we can read"),
    Case("random bytes, no suffix", _bytes("noise", RANDOM), 3, "not an audio format we can read"),
    Case("a wav header cut short", _bytes("cut.wav", b"RIFF\x24\x00\x00\x00WAVEfmt "), 3, "cannot decode"),
    Case("0-byte .wav", _bytes("empty.wav", b""), 3, "empty (0 bytes)"),
    Case("a wav header with no samples", _no_frames, 3, "has no samples"),
    Case("a device file", lambda f: "/dev/zero", 3, "is a device or socket, not an audio file"),
    Case("a FIFO of random bytes", _fifo("stream.mp3", RANDOM), 3, "not an audio format we can read"),
    Case("a FIFO closed at once", _fifo("stream.wav", b""), 3, "empty (0 bytes)"),
    Case("a file without read permission", _locked(OK), 3, "permission denied"),
    Case("a folder of nothing given to ask", lambda f: str(f), 2, "no audio files in"),
    # -- folders
    Case("an empty folder", _empty_folder, 2, "no audio files in", **CAPTION),
    Case("a folder of non-audio files", _folder_with("notes.txt"), 2, "no audio files in", **CAPTION),
    Case("a --glob matching nothing", lambda f: [_folder_with("a.wav")(f), "--glob", "*.flac"], 2,
         "pattern *.flac", **CAPTION),
    Case("audio only below, without -r", lambda f: _folder_with("sub/")(f), 2, "no audio files in", **CAPTION),
    Case("an unreadable folder", _locked(_folder_with("a.wav")), 3, "cannot read folder", **CAPTION),
    Case("an unreadable folder in a folder run", _locked_subfolder, 3, "locked: permission denied", **CAPTION),
    # -- manifests
    Case("0-byte manifest", _manifest([]), 2, "no input files", **MANIFEST),
    Case("manifest: only comments", _manifest(["# nothing", ""]), 2, "no input files", **MANIFEST),
    Case("manifest: a missing file", _manifest(["gone.wav"]), 3, "audio file not found", **MANIFEST),
    Case("manifest: a bad JSON line", _manifest(['{"audio": "a.wav", ']), 2, "not valid JSON", **MANIFEST),
    Case("manifest: JSON without audio", _manifest(['{"instruction": "hi"}']), 2, 'needs an "audio" path',
         **MANIFEST),
    Case("manifest: an empty instruction", _manifest(['{"audio": "ok.wav", "instruction": " "}'], OK), 2,
         '"instruction" must be a non-empty string', **MANIFEST),
    Case("manifest: a line naming a folder", _manifest(["."]), 3, "is a folder, not an audio file", **MANIFEST),
    Case("manifest not found", lambda f: ["--manifest", str(f / "none.txt")], 3, "manifest not found", **MANIFEST),
    Case("manifest not UTF-8", lambda f: ["--manifest", _bytes("list.txt", b"\xff\xfe\x00a.wav")(f)], 2,
         "is not UTF-8 text", **MANIFEST),
    Case("manifest without read permission", lambda f: ["--manifest", _locked(_bytes("l.txt", b"a.wav\n"))(f)], 3,
         "cannot read manifest", **MANIFEST),
    # -- options
    Case("a negative --lora-scale", OK, 2, "greater than or equal to 0", args=("What is this?", "--lora-scale", "-1")),
    Case("--beams 0", OK, 2, "'--beams'", args=("What is this?", "--beams", "0")),
    Case("an empty question", OK, 2, "the question is empty", args=("",)),
    Case("an unknown --format", OK, 2, "--format must be one of", args=("What is this?", "-f", "xml")),
    Case("an empty --instruction", OK, 2, "--instruction is empty", args=("--instruction", " "), command="caption"),
    Case("--device cuda without a GPU", OK, 5, "has no usable CUDA GPU", args=("What is this?", "--device", "cuda")),
    Case("torchao on a CPU", OK, 2, "use --quant-backend quanto",
         args=("What is this?", "--device", "cpu", "--quant", "4bit", "--quant-backend", "torchao")),
    # -- outputs
    Case("-o pointing at a file", OK, 2, "is not a folder: give a folder", args=("What is this?", "-o", "/dev/null")),
    Case("-o below a file", lambda f: [OK(f), "-o", OK(f) + "/out"], 7, "cannot write to", **CAPTION),
    Case("-o a read-only folder", _read_only_folder, 7, "permission denied", **CAPTION),
    Case("-o on a full disk", lambda f: [OK(f), "-o", str(f / "full")], 7, "no space left on device", wrap=_full_disk,
         **CAPTION),
    # -- live
    Case("live --input missing", lambda f: ["--input", str(f / "none.wav")], 3, "audio file not found", **LIVE),
    Case("live --input a folder", lambda f: ["--input", str(f)], 3, "is a folder, not an audio file", **LIVE),
    Case("live --input random bytes", lambda f: ["--input", _bytes("n.mp3", RANDOM)(f)], 3,
         "not an audio format we can read", **LIVE),
    Case("live --save in a missing folder", lambda f: ["--input", OK(f), "--save", str(f / "no" / "t.txt")], 2,
         "does not exist", **LIVE),
    Case("live --save in a read-only folder", lambda f: ["--input", OK(f), "--save", _read_only_folder(f)[2] + "/t"],
         7, "permission denied", **LIVE),
    # -- model files
    Case("an unknown key in the model file", OK, 4, "unknown field 'colour'", model=lambda t: t + 'colour = "blue"\n'),
    Case("a model file that is not TOML", OK, 4, "model file is not valid TOML", model=lambda t: "not toml [[["),
    Case("a malformed sha256", OK, 4, "must be 64 lowercase hexadecimal characters",
         model=_hub_checkpoint(sha256="abc")),
    Case("a repo id without an owner", OK, 4, "repo", model=_edit('{ path = "salmonn.pth" }',
         '{ sources = [{ repo = "salmonn", file = "x.pth" }] }')),
    Case("an unknown repo_type", OK, 4, "repo_type", model=_hub_checkpoint(repo_type="bucket")),
    Case("a component left out", OK, 4, "beats", model=_edit('beats = { path = "beats.pt" }\n', "")),
    Case("a component's file missing", OK, 4, "beats", model=_edit('"beats.pt"', '"gone.pt"')),
    Case("a missing model file", OK, 2, "none.toml does not exist", args=("What is this?", "--model", "/no/none.toml")),
    Case("a template without {}", OK, 4, "prompt_template", model=_edit('"USER: {}\\nASSISTANT:"', '"USER: hi"')),
    Case("a mode that cannot fit anywhere", OK, 6, "needs ~", args=("What is this?", "--quant", "none"),
         model=_edit("llm_params = 227136", "llm_params = 1_000_000_000_000")),
    # -- downloads
    Case("a Hub answer that is not JSON", _no_input, 4, "a malformed answer from the Hub", args=(), command="download",
         model=_hub_checkpoint(), hub="portal"),
    Case("a Hub that cannot be reached", _no_input, 4, "cannot reach the Hub", args=(), command="download",
         model=_hub_checkpoint(), hub=CLOSED_PORT),
    # -- stopped while the model loads: no traceback, no partial output
    Case("Ctrl-C during model loading", lambda f: [OK(f), "-o", str(f / "out")], 130, "salmonn: interrupted",
         stop_at="no CUDA GPU found", **CAPTION),
    Case("SIGTERM during model loading", lambda f: [OK(f), "-o", str(f / "out")], 143, "salmonn: terminated",
         stop_at="no CUDA GPU found", **CAPTION),
]
# fmt: on


class _Portal(BaseHTTPRequestHandler):
    """Every request answered 200 with an HTML page, as a captive portal or a proxy's error page does."""

    def do_GET(self) -> None:
        body = b"<html><body>Please sign in to the network</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def portal() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Portal)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def model_toml(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("bad-inputs") / "model") / "model.toml"


_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2


def _as_a_user_at_a_terminal() -> None:
    """`preexec_fn`: SIGINT as under a terminal, and for root no override of file permissions (dropped from the
    capability bounding set before exec), so that a file without read permission is one for the command too."""
    default_sigint()
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed: the permission cases need it")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **extra}


def salmonn(*args: str, wrap: list[str] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("salmonn")
    assert exe, "the salmonn console script is not installed (pip install -e .)"
    return subprocess.run([*wrap, exe, *args], capture_output=True, text=True, timeout=120, env=env or _env(),
                          preexec_fn=_as_a_user_at_a_terminal)  # fmt: skip


def _stopped_at(command: list[str], stop_at: str, sig: signal.Signals, env: dict) -> tuple[int, str]:
    """(exit code, stderr) of `command`, sent `sig` once its stderr shows `stop_at`."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            preexec_fn=_as_a_user_at_a_terminal)  # fmt: skip
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if stop_at in line:
                proc.send_signal(sig)
                break
        seen.extend(proc.stderr)
        return proc.wait(timeout=60), "".join(seen)
    finally:
        proc.kill()


def _message_lines(stderr: str) -> list[str]:
    """What the command said, less our own warnings and the parser's usage hint around its error line."""
    skip = ("Usage:", "Try '", "salmonn: warning:")
    progress = re.compile(r"\w+: fetching ")  # a download's progress, one line per component
    lines = [line for line in stderr.splitlines() if line.strip()]
    return [line for line in lines if not line.startswith(skip) and not progress.match(line)]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_bad_input_is_one_line_and_its_exit_code_before_the_model_loads(case, model_toml, portal, tmp_path):
    made = case.make(tmp_path)
    inputs = made if isinstance(made, list) else [made]
    model = model_toml
    if case.model is not None:  # next to the tiny one: its components are found relative to it
        model = model_toml.parent / f"edited-{tmp_path.name}.toml"
        model.write_text(case.model(model_toml.read_text()))
    env = _env()
    if case.hub is not None:
        endpoint = portal if case.hub == "portal" else case.hub
        env.update(HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint)
    command = [*(case.wrap(tmp_path) if case.wrap else []), shutil.which("salmonn"), case.command, *inputs,
               "--model", str(model), *case.args]  # fmt: skip
    if case.stop_at is None:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env,
                              preexec_fn=_as_a_user_at_a_terminal)  # fmt: skip
        code, stderr = done.returncode, done.stderr
        assert done.stdout == ""
    else:
        code, stderr = _stopped_at(command, case.stop_at, {130: signal.SIGINT, 143: signal.SIGTERM}[case.code], env)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "a partial output file"
    assert code == case.code, stderr[-2000:]
    assert "Traceback" not in stderr and "Note:" not in stderr, stderr
    assert "Loaded" not in stderr, "the model was loaded for nothing"
    said = _message_lines(stderr)
    assert len(said) == 1 and case.says in said[0], stderr


def test_with_many_files_the_bad_ones_are_reported_first_and_the_rest_run(model_toml, tmp_path):
    good = _tone("good.wav")(tmp_path)
    bad = _bytes("bad.mp3", RANDOM)(tmp_path)
    _tone("clip.wav")(tmp_path)
    piped = _fifo("piped.wav", (tmp_path / "clip.wav").read_bytes())(tmp_path)  # read once, before the load
    done = salmonn("caption", bad, good, str(tmp_path / "missing.wav"), piped, "--model", str(model_toml),
                   "--max-new-tokens", "4", "-f", "json")  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]  # the first failure's code
    lines = done.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if "salmonn: error:" in line]
    loaded = next(i for i, line in enumerate(lines) if line.startswith("Loaded"))
    assert len(errors) == 2 and max(errors) < loaded, done.stderr  # both reported before the model loads
    assert "not an audio format we can read" in lines[errors[0]] and "audio file not found" in lines[errors[1]]
    answered = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(record["file"]).name for record in answered] == ["good.wav", "piped.wav"]  # named as given
    assert answered[0]["text"] == answered[1]["text"] and answered[1]["audio_seconds"] == 1.0  # the same tone
    assert "2 done" in done.stderr and "2 failed" in done.stderr, done.stderr

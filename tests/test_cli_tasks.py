"""Every task command through the real `salmonn` entry point, on tiny components (no network, no GPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import salmonn_cli

from .signals import default_sigint, terminal_sigint

FAST = ["--device", "cpu", "--quant", "none", "--beams", "1", "--max-new-tokens", "4"]


def salmonn(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("salmonn")
    assert exe, "the salmonn console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, input=stdin, timeout=300, env=env)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    t = np.arange(32_000) / 16_000
    sounds = {
        "tone": 0.3 * np.sin(2 * np.pi * 440 * t),
        "chirp": 0.3 * np.sin(2 * np.pi * (200 + 800 * t) * t),
        "silence": np.zeros(24_000),
    }
    paths = {}
    for name, wave in sounds.items():
        paths[name] = folder / f"{name}.wav"
        sf.write(paths[name], wave.astype(np.float32), 16_000)
    return paths


def model_args(tiny: Path) -> list[str]:
    return ["--model", str(tiny / "model.toml"), *FAST]


@lru_cache(maxsize=1)
def api_model(tiny: Path):
    """The same model through the Python API, with the settings of the tiny model file."""
    from salmonn_cli.model_file import load_model_spec

    settings = load_model_spec(str(tiny / "model.toml")).settings
    return salmonn_cli.load_model(
        tiny / "whisper",
        tiny / "beats.pt",
        tiny / "llm",
        tiny / "salmonn.pth",
        qformer_heads=settings.qformer_heads,
        lora_scale=settings.lora_scale,
    )


def api_answer(tiny: Path, clip: Path, instruction: str, lora_scale: float | None = None) -> str:
    model = api_model(tiny)
    result = model.generate(
        salmonn_cli.load_audio(clip), instruction, max_new_tokens=4, num_beams=1, lora_scale=lora_scale
    )
    return result.text.strip()


def test_ask_json_record_matches_the_python_api(tiny, clips):
    run = salmonn("ask", str(clips["tone"]), "What do you hear?", *model_args(tiny), "-f", "json")
    assert run.returncode == 0, run.stderr
    [record] = json_lines(run.stdout)
    assert record["task"] == "ask" and record["instruction"] == "What do you hear?"
    assert record["file"] == str(clips["tone"]) and record["audio_seconds"] == pytest.approx(2.0)
    assert record["quantization"] == "none" and record["lora_scale"] == 4.0
    assert record["decode"]["num_beams"] == 1 and record["decode"]["max_new_tokens"] == 4
    assert 1 <= record["token_count"] <= 4 and record["timings"]["total_s"] > 0
    assert record["model"] and record["checkpoint"] == "salmonn.pth" and record["checkpoint_sha256"] is None
    assert record["text"] == api_answer(tiny, clips["tone"], "What do you hear?")


def test_transcribe_text_output(tiny, clips):
    run = salmonn("transcribe", str(clips["tone"]), *model_args(tiny))
    assert run.returncode == 0, run.stderr
    expected = api_answer(tiny, clips["tone"], "Recognize the speech and give me the transcription.")
    assert run.stdout.strip() == expected


@pytest.mark.parametrize(
    "args, instruction",
    [
        (["transcribe", "--lang", "de"], "Hören Sie sich die Rede an und schreiben Sie ihren Inhalt auf."),
        (["translate", "--to", "ja"], "Listen to the speech and translate it into Japanese."),
        (["translate", "--to", "Klingon"], "Listen to the speech and translate it into Klingon."),
        (["caption"], "Please describe the audio."),
        (["caption", "--music"], "Listen to this music clip and describe the music."),
        (["transcribe", "--instruction", "  Count the beeps. "], "Count the beeps."),
    ],
)
def test_task_instructions(tiny, clips, args, instruction, monkeypatch):
    """The instruction each command line gives, through the entry point in this process, with the model's load
    and run replaced (the record's `instruction` is what the run is given: test_ask_json_record_... and the
    story test check that end to end, model and all)."""
    from salmonn_cli.cli import app, tasks

    given = []
    monkeypatch.setattr(tasks, "open_model", lambda choice, **how: "the model")
    monkeypatch.setattr(tasks, "run_task", lambda loaded, task, items, *rest, **kw: given.append(task.instruction) or 0)
    assert app.main([*args, str(clips["chirp"]), *model_args(tiny), "-f", "json"]) == 0
    assert given == [instruction]


def test_story_uses_lora_scale_two_unless_told(tiny, clips):
    run = salmonn("story", str(clips["tone"]), *model_args(tiny), "-f", "json")
    assert run.returncode == 0, run.stderr
    record = json_lines(run.stdout)[0]
    assert record["lora_scale"] == 2.0 and record["task"] == "story"
    assert record["text"] == api_answer(tiny, clips["tone"], record["instruction"], lora_scale=2.0)
    told = salmonn("story", str(clips["tone"]), *model_args(tiny), "--lora-scale", "0", "-f", "json")
    assert json_lines(told.stdout)[0]["lora_scale"] == 0.0


def test_many_files_go_on_after_a_failure(tiny, clips, tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....WAVEfmt not really")
    run = salmonn("caption", str(clips["tone"]), str(corrupt), str(clips["chirp"]), *model_args(tiny), "-f", "json")
    assert run.returncode == 3
    assert [r["file"] for r in json_lines(run.stdout)] == [str(clips["tone"]), str(clips["chirp"])]
    assert "not an audio format we can read" in run.stderr and "3 inputs: 2 done, 1 failed" in run.stderr
    assert run.stderr.index("corrupt.wav") < run.stderr.index("Loaded")  # refused before the model loaded
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(("sig", "code", "word"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")],
                         ids=["ctrl-c", "sigterm"])  # fmt: skip
def test_a_stopped_many_file_run_prints_what_it_did_and_what_it_did_not(tiny, clips, tmp_path, sig, code, word):
    import signal

    files = []
    for i in range(6):
        files.append(tmp_path / f"clip{i}.wav")
        shutil.copy(clips["chirp" if i % 2 else "tone"], files[-1])
    # 60 tokens per file (about a second each here): the stop comes while files remain
    command = [shutil.which("salmonn"), "caption", *map(str, files), *model_args(tiny), "--max-new-tokens", "60",
               "-f", "json"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)  # fmt: skip
    try:
        first = proc.stdout.readline()  # the first result: the run is under way
        assert first.strip(), proc.stderr.read()
        proc.send_signal(getattr(signal, sig))
        rest, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    done = json_lines(first + rest)
    assert [r["file"] for r in done] == [str(f) for f in files[: len(done)]]  # each result whole, in order
    assert f"6 inputs: {len(done)} done, {6 - len(done)} not run (stopped)" in stderr, stderr
    assert stderr.rstrip().endswith(f"salmonn: {word}") and "Traceback" not in stderr


def test_silence_is_reported_not_answered(tiny, clips):
    run = salmonn("caption", str(clips["silence"]), *model_args(tiny), "-f", "json")
    assert run.returncode == 0, run.stderr
    record = json_lines(run.stdout)[0]
    assert record["skipped"] == "silence" and record["text"] == "" and record["token_count"] == 0
    assert "no audible content" in run.stderr
    forced = salmonn("caption", str(clips["silence"]), *model_args(tiny), "--force", "-f", "json")
    assert json_lines(forced.stdout)[0]["skipped"] is None and json_lines(forced.stdout)[0]["token_count"] >= 1


def test_chat_reuses_audio_and_switches_files(tiny, clips):
    script = f"What is this?\n/file {clips['chirp']}\nAnd now?\n/file /nonexistent.wav\n/quit\nnot reached\n"
    run = salmonn("chat", str(clips["tone"]), *model_args(tiny), stdin=script)
    assert run.returncode == 0, run.stderr
    answers = run.stdout.splitlines()
    assert answers == [api_answer(tiny, clips["tone"], "What is this?"), api_answer(tiny, clips["chirp"], "And now?")]
    assert "audio file not found" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["ask", "{tone}", "hi", "-f", "yaml"], 2, "--format must be one of"),
        (["transcribe", "{tone}", "--lang", "xx"], 2, "no transcription prompt for language 'xx'"),
        (["ask", "/no/such.wav", "hi"], 3, "audio file not found"),
        (["ask", "{tone}", "hi", "--model", "/no/such/model.toml"], 2, "model"),
        (["ask", "{tone}", "hi", "--device", "cuda"], 5, "no usable CUDA GPU"),
        (["ask", "{tone}", "hi", "--quant", "3bit"], 2, "--quant must be"),
    ],
)
def test_user_errors_are_one_line_with_their_exit_code(tiny, clips, args, code, message):
    args = [a.format(tone=clips["tone"]) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny / "model.toml")]
    run = salmonn(*args)
    assert run.returncode == code, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr


def test_corrupt_checkpoint_exits_4(tiny, clips, tmp_path):
    bad = tmp_path / "salmonn.pth"
    bad.write_bytes(b"not a checkpoint")
    run = salmonn("ask", str(clips["tone"]), "hi", *model_args(tiny), "--checkpoint", str(bad))
    assert run.returncode == 4
    assert "not a PyTorch checkpoint" in run.stderr and "Traceback" not in run.stderr


def test_ctrl_c_exits_130_without_a_traceback(tiny, clips):
    """SIGINT to the real process while it waits for a chat question (the model is loaded by then)."""
    import signal

    proc = subprocess.Popen(
        [shutil.which("salmonn"), "chat", str(clips["tone"]), *model_args(tiny)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        seen = []
        for line in proc.stderr:  # bounded: the process prints "Loaded ..." once, or ends
            seen.append(line)
            if line.startswith("Loaded"):
                break
        assert seen and seen[-1].startswith("Loaded"), "".join(seen)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in rest and "interrupted" in rest


def test_out_of_gpu_memory_is_exit_6_with_a_hint():
    import torch

    from salmonn_cli.cli.runner import LoadedModel, oom_hint
    from salmonn_cli.errors import OutOfMemoryError

    loaded = LoadedModel(object(), "salmonn-13b", "salmonn_v1.pth", "none", "cuda:0")
    with pytest.raises(OutOfMemoryError, match="--quant 4bit") as err, oom_hint(loaded):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert err.value.exit_code == 6


def test_a_normal_ask_prints_the_answer_and_no_line_but_our_own(tiny, clips):
    model = ["--model", str(tiny / "model.toml"), "--max-new-tokens", "3"]  # the defaults otherwise: 4 beams
    run = salmonn("ask", str(clips["tone"]), "What do you hear?", *model)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    # ours: the CPU warning and the load line; a dependency's warning (transformers' deprecated cache keyword) is not
    ours = ("salmonn: ", "Loaded ")
    foreign = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith(ours)]
    assert foreign == []


@pytest.mark.parametrize(("sig", "word"), [("SIGINT", "interrupted"), ("SIGTERM", "terminated")])
def test_a_stop_during_a_deferred_step_takes_effect_right_after_it(sig, word):
    import os
    import signal

    from salmonn_cli import stop

    steps = []
    previous = signal.signal(signal.SIGTERM, stop._raise_interrupt)  # as `salmonn` runs: SIGTERM is Ctrl-C
    try:
        with terminal_sigint(), pytest.raises(KeyboardInterrupt):
            with stop.stop_deferred():
                os.kill(os.getpid(), getattr(signal, sig))  # delivered at once, to this (the main) thread
                steps.append("after the signal")  # the step goes on to its end
            steps.append("after the step")  # never: the stop takes effect here
        assert steps == ["after the signal"] and stop.interrupted_exit()[1] == word
        assert signal.getsignal(signal.SIGTERM) is stop._raise_interrupt  # the handlers are back
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop._terminated.clear()


def test_compile_on_answers_as_the_api_and_says_its_start_cost_once(tiny, clips, tmp_path):
    """`--compile on` on a CPU (where `auto` does not compile): the float32 answer is the eager one (the API's),
    the first run on a machine says what compiling cost, a later run finds the step compiled and says nothing; a bad
    value is refused before the model loads."""
    import os

    env = {**os.environ, "SALMONN_COMPILE_CACHE": str(tmp_path / "compiled")}
    ask = ["ask", str(clips["chirp"]), "What is it?", *model_args(tiny), "--compile"]
    first, again = (salmonn(*ask, "on", "-f", "json", env=env) for _ in range(2))
    for run in (first, again):
        assert run.returncode == 0, run.stderr
        assert json_lines(run.stdout)[0]["text"] == api_answer(tiny, clips["chirp"], "What is it?")
    said = [line for line in first.stderr.splitlines() if line.startswith("compiled the decode step in ")]
    assert len(said) == 1 and str(tmp_path / "compiled") in said[0], first.stderr
    assert len(list((tmp_path / "compiled" / "steps").glob("*.json"))) == 1  # one row, one step shape
    assert any((tmp_path / "compiled" / "inductor").iterdir())  # inductor's compiled code, kept there too
    assert [line for line in again.stderr.splitlines() if not line.startswith("Loaded ")] == []
    bad = salmonn(*ask, "maybe", env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "salmonn: error: --compile must be one of auto, on, off; got 'maybe'"

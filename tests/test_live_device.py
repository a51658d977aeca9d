"""`salmonn live` on a real capture device: a PulseAudio null sink whose monitor is the default source.

PortAudio opens it through ALSA's default device, which the `pulse` plugin (libasound2-plugins) routes to the
running PulseAudio server; `paplay` speaks known utterances into the sink. This is the whole path a user's
microphone takes below PortAudio, with a server of its own per test module (its sockets in a temporary folder,
nothing of the machine's changed). CI installs pulseaudio, pulseaudio-utils and libasound2-plugins; a missing one
fails here with the package to install, it is never a reason to skip.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.signals import default_sigint
from tests.speech import SENTENCES, make_speech_file

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--quant", "none", "--beams", "1", "--max-new-tokens", "4"]
TOLERANCE_S = 0.3  # as for --input: the segmenter's edges against the audible speech
PLAYBACK_DELAY_S = 2.0  # most a paplay start may lag the capture start (the offset is measured, then checked)
SINK = "salmonn_test_mic"


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed: the real-device live tests need it (apt-get install {package})")
    return path


@pytest.fixture(scope="module")
def pulse_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a private PulseAudio server with one null sink, its monitor the default source."""
    daemon = _tool("pulseaudio", "pulseaudio")
    pactl = _tool("pactl", "pulseaudio-utils")
    home = tmp_path_factory.mktemp("pulse")
    runtime = home / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "XDG_CONFIG_HOME": str(home / "config"),
           "PULSE_STATE_PATH": str(home / "state"), "PULSE_SERVER": f"unix:{runtime}/pulse/native"}  # fmt: skip
    env.pop("PULSE_SINK", None), env.pop("PULSE_SOURCE", None)
    # --daemonize returns once the server is ready (the parent waits for the child's start-up to finish)
    subprocess.run(
        [daemon, "--daemonize=yes", "-n", "--exit-idle-time=-1", "--disallow-exit", "--log-target=stderr",
         "--load=module-native-protocol-unix", f"--load=module-null-sink sink_name={SINK} rate=48000 channels=2",
         "--load=module-always-sink"],
        env=env, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    try:
        subprocess.run([pactl, "set-default-sink", SINK], env=env, check=True, capture_output=True, timeout=30)
        subprocess.run([pactl, "set-default-source", f"{SINK}.monitor"], env=env, check=True, capture_output=True,
                       timeout=30)  # fmt: skip
        yield env
    finally:
        subprocess.run([daemon, "--kill"], env=env, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def model_args(tiny: Path) -> list[str]:
    return ["--model", str(tiny / "model.toml"), *FAST]


def _lines(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


def _next_line(lines: queue.Queue, proc: subprocess.Popen, what: str, timeout: float = 120) -> str:
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"salmonn live printed nothing for {timeout:g} s while waiting for {what}") from None
    if line is None:
        raise AssertionError(f"salmonn live ended (exit {proc.wait(timeout=30)}) before {what}")
    return line


def test_list_devices_shows_the_pulseaudio_input_as_default(pulse_env):
    run = subprocess.run([shutil.which("salmonn"), "live", "--list-devices"], capture_output=True, text=True,
                         timeout=60, env=pulse_env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    marked = [line for line in run.stdout.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and "ALSA" in marked[0], run.stdout  # the default input: ALSA's default, i.e. pulse


STOPS = [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]


@pytest.mark.parametrize(("sig", "code", "word"), STOPS, ids=["ctrl-c", "sigterm"])
def test_speech_played_into_the_device_gives_one_result_per_utterance_with_true_times(
    pulse_env, model_args, tmp_path, sig, code, word
):
    speech, transcript, recording = tmp_path / "three.wav", tmp_path / "live.txt", tmp_path / "heard.wav"
    truth = make_speech_file(speech, list(SENTENCES[:3]), [1.2, 1.0], lead_s=0.8, tail_s=0.5)
    command = [shutil.which("salmonn"), "live", *model_args, "-f", "json", "--save", str(transcript),
               "--save-audio", str(recording)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=pulse_env, preexec_fn=default_sigint)  # fmt: skip
    errors: queue.Queue = queue.Queue()
    out: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, errors), daemon=True).start()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    stderr: list[str] = []
    try:
        while "Ctrl-C to stop" not in (line := _next_line(errors, proc, "it started listening")):
            stderr.append(line)
        stderr.append(line)
        assert "from input device" in line and "(default" in line, line  # ALSA's default: the pulse plugin
        subprocess.run([_tool("paplay", "pulseaudio-utils"), str(speech)], env=pulse_env, check=True, timeout=60)
        results = [json.loads(_next_line(out, proc, f"result {i}")) for i in range(len(truth))]
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
    finally:
        proc.kill()
    summary = json.loads(_next_line(out, proc, "the summary", timeout=10))["summary"]
    assert out.get(timeout=10) is None
    while (line := errors.get(timeout=10)) is not None:
        stderr.append(line)
    text = "".join(stderr)
    assert f"salmonn: {word}" in text and "Traceback" not in text, text

    # the device's clock is the sample clock: times match the played file's, shifted by when paplay began
    offset = results[0]["start"] - truth[0][0]
    print(f"paplay began {offset:.3f} s after capture; results {[(r['start'], r['end']) for r in results]}")
    assert 0.0 <= offset + TOLERANCE_S and offset <= PLAYBACK_DELAY_S, (offset, results)
    assert [r["index"] for r in results] == [0, 1, 2]
    for result, (start, end) in zip(results, truth, strict=True):
        assert abs(result["start"] - offset - start) <= TOLERANCE_S, (result, start, offset)
        assert abs(result["end"] - offset - end) <= TOLERANCE_S, (result, end, offset)
        assert result["latency_s"] > 0 and result["text"]
    assert summary["interrupted"] and summary["captured"] == summary["processed"] == 3

    # the files are whole: one transcript line per spoken result, and every captured sample recorded
    spoken = [" ".join(r["text"].split()) for r in results if r["text"].strip()]
    assert [line.split("] ", 1)[1] for line in transcript.read_text().splitlines()] == spoken
    heard, rate = sf.read(recording, dtype="float32")
    assert rate == 16000 and heard.shape[0] / rate == pytest.approx(summary["audio_s"], abs=0.05)
    played = sf.read(speech, dtype="float32")[0]
    first = round((truth[0][0] + offset) * rate)
    level = float(np.sqrt(np.mean(np.square(heard[first : first + rate]))))
    assert level > 0.1 * float(np.sqrt(np.mean(np.square(played[round(truth[0][0] * rate) :][:rate])))), level

"""`salmonn live`: the capture path, the streaming segmenter, the live loop, and the command end to end.

The command runs in a subprocess on tiny components (scripts/make_tiny_model.py) with `--input FILE` (this
machine has no sound card); the microphone path runs in-process against a fake sounddevice module, and against
the real PortAudio for device listing and the missing-device error. Nothing waits with a sleep: subprocess
output is read until a condition holds, with timeouts.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from salmonn_cli.audio import SAMPLE_RATE
from salmonn_cli.errors import DependencyError, UsageError
from salmonn_cli.live.loop import LiveConfig, LiveHooks, run_live
from salmonn_cli.live.segmenter import UtteranceSegmenter, WindowSegmenter
from salmonn_cli.live.source import Block, CaptureSource, FileSource, MicSource, pick_settings, resolve_device
from tests.signals import default_sigint
from tests.speech import SENTENCES, make_speech_file

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--quant", "none", "--beams", "1", "--max-new-tokens", "4"]
TOLERANCE_S = 0.3


def live_command(*args: str) -> list[str]:
    """The `salmonn live ...` command line, through the real entry point."""
    exe = shutil.which("salmonn")
    assert exe, "the salmonn console script is not installed (pip install -e .)"
    return [exe, "live", *args]


def live(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(live_command(*args), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def records(stdout: str) -> tuple[list[dict], dict]:
    """(result records, the summary) from `-f json` output."""
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert lines and "summary" in lines[-1], stdout
    return lines[:-1], lines[-1]["summary"]


def balanced(summary: dict) -> bool:
    parts = ("processed", "skipped", "dropped", "abandoned", "failed")
    return summary["captured"] == sum(summary[k] for k in parts)


def spoken_lines(results: list[dict]) -> list[str]:
    """What the transcript holds: one line per non-empty result, its whitespace collapsed."""
    return [" ".join(r["text"].split()) for r in results if r["text"].strip()]


@pytest.fixture(scope="module")
def model_args(tiny: Path) -> list[str]:
    return ["--model", str(tiny / "model.toml"), *FAST]


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[Path, list[tuple[float, float]]]:
    path = tmp_path_factory.mktemp("speech") / "four.wav"
    return path, make_speech_file(path, list(SENTENCES[:4]), [1.0, 1.4, 0.9], lead_s=0.7, tail_s=1.0)


# -- the command, end to end ----------------------------------------------------------------------------------
def test_file_input_gives_one_result_per_utterance_with_true_times(model_args, speech, tmp_path):
    path, truth = speech
    transcript, recording = tmp_path / "out.txt", tmp_path / "heard.wav"
    run = live("--input", str(path), "--fast", *model_args, "-f", "json", "--save", str(transcript),
               "--save-audio", str(recording))  # fmt: skip
    assert run.returncode == 0, run.stderr
    results, summary = records(run.stdout)
    assert [r["index"] for r in results] == list(range(len(truth)))  # one per utterance, in order
    for result, (start, end) in zip(results, truth, strict=True):
        assert abs(result["start"] - start) <= TOLERANCE_S and abs(result["end"] - end) <= TOLERANCE_S, result
        assert result["latency_s"] > 0 and result["compute_s"] > 0 and result["text"]
        assert result["task"] == "transcribe" and result["instruction"].startswith("Recognize the speech")
    assert summary["captured"] == summary["processed"] == len(truth) and balanced(summary)
    assert summary["latency_median_s"] > 0 and summary["rtf"] > 0 and not summary["interrupted"]
    lines = transcript.read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == spoken_lines(results)
    assert sf.info(str(recording)).frames == sf.info(str(path)).frames  # every captured sample, readable wav
    assert "4 segments captured: 4 answered" in run.stderr


def test_slow_model_drops_the_oldest_segments_visibly_and_counts_add_up(model_args, tmp_path):
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    path = tmp_path / "tone.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SAMPLE_RATE)
    # 300-token answers about quarter-second windows at real-time pace: the model is several times too slow
    # (a drop needs one answer to take longer than two windows: 0.5 s; it takes ~0.8 s on an idle 2-core CPU)
    slow = [*model_args, "--max-new-tokens", "300"]
    run = live("--input", str(path), "--task", "caption", "--window", "0.25", "--max-queue", "1", *slow, "-f", "json")
    assert run.returncode == 0, run.stderr
    results, summary = records(run.stdout)
    assert "dropped the oldest waiting segment" in run.stderr
    assert summary["dropped"] >= 1 and summary["captured"] == 8 and balanced(summary)
    assert summary["processed"] == len(results) >= 1 and summary["rtf"] > 1
    assert summary["capture_s"] == pytest.approx(2.0, abs=0.2)  # real-time pace, whatever the model does


def _lines(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


STOPS = [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]


@pytest.mark.parametrize(("sig", "code", "word"), STOPS, ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_with_its_code_and_leaves_a_complete_transcript(model_args, tmp_path, sig, code, word):
    path, transcript = tmp_path / "six.wav", tmp_path / "live.txt"
    make_speech_file(path, list(SENTENCES[4:10]), [0.8] * 5)
    command = live_command("--input", str(path), *model_args, "-f", "json", "--save", str(transcript))
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=default_sigint
    )
    out: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    try:
        first = out.get(timeout=120)  # the first result: the model is loaded and the pipeline runs
        assert first is not None, proc.stderr.read()
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
    finally:
        proc.kill()
    rest = []
    while (line := out.get(timeout=10)) is not None:
        rest.append(line)
    results, summary = records(first + "".join(rest))
    assert summary["interrupted"] and balanced(summary) and summary["captured"] < 6
    stderr = proc.stderr.read()
    assert f"salmonn: {word}" in stderr and "Traceback" not in stderr
    spoken = spoken_lines(results)
    lines = transcript.read_text().splitlines(keepends=True)
    assert len(lines) == len(spoken) and all(
        re.fullmatch(r"\[\d\d:\d\d\.\d - \d\d:\d\d\.\d\] .+\n", line) for line in lines
    )
    assert [line.split("] ", 1)[1].rstrip("\n") for line in lines] == spoken


def test_list_devices_works_with_portaudio():
    run = live("--list-devices", timeout=60)
    assert run.returncode == 0, run.stderr
    assert "no audio input devices found" in run.stdout or re.search(r"^[* ]\s+\d+  ", run.stdout, re.M)


def test_a_device_that_does_not_exist_is_a_clear_error(model_args):
    run = live("--capture-device", "99999", *model_args, timeout=60)
    assert run.returncode == 5  # DependencyError: hardware the request needs is not there
    assert "no input device" in run.stderr and "--list-devices" in run.stderr and "Traceback" not in run.stderr


def test_missing_portaudio_says_what_to_install(tmp_path):
    (tmp_path / "sounddevice.py").write_text('raise OSError("PortAudio library not found")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    run = live("--list-devices", env=env, timeout=60)
    assert run.returncode == 5
    assert "apt-get install libportaudio2 (Debian/Ubuntu), brew install portaudio (macOS)" in run.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fast"], "--fast goes with --input"),
        (["--task", "ask"], "needs a standing --question"),
        (["--question", "baby?"], "--question goes with --task ask"),
        (["--input", "x.wav", "--save-audio", "x.mp3"], "use a .wav or .flac file"),
    ],
)
def test_usage_errors(args, message):
    run = live(*args, timeout=60)
    assert run.returncode == 2 and message in run.stderr


def test_help_imports_nothing_heavy():
    probe = (
        "import sys, json\nfrom salmonn_cli.cli import app as a, live\nlive.register(a.app)\n"
        "code = a.main(['live', '--help'])\n"
        "heavy = ['torch', 'transformers', 'sounddevice', 'numpy', 'soundfile']\n"
        "print(json.dumps({'code': code, 'loaded': [m for m in heavy if m in sys.modules]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"code": 0, "loaded": []}


# -- capture sources ------------------------------------------------------------------------------------------
def read_all(source) -> list[Block]:
    """Every block until the source ends (the resampler's tail included)."""
    blocks = []
    while (block := source.read(0.5)) is not None or not source.ended:
        if block is not None:
            blocks.append(block)
    return blocks


def test_file_source_keeps_real_time_pace_without_drift():
    source = FileSource(np.zeros(3 * SAMPLE_RATE, np.float32))
    source.start()
    blocks = read_all(source)
    elapsed = blocks[-1].captured_at - source.started_at
    assert 2.95 <= elapsed <= 3.2
    lag = [b.captured_at - (source.started_at + b.end / SAMPLE_RATE) for b in blocks]
    assert min(lag) >= -0.005 and max(lag) < 0.2  # each block at t0 + its end time: late by little, never early
    assert sum(b.samples.shape[0] for b in blocks) == 3 * SAMPLE_RATE


def test_a_48_khz_stereo_producer_is_resampled_and_overflow_keeps_the_clock():
    source = CaptureSource(48_000, live=True, ring_s=0.2, block_s=0.05)  # room for 4 blocks of 50 ms
    t = np.arange(int(1.2 * 48_000)) / 48_000
    stereo = np.stack([np.sin(2 * np.pi * 1000 * t)] * 2, axis=1).astype(np.float32)  # (T, 2): 1.2 s of 1 kHz
    blocks = [stereo[first : first + 2400] for first in range(0, stereo.shape[0], 2400)]  # 24 blocks
    for block in blocks[:20]:  # nobody reading: 4 fit, 16 are lost
        source._push(block, time.monotonic())
    heard = [source.read(0.0) for _ in range(4)]
    for block in blocks[20:]:
        source._push(block, time.monotonic())
    source._finish()
    heard += read_all(source)
    assert source.overflow_s == pytest.approx(0.8)
    audio = np.concatenate([b.samples for b in heard])
    assert audio.shape[0] == pytest.approx(1.2 * SAMPLE_RATE, abs=2)  # lost blocks became silence: 1.2 s stays
    for lo, hi in ((0.01, 0.19), (1.01, 1.19)):  # what arrived: a 1 kHz tone at 16 kHz
        piece = audio[int(lo * SAMPLE_RATE) : int(hi * SAMPLE_RATE)]
        peak = np.argmax(np.abs(np.fft.rfft(piece))) * SAMPLE_RATE / piece.shape[0]
        assert peak == pytest.approx(1000, abs=10) and np.abs(piece).max() > 0.9
    assert np.abs(audio[int(0.25 * SAMPLE_RATE) : int(0.95 * SAMPLE_RATE)]).max() < 0.01


class FakeSoundDevice:
    """Just enough of sounddevice: one 48 kHz stereo USB mic (no 16 kHz), a busy one, and a stream whose
    start() plays `seconds` of noise through the callback from a thread."""

    PortAudioError = type("PortAudioError", (Exception,), {})

    def __init__(self, seconds: float = 1.0) -> None:
        self.default = SimpleNamespace(device=(1, 0))
        self.seconds = seconds
        self.played = threading.Event()  # the stream delivered all its audio
        self.devices = [
            {"name": "HDMI out", "hostapi": 0, "max_input_channels": 0, "default_samplerate": 48_000.0},
            {"name": "USB Mic", "hostapi": 0, "max_input_channels": 2, "default_samplerate": 48_000.0},
            {"name": "Webcam Mic", "hostapi": 0, "max_input_channels": 1, "default_samplerate": 16_000.0},
        ]

    def query_devices(self):
        return self.devices

    def query_hostapis(self):
        return [{"name": "ALSA"}]

    def check_input_settings(self, device, samplerate, channels, dtype):
        if device == 2:
            raise self.PortAudioError("Device unavailable", -9985)
        if samplerate != 48_000 or channels != 2:
            raise self.PortAudioError("Invalid sample rate")

    def InputStream(self, **kwargs):  # noqa: N802  (sounddevice's name)
        fake = self

        class Stream:
            active = False

            def start(self):
                self.active = True
                self.player = threading.Thread(target=self.play, daemon=True)
                self.player.start()

            def play(self):
                noise = np.random.default_rng(0).normal(0, 0.1, (int(48_000 * fake.seconds), 2)).astype(np.float32)
                for first in range(0, noise.shape[0], kwargs["blocksize"]):
                    if not self.active:
                        return
                    kwargs["callback"](noise[first : first + kwargs["blocksize"]], 0, None,
                                       SimpleNamespace(input_overflow=False))  # fmt: skip
                fake.played.set()

            def stop(self):  # like PortAudio: no callback runs after stop() returns
                self.active = False
                self.player.join()

            def close(self):
                pass

        return Stream()


def test_device_choice_by_index_name_default_and_the_errors():
    sd = FakeSoundDevice()
    assert resolve_device(sd, None).name == "USB Mic"  # the default input
    assert resolve_device(sd, "2").name == "Webcam Mic" and resolve_device(sd, "usb").index == 1
    with pytest.raises(UsageError, match="matches several inputs"):
        resolve_device(sd, "mic")
    with pytest.raises(DependencyError, match="no input device '0'"):  # an output, not an input
        resolve_device(sd, "0")
    assert pick_settings(sd, resolve_device(sd, "usb")) == (48_000, 2)  # no 16 kHz mono: native, mixed down
    with pytest.raises(DependencyError, match=r"input device 2 \(Webcam Mic\) is busy"):
        pick_settings(sd, resolve_device(sd, "webcam"))
    sd.devices = sd.devices[:1]
    with pytest.raises(DependencyError, match="no input device: PortAudio finds no microphone"):
        resolve_device(sd, None)


def test_list_devices_prints_inputs_only_and_marks_the_default(monkeypatch, capsys):
    from salmonn_cli.cli.live import list_devices
    from salmonn_cli.live import source

    monkeypatch.setattr(source, "import_sounddevice", FakeSoundDevice)
    list_devices()
    assert capsys.readouterr().out.splitlines() == [
        "*   1  USB Mic  (ALSA, 2 ch, 48000 Hz)",
        "    2  Webcam Mic  (ALSA, 1 ch, 16000 Hz)",
    ]


def test_microphone_path_resamples_and_feeds_the_loop():
    sd = FakeSoundDevice(seconds=1.0)
    device = resolve_device(sd, None)
    mic = MicSource(sd, device, *pick_settings(sd, device))
    heard = []

    def stop_after_one_second(samples):
        heard.append(samples.shape[0])
        if len(heard) == 20:  # Ctrl-C once, as a user would, after the fake mic has played its 1 s
            assert sd.played.wait(10)
            raise KeyboardInterrupt

    summary = run_live(mic, WindowSegmenter(0.5), lambda audio: f"{audio.shape[0]}", LiveConfig(drain=True),
                       LiveHooks(on_result=lambda r: None, on_audio=stop_after_one_second))  # fmt: skip
    assert summary.interrupted and summary.processed == summary.captured >= 2 and summary.balanced()
    assert summary.audio_s == pytest.approx(1.0, abs=0.05)


# -- segmentation ---------------------------------------------------------------------------------------------
def blocks_of(waveform: np.ndarray, size: int = 512) -> list[Block]:
    return [Block(waveform[i : i + size], i, float(i)) for i in range(0, waveform.shape[0], size)]


def test_endless_speech_is_cut_at_30_s_and_windows_at_their_length():
    loud = np.full(35 * SAMPLE_RATE, 0.5, np.float32)
    energy = UtteranceSegmenter(probability=lambda frame: float(np.abs(frame).mean() > 0.1))
    segments = [s for b in blocks_of(loud) for s in energy.feed(b)] + energy.flush()
    assert [round(s.end - s.start, 3) for s in segments] == [29.984, 5.016]  # whole 32 ms frames, <= 30 s
    assert all(s.audio.shape[0] <= 30 * SAMPLE_RATE for s in segments)
    windows = WindowSegmenter(1.0)
    cut = [s for b in blocks_of(np.zeros(int(2.3 * SAMPLE_RATE), np.float32)) for s in windows.feed(b)]
    cut += windows.flush()
    assert [(s.start, round(s.end, 3)) for s in cut] == [(0.0, 1.0), (1.0, 2.0), (2.0, 2.3)]
    assert cut[0].captured_at == pytest.approx(15872.0)  # the block holding sample 16000 arrived "at" 15872


# -- the loop -------------------------------------------------------------------------------------------------
def noise(seconds: float) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 0.1, int(seconds * SAMPLE_RATE)).astype(np.float32)


def test_a_busy_worker_makes_the_loop_drop_the_oldest_segment():
    release, warnings, results = threading.Event(), [], []

    class Segmenter(WindowSegmenter):
        def flush(self):
            out = super().flush()
            release.set()  # capture is over: let the blocked model go
            return out

    def blocked(audio):
        release.wait(30)
        return "ok"

    hooks = LiveHooks(on_result=results.append, on_warning=warnings.append)
    summary = run_live(FileSource(noise(1.5)), Segmenter(0.5), blocked, LiveConfig(max_queue=1), hooks)
    assert summary.captured == 3 and summary.dropped >= 1 and summary.balanced()
    assert len(warnings) == summary.dropped and "slower than real time" in warnings[0]
    assert len(results) == summary.processed


@pytest.mark.parametrize("drain", [False, True])
def test_ctrl_c_abandons_or_drains_and_the_counts_add_up(drain):
    release, results = threading.Event(), []
    fed = []

    def interrupt_at_1_6_s(samples):
        fed.append(samples.shape[0])
        if len(fed) == 50:  # Ctrl-C once, at 50 * 32 ms = 1.6 s
            raise KeyboardInterrupt

    def answer(audio):
        if not drain:
            release.wait(30)  # in flight when Ctrl-C comes
        return "ok"

    hooks = LiveHooks(on_result=results.append, on_audio=interrupt_at_1_6_s)
    summary = run_live(FileSource(noise(2.0), fast=True), WindowSegmenter(0.5), answer, LiveConfig(drain=drain),
                       hooks)  # fmt: skip
    release.set()
    assert summary.interrupted and summary.balanced()
    if drain:  # everything captured was answered, the rest of the capture buffer included
        assert summary.captured == summary.processed == len(results) == 4
    else:
        assert summary.abandoned == summary.captured == 3 and summary.processed == 0 and results == []

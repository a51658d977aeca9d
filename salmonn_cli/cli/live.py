"""`salmonn live`: the microphone (or `--input FILE` at real-time pace), heard as it happens.

Utterances (transcribe, ask) are cut by silero-vad at the end of speech; `caption` (and `ask --window S`) cut
fixed windows. A worker answers each segment while capture goes on; results print live with their times,
latency and real-time factor. Heavy imports (numpy, torch, sounddevice) happen inside the command only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..atomic import check_writable
from ..errors import EXIT_INTERRUPTED, UsageError
from ..window import SAMPLE_RATE, WINDOW_SECONDS
from .commands import DECODE_OPTIONS, MODEL_OPTIONS, decode_choice, model_choice, with_options
from .options import DecodeChoice
from .runner import Task, oom_hint, open_model, stderr, warn

LIVE_PANEL = "Live"
TASKS = ("transcribe", "caption", "ask")
CAPTION_WINDOW_S = 10.0  # caption windows unless --window says otherwise


def _clock(seconds: float) -> str:
    """mm:ss.s since capture start."""
    minutes, secs = divmod(max(0.0, seconds), 60)
    return f"{int(minutes):02d}:{secs:04.1f}"


class _Outputs:
    """Where results go: the live display (rich text or one JSON object per line), the --save transcript
    (each result appended as one whole line and flushed) and the --save-audio recording (written as it is
    captured into FILE.part, renamed to FILE when closed)."""

    def __init__(self, fmt: str, task: Task, save: Path | None, save_audio: Path | None) -> None:
        from rich.console import Console

        self.fmt, self.task = fmt, task
        self.console = Console(highlight=False, soft_wrap=True)  # stdout, looked up at print time
        self.transcript = None if save is None else open(save, "w", encoding="utf-8")  # noqa: SIM115
        self.save_json = save is not None and save.suffix.lower() in (".json", ".jsonl")
        self.audio_path, self.recording = save_audio, None
        if save_audio is not None:
            import soundfile as sf

            kind = (save_audio.suffix.lstrip(".") or "wav").upper()
            self.recording = sf.SoundFile(_part(save_audio), "w", SAMPLE_RATE, 1, subtype="PCM_16", format=kind)

    def record(self, result) -> dict:
        return {"index": result.index, "start": round(result.start, 3), "end": round(result.end, 3),
                "text": result.text, "latency_s": round(result.latency_s, 3), "compute_s": round(result.compute_s, 3),
                "rtf": round(result.rtf, 3), "task": self.task.name, "instruction": self.task.instruction}  # fmt: skip

    def result(self, result) -> None:
        if self.fmt == "json":
            print(json.dumps(self.record(result), ensure_ascii=False), flush=True)
        else:
            self.console.print(f"[dim]{_clock(result.start)}–{_clock(result.end)}[/] {_escape(result.text)} "
                               f"[dim](latency {result.latency_s:.2f} s, RTF {result.rtf:.2f})[/]")  # fmt: skip
            sys.stdout.flush()
        text = " ".join(result.text.split())  # one result, one line: the model's newlines would split it
        if self.transcript is not None and (text or self.save_json):
            line = json.dumps(self.record(result), ensure_ascii=False) if self.save_json else (
                f"[{_clock(result.start)} - {_clock(result.end)}] {text}")  # fmt: skip
            self.transcript.write(line + "\n")  # one write per whole line, then flush: never a half line
            self.transcript.flush()

    def audio(self, samples) -> None:
        if self.recording is not None:
            self.recording.write(samples)

    def summary(self, summary) -> None:
        if self.fmt == "json":
            print(json.dumps({"summary": summary.as_dict()}), flush=True)
        stderr.print(f"[dim]salmonn live:[/] {summary.line()}")

    def close(self) -> None:
        if self.transcript is not None:
            self.transcript.close()
        if self.recording is not None:
            self.recording.close()
            _part(self.audio_path).replace(self.audio_path)


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def list_devices() -> None:
    """Print the audio inputs PortAudio offers (or say there are none)."""
    from ..live.source import import_sounddevice, list_input_devices

    sd = import_sounddevice()
    devices = list_input_devices(sd)
    if not devices:
        total = len(sd.query_devices())
        print(f"no audio input devices found (PortAudio sees {total} device(s), none with an input)")
        return
    for d in devices:
        mark = "*" if d.is_default else " "
        print(f"{mark} {d.index:>3}  {d.name}  ({d.host_api}, {d.channels} ch, {d.default_rate:g} Hz)")


def _task(task: str, question: str | None, lang: str) -> Task:
    from ..prompt import TASK_INSTRUCTIONS, transcribe_instruction

    if task not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "ask":
        if question is None or not question.strip():
            raise UsageError("--task ask needs a standing --question, e.g. --question 'Does a baby cry?'")
        return Task("ask", question.strip())
    if question is not None:
        raise UsageError("--question goes with --task ask")
    return Task(task, transcribe_instruction(lang) if task == "transcribe" else TASK_INSTRUCTIONS["caption"])


@dataclass(frozen=True)
class LiveRequest:
    """What `salmonn live` was asked to do (the model and decoding options aside)."""

    task: Task
    input: Path | None
    fast: bool
    capture_device: str | None
    window: float | None
    max_queue: int
    drain: bool
    fmt: str
    save: Path | None
    save_audio: Path | None


def _check_paths(request: LiveRequest) -> None:
    if request.fast and request.input is None:
        raise UsageError("--fast goes with --input FILE (a microphone cannot be faster than real time)")
    if request.input is not None and request.capture_device is not None:
        raise UsageError("--input and --capture-device exclude each other")
    for path in (request.save, request.save_audio):
        if path is not None and not path.parent.is_dir():
            raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")
        if path is not None:
            check_writable(path.parent)  # a read-only or full disk: found now, not after the model loads
    if request.save_audio is not None and request.save_audio.suffix.lower() not in (".wav", ".flac"):
        raise UsageError(f"--save-audio {request.save_audio}: use a .wav or .flac file")


def _answerer(loaded, task: Task, decode: DecodeChoice):
    """audio -> text for this task, with the user's decoding options."""
    from ..generate import seeded_generator

    scale, options = decode.scale_for(task.lora_scale), decode.options
    generator = seeded_generator(decode.seed, loaded.model.device)

    def answer(audio) -> str:
        with oom_hint(loaded):
            return loaded.model.generate(audio, task.instruction, options, lora_scale=scale, generator=generator).text

    return answer


def _open_source(request: LiveRequest):
    """The capture source and a few words about it for the start line."""
    from ..inputs import InputItem
    from ..live.source import FileSource, open_microphone
    from ..probe import probe_inputs

    if request.input is not None:
        pace = "fast" if request.fast else "real-time pace"
        with probe_inputs([InputItem(request.input)]) as probed:  # the true reason, in one line, as for `ask`
            if probed.bad:
                raise probed.bad[request.input]
            source = FileSource.from_file(probed.good[0].audio_path, fast=request.fast)  # read whole, here
        return source, f"{request.input} ({pace})"
    source = open_microphone(request.capture_device)
    rate = "" if source.rate == SAMPLE_RATE else f", {source.rate} Hz resampled to 16 kHz"
    return source, f"input device {source.device.index} ({source.device.name}{rate})"


def _opt(*names: str, **kwargs):
    return typer.Option(*names, rich_help_panel=LIVE_PANEL, **kwargs)


TaskOpt = Annotated[str, _opt("--task", "-t", help="transcribe, caption or ask.")]
QuestionOpt = Annotated[Optional[str], _opt(help="Standing question for --task ask, asked of every segment.")]
LangOpt = Annotated[str, _opt("--lang", "-l", help="Spoken language for transcribe: en, zh, de or auto.")]
CaptureDeviceOpt = Annotated[
    Optional[str], _opt(help="Input device: its index or part of its name (see --list-devices).")
]
ListDevicesOpt = Annotated[bool, _opt("--list-devices", help="List the audio inputs and exit.")]
InputOpt = Annotated[
    Optional[Path], _opt("--input", "-i", help="Feed this audio file through the live pipeline (no microphone).")
]
FastOpt = Annotated[bool, _opt("--fast", help="With --input: as fast as possible instead of at real-time pace.")]
WindowOpt = Annotated[
    Optional[float],
    _opt(
        min=0.2,
        max=WINDOW_SECONDS,
        help=f"Fixed windows of S seconds (caption: {CAPTION_WINDOW_S:g}; ask: utterances unless given).",
    ),
]
MaxQueueOpt = Annotated[
    int, _opt(min=1, help="Segments waiting for the model; when full the oldest is dropped (with a warning).")
]
DrainOpt = Annotated[bool, _opt("--drain", help="On Ctrl-C, answer what was captured first (default: abandon it).")]
SaveOpt = Annotated[Optional[Path], _opt(help="Write the transcript here as it comes (.jsonl: JSON records).")]
SaveAudioOpt = Annotated[Optional[Path], _opt(help="Record the captured audio here (.wav or .flac).")]
LiveFormatOpt = Annotated[
    str, _opt("--format", "-f", help="text, or json (one object per result per line, then a summary).")
]


@with_options(MODEL_OPTIONS, DECODE_OPTIONS)
def live(
    task: TaskOpt = "transcribe",
    question: QuestionOpt = None,
    lang: LangOpt = "en",
    capture_device: CaptureDeviceOpt = None,
    list_devices_: ListDevicesOpt = False,
    input_: InputOpt = None,
    fast: FastOpt = False,
    window: WindowOpt = None,
    max_queue: MaxQueueOpt = 4,
    drain: DrainOpt = False,
    save: SaveOpt = None,
    save_audio: SaveAudioOpt = None,
    fmt: LiveFormatOpt = "text",
    options: dict = None,
) -> None:
    """Listen live (microphone, or --input FILE): transcribe, caption or answer a standing question as it happens."""
    if list_devices_:
        list_devices()
        return
    if fmt not in ("text", "json"):
        raise UsageError(f"--format must be text or json, got {fmt!r}")
    request = LiveRequest(_task(task, question, lang), input_, fast, capture_device, window, max_queue, drain,
                          fmt, save, save_audio)  # fmt: skip
    _check_paths(request)
    if _run(request, options).interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


def _run(request: LiveRequest, options: dict):
    """Open the source (errors before the slow model load), the model, the outputs; run until done or Ctrl-C."""
    from ..live.loop import LiveConfig, LiveHooks, run_live
    from ..live.segmenter import UtteranceSegmenter, WindowSegmenter

    window = request.window
    if request.task.name == "caption" and window is None:
        window = CAPTION_WINDOW_S
    segmenter = WindowSegmenter(window) if window is not None else UtteranceSegmenter()
    source, described = _open_source(request)
    loaded = open_model(model_choice(options), long_lived=True)
    answer = _answerer(loaded, request.task, decode_choice(options))
    outputs = _Outputs(request.fmt, request.task, request.save, request.save_audio)
    try:
        # the start line comes once capture runs: what is played after it is heard, every sample
        started = f"[dim]salmonn live: {request.task.name} from {described}; Ctrl-C to stop[/]"
        hooks = LiveHooks(
            on_result=outputs.result, on_warning=warn, on_audio=outputs.audio, on_start=lambda: stderr.print(started)
        )
        config = LiveConfig(max_queue=request.max_queue, drain=request.drain)
        summary = run_live(source, segmenter, answer, config, hooks)
        outputs.summary(summary)
    finally:
        outputs.close()
    return summary


def register(app: typer.Typer) -> None:
    app.command("live")(live)

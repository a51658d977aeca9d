"""Benchmark SALMONN: load, per-stage times for a 30 s clip, time to first token, decode speed, long-audio speed.

    python scripts/bench.py --shape tiny --device cpu --json OUT.json
    python scripts/bench.py --model my-model.toml --device cuda --batch-size 8
    python scripts/bench.py --whisper W --beats B.pt --llm L --checkpoint C.pth

Every measurement runs `--warmup` untimed times, then `--repeat` timed times, and is reported as median, min
and max seconds (load is timed once). Long audio: a synthetic `--long-seconds` file is cut into <= 30 s
segments (salmonn_cli.segment when present, else fixed windows) and answered with batch size 1 and
`--batch-size`; the speed is audio seconds per wall second. To add a measurement, write a function
`(Bench) -> dict` and add it to MEASUREMENTS: it appears in the JSON under its name and in the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from salmonn_cli.audio import SAMPLE_RATE, WINDOW_SAMPLES, WINDOW_SECONDS  # noqa: E402
from salmonn_cli.generate import DecodeOptions  # noqa: E402
from salmonn_cli.prompt import transcribe_instruction  # noqa: E402

try:  # the long-audio segmenter is optional: fixed 30 s windows without it
    from salmonn_cli.segment import plan_segments, segment_audio
except ImportError:  # pragma: no cover - depends on the checkout
    plan_segments = segment_audio = None

SHAPES = ("tiny",)  # named shapes the script can build; real shapes come with the benchmark issue


@dataclass(frozen=True)
class Stat:
    """Seconds of the timed runs of one measurement."""

    median: float
    min: float
    max: float
    runs: tuple[float, ...]

    @classmethod
    def of(cls, runs: list[float]) -> Stat:
        return cls(statistics.median(runs), min(runs), max(runs), tuple(runs))


@dataclass(frozen=True)
class Bench:
    """What every measurement gets: the model, the parsed options, and a timer honouring warm-up and repeats."""

    model: Any
    args: argparse.Namespace

    @property
    def prompt(self) -> str:
        return transcribe_instruction("en")

    def sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)  # time the GPU's work, not its queueing

    def time(self, fn: Callable[[], Any]) -> Stat:
        for _ in range(self.args.warmup):
            fn()
        runs = []
        for _ in range(self.args.repeat):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            runs.append(time.perf_counter() - start)
        return Stat.of(runs)


def synthetic_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Tones and noise bursts of 2-6 s separated by 0.4 s pauses, float32 16 kHz: something to segment and hear."""
    rng = np.random.default_rng(seed)
    parts, total = [], int(seconds * SAMPLE_RATE)
    while sum(p.shape[0] for p in parts) < total:
        t = np.arange(int(rng.uniform(2.0, 6.0) * SAMPLE_RATE)) / SAMPLE_RATE
        if rng.random() < 0.5:
            sound = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 1500) * t)
        else:
            sound = 0.1 * rng.standard_normal(t.shape[0])
        parts += [sound, np.zeros(int(0.4 * SAMPLE_RATE))]
    return np.concatenate(parts)[:total].astype(np.float32)


def segments_of(waveform: np.ndarray) -> tuple[str, list[np.ndarray]]:
    """(segmenter name, clips of at most 30 s)."""
    if plan_segments is not None:
        segments = plan_segments(waveform, max_seconds=WINDOW_SECONDS, vad=False)
        return "segment.plan_segments(vad=False)", [segment_audio(waveform, s) for s in segments]
    return "fixed 30 s", [waveform[i : i + WINDOW_SAMPLES] for i in range(0, waveform.shape[0], WINDOW_SAMPLES)]


# -- measurements ------------------------------------------------------------------------------------------


def measure_stages(bench: Bench) -> dict:
    """Whisper (log-mel + encoder), BEATs (fbank + encoder) and the connector, for one 30 s clip."""
    model, clip = bench.model, synthetic_audio(WINDOW_SECONDS, seed=1)
    with torch.inference_mode():
        speech = model.encode_speech(model.whisper_features(clip))
        audio = model.encode_audio(model.beats_features(clip))
        return {
            "whisper_s": bench.time(lambda: model.encode_speech(model.whisper_features(clip))),
            "beats_s": bench.time(lambda: model.encode_audio(model.beats_features(clip))),
            "connector_s": bench.time(lambda: model.connector(speech, audio)),
        }


def measure_first_token(bench: Bench) -> dict:
    """30 s of audio in -> first generated id out (encoders, prompt pass, one greedy step)."""
    clip = synthetic_audio(WINDOW_SECONDS, seed=2)
    return {
        "first_token_s": bench.time(lambda: bench.model.generate(clip, bench.prompt, max_new_tokens=1, num_beams=1))
    }


def measure_decode(bench: Bench, num_beams: int = 1) -> dict:
    """Tokens per second after the prompt pass: (n - 1) / (time for n tokens - time for 1), eos held off."""
    model, n = bench.model, bench.args.max_new_tokens
    tokens = model.audio_tokens(synthetic_audio(WINDOW_SECONDS, seed=3))

    def run(count: int) -> Stat:
        options = DecodeOptions(max_new_tokens=count, num_beams=num_beams, min_length=count + 1)  # exactly count
        return bench.time(lambda: model.answer(tokens, bench.prompt, options))

    one, many = run(1), run(n)
    per_token = max(many.median - one.median, 1e-9) / max(n - 1, 1)
    return {
        "tokens": n,
        "num_beams": num_beams,
        "one_token_s": one,
        "all_tokens_s": many,
        "tokens_per_s": 1 / per_token,
    }


def measure_long_audio(bench: Bench) -> dict:
    """Audio seconds per wall second over a long file's segments, batch size 1 vs `--batch-size`."""
    args = bench.args
    waveform = synthetic_audio(args.long_seconds, seed=4)
    segmenter, clips = segments_of(waveform)
    decode = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    runs = {}
    for size in dict.fromkeys((1, args.batch_size)):
        wall = bench.time(lambda size=size: bench.model.generate_batch(clips, bench.prompt, batch_size=size, **decode))
        runs[str(size)] = {"wall_s": wall, "audio_s_per_s": args.long_seconds / wall.median}
    speeds = [run["audio_s_per_s"] for run in runs.values()]
    return {
        "audio_s": args.long_seconds,
        "segments": len(clips),
        "segmenter": segmenter,
        "decode": decode,
        "by_batch_size": runs,
        "batch_speedup": speeds[-1] / speeds[0],
    }


MEASUREMENTS: dict[str, Callable[[Bench], dict]] = {
    "stages": measure_stages,
    "first_token": measure_first_token,
    "decode": measure_decode,
    "long_audio": measure_long_audio,
}


# -- model -------------------------------------------------------------------------------------------------


def model_file(args: argparse.Namespace, workdir: Path) -> Path | None:
    """The model file to load: `--model`, or a freshly built `--shape`; None when component paths are given."""
    if args.model:
        return Path(args.model)
    if all((args.whisper, args.beats, args.llm, args.checkpoint)):
        return None
    folder = workdir / args.shape
    script = ROOT / "scripts" / "make_tiny_model.py"
    subprocess.run([sys.executable, str(script), str(folder)], check=True, capture_output=True)
    return folder / "model.toml"


def load(args: argparse.Namespace, workdir: Path) -> tuple[Any, float, str]:
    """(model, load seconds, what was loaded); the timer covers `load_model` only, not building a shape."""
    from salmonn_cli.hub import resolve_components
    from salmonn_cli.loading import load_model
    from salmonn_cli.model_file import load_model_spec, with_local_components

    path = model_file(args, workdir)
    overrides = {"whisper": args.whisper, "beats": args.beats, "llm": args.llm, "checkpoint": args.checkpoint}
    kwargs: dict[str, Any] = {"device": args.device}
    if path is None:
        paths, name = overrides, "components"
    else:
        spec = with_local_components(load_model_spec(str(path)), **overrides)
        paths, name = asdict(resolve_components(spec)), spec.name
        kwargs.update(
            second_per_window=spec.settings.second_per_window,
            second_stride=spec.settings.second_stride,
            qformer_heads=spec.settings.qformer_heads,
            lora_scale=spec.settings.lora_scale,
            prompt_template=spec.settings.prompt_template,
        )
    start = time.perf_counter()
    model = load_model(paths["whisper"], paths["beats"], paths["llm"], paths["checkpoint"], **kwargs)
    return model, time.perf_counter() - start, name


# -- report --------------------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    if isinstance(value, Stat):
        return asdict(value)
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    return value


def print_table(report: dict) -> None:
    """One row per timed value (median, min, max) and per derived speed."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SALMONN bench: {report['model']} on {report['device']}")
    for column in ("measurement", "median", "min", "max"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    table.add_row("load_s", f"{report['load_s']:.3f}", "", "")

    def rows(prefix: str, value: Any) -> None:
        if isinstance(value, Stat):
            table.add_row(prefix, f"{value.median:.4f}", f"{value.min:.4f}", f"{value.max:.4f}")
        elif isinstance(value, dict):
            for key, item in value.items():
                rows(f"{prefix}.{key}", item)
        elif isinstance(value, float):
            table.add_row(prefix, f"{value:.2f}", "", "")

    for name in MEASUREMENTS:
        rows(name, report[name])
    Console().print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="tiny", help="model shape to build when no model is given")
    ap.add_argument("--model", help="a model file (.toml) or built-in model name to load instead")
    for role in ("whisper", "beats", "llm", "checkpoint"):
        ap.add_argument(f"--{role}", help=f"local {role} component (overrides the model file's)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer (decode speed, long audio)")
    ap.add_argument("--num-beams", type=int, default=4, help="beams for the long-audio answers")
    ap.add_argument("--long-seconds", type=float, default=180.0, help="length of the synthetic long file")
    ap.add_argument("--batch-size", type=int, default=4, help="segments per batch for the batched long-audio run")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0 or args.batch_size < 1 or args.long_seconds < 1 or args.max_new_tokens < 2:
        ap.error("need --repeat >= 1, --warmup >= 0, --batch-size >= 1, --long-seconds >= 1, --max-new-tokens >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="salmonn-bench-") as workdir:  # a built shape lives here
        model, load_s, name = load(args, Path(workdir))
        report = run(model, load_s, name, args)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(jsonable(report), indent=2) + "\n")
    return 0


def run(model: Any, load_s: float, name: str, args: argparse.Namespace) -> dict:
    """Every measurement of MEASUREMENTS, with what the numbers were measured on."""
    report: dict[str, Any] = {
        "model": name,
        "device": str(model.device),
        "dtype": str(model.encoder_dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "repeat": args.repeat,
        "warmup": args.warmup,
        "load_s": load_s,
    }
    bench = Bench(model, args)
    for key, measure in MEASUREMENTS.items():
        report[key] = measure(bench)
    return report


if __name__ == "__main__":
    sys.exit(main())

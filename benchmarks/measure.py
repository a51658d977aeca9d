"""Timed measurements of one loaded model: stages, time to first token, decode speed, `ask`, long audio.

Each measurement is a function `(Bench) -> dict`, registered in MEASUREMENTS under the name it has in the
JSON and the table. Every timed value runs `warmup` untimed times, then `repeat` timed times (a `Stat`).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from salmonn_cli.audio import SAMPLE_RATE, WINDOW_SECONDS
from salmonn_cli.decode_options import DecodeOptions
from salmonn_cli.engine import engine_for
from salmonn_cli.prompt import transcribe_instruction
from salmonn_cli.segment import plan_segments, segment_audio
from salmonn_cli.step_compile import ALWAYS, NEVER, CompilePlan

from .results import LIVE_WINDOW_S, MEASUREMENT_NAMES, BenchOptions, Stat


@dataclass(frozen=True)
class Bench:
    """What every measurement gets: the model, the options, and a timer honouring warm-up and repeats."""

    model: Any
    options: BenchOptions

    @property
    def prompt(self) -> str:
        return transcribe_instruction("en")

    def sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)  # time the GPU's work, not its queueing

    def time(self, fn: Callable[[], Any]) -> Stat:
        for _ in range(self.options.warmup):
            fn()
        runs = []
        for _ in range(self.options.repeat):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            runs.append(time.perf_counter() - start)
        return Stat.of(runs)

    def exactly(self, count: int, num_beams: int) -> DecodeOptions:
        """Decoding that produces exactly `count` tokens: eos is held off by min_length."""
        return DecodeOptions(max_new_tokens=count, num_beams=num_beams, min_length=count + 1)


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
    segments = plan_segments(waveform, max_seconds=WINDOW_SECONDS, vad=False)
    return "segment.plan_segments(vad=False)", [segment_audio(waveform, s) for s in segments]


class PromptClock:
    """Records when the decode engine's prompt pass ends (the first token's logits are ready).

    Decode steps are not hooked one by one: on CUDA a step is a graph replay that runs no Python, and a
    synchronisation per step would slow what is measured. Their time is the rest of the call.
    """

    def __init__(self, bench: Bench) -> None:
        self.bench, self.ends = bench, []
        self._engine = engine_for(bench.model.llm)
        start = self._engine.start

        def timed_start(*args: Any, **kwargs: Any):
            logits = start(*args, **kwargs)
            self.bench.sync()
            self.ends.append(time.perf_counter())
            return logits

        self._engine.start = timed_start  # an instance attribute over the method, removed by close()

    def close(self) -> None:
        del self._engine.start


def _timed_steps(bench: Bench, run: Callable[[], Any], steps: int) -> tuple[list[float], list[float], list[float]]:
    """(seconds to the end of the prompt pass, seconds of the whole call, seconds per decode step) per timed run;
    each run makes `steps` decode steps after its prompt pass."""
    for _ in range(bench.options.warmup):
        run()
    firsts, totals, per_step = [], [], []
    clock = PromptClock(bench)
    try:
        for _ in range(bench.options.repeat):
            clock.ends.clear()
            bench.sync()
            start = time.perf_counter()
            run()
            bench.sync()
            end = time.perf_counter()
            totals.append(end - start)
            firsts.append(clock.ends[0] - start)
            per_step.append((end - clock.ends[0]) / max(steps, 1))
    finally:
        clock.close()
    return firsts, totals, per_step


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
    """30 s of audio in -> first generated id out (encoders, connector, prompt pass, one greedy step)."""
    clip = synthetic_audio(WINDOW_SECONDS, seed=2)
    return {
        "first_token_s": bench.time(lambda: bench.model.generate(clip, bench.prompt, max_new_tokens=1, num_beams=1))
    }


def _decode(bench: Bench, num_beams: int) -> dict:
    """From audio tokens already computed: prompt pass, then `new_tokens - 1` decode steps (eos held off).

    The steps run every way this device has, in the same process on one loaded model (`STEP_WAYS`): compiled
    (and on CUDA recorded as a graph), recorded only (CUDA), and eager; `by_step` has each one's timings, and the
    compile's start cost. The top-level figures are the way `--compile auto` decodes a long run here (compiled and
    recorded on CUDA, eager on a CPU: step_compile.COMPILED_BY_AUTO).
    """
    model, n = bench.model, bench.options.new_tokens
    tokens = model.audio_tokens(synthetic_audio(WINDOW_SECONDS, seed=3))
    options = bench.exactly(n, num_beams)
    engine = engine_for(model.llm)

    def run() -> None:
        model.answer(tokens, bench.prompt, options)

    by_step = {}
    ways = {way: how for way, how in step_ways(engine).items() if way in bench.options.step_ways}
    for way, (plan, capture) in ways.items():
        with step_way(engine, plan, capture):
            paid = len(engine.compile_seconds)
            if plan.when == ALWAYS:
                run()  # compiles this shape, untimed, whatever --warmup says
                if engine.compile_plan.when != ALWAYS:  # compiling failed: the engine said so on stderr
                    by_step[way] = {"failed": "compiling the step failed (see the log)"}
                    continue
            firsts, totals, steps = _timed_steps(bench, run, n - 1)
        by_step[way] = {"one_token_s": Stat.of(firsts), "all_tokens_s": Stat.of(totals), "step_s": Stat.of(steps),
                        "tokens_per_s": 1 / statistics.median(steps)}  # fmt: skip
        if plan.when == ALWAYS:
            by_step[way]["compile_s"] = sum(engine.compile_seconds[paid:])
    timed = [way for way in DEFAULT_WAYS[model.device.type == "cuda"] if "tokens_per_s" in by_step.get(way, {})]
    timed += [way for way in by_step if "tokens_per_s" in by_step[way]]
    if not timed:
        return {"tokens": n, "num_beams": num_beams, "by_step": by_step}
    default = timed[0]
    chosen = by_step[default]
    result = {
        "tokens": n,
        "num_beams": num_beams,
        "step_way": default,
        **{key: chosen[key] for key in ("one_token_s", "all_tokens_s", "step_s", "tokens_per_s")},
        "by_step": by_step,
        **{f"{way}_tokens_per_s": t["tokens_per_s"] for way, t in by_step.items() if "tokens_per_s" in t},
        **bandwidth_share(chosen["tokens_per_s"], model.llm, str(model.device)),
    }
    if "compile_s" in by_step.get("compiled", {}):
        result["compile_s"] = by_step["compiled"]["compile_s"]
        if "eager" in by_step:
            result["compiled_over_eager"] = by_step["compiled"]["tokens_per_s"] / by_step["eager"]["tokens_per_s"]
    return result


# the way a long run decodes under `--compile auto`, by whether the device is CUDA (the first that worked)
DEFAULT_WAYS = {True: ("compiled", "graph", "eager"), False: ("eager",)}


def step_ways(engine) -> dict[str, tuple[CompilePlan, bool]]:
    """The ways this engine can run a step, as (compile plan, record as a CUDA graph): compiled (recorded too where
    the engine records), recorded alone, eager."""
    ways = {"compiled": (CompilePlan(ALWAYS), engine.capture)}
    if engine.capture:
        ways["graph"] = (CompilePlan(NEVER), True)
    ways["eager"] = (CompilePlan(NEVER), False)
    return ways


@contextlib.contextmanager
def step_way(engine, plan: CompilePlan, capture: bool):
    """Run the engine's steps one way for the duration, then as before."""
    saved = engine.compile_plan, engine.capture
    engine.compile_plan, engine.capture = plan, capture
    try:
        yield
    finally:
        engine.compile_plan, engine.capture = saved


BANDWIDTH_PROBE_BYTES = 512 << 20  # far past any cache: a reduction over it reads memory, not cache


@functools.lru_cache(maxsize=4)
def read_bandwidth(device: str) -> float:
    """Bytes per second this device reads, measured: the median of 5 sums over one 512 MiB float32 tensor (after a
    warm-up sum). The bound a bandwidth-limited decode step meets: all of the LLM's weights read once per step."""
    probe = torch.ones(BANDWIDTH_PROBE_BYTES // 4, dtype=torch.float32, device=device)
    runs = []
    for i in range(6):
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        float(probe.sum())  # float(): waits for the result, on any device
        if i:
            runs.append(time.perf_counter() - start)
    del probe
    return BANDWIDTH_PROBE_BYTES / statistics.median(runs)


def weight_bytes_read_per_step(llm) -> int:
    """Bytes of the LLM a decode step reads: every weight once (the beams share the read), less the token table,
    of which a step reads one row per beam."""
    from .memory import module_bytes, tensor_bytes

    return module_bytes(llm) - tensor_bytes(llm.get_input_embeddings().weight)


def bandwidth_share(steps_per_s: float, llm, device: str) -> dict:
    """P9: decode steps/s x bytes read per step / measured read bandwidth (1.0 = the memory bound reached)."""
    read, bandwidth = weight_bytes_read_per_step(llm), read_bandwidth(device)
    return {"bytes_per_step": read, "read_bandwidth_gb_s": bandwidth / 1e9, "p9": steps_per_s * read / bandwidth}


def measure_decode(bench: Bench) -> dict:
    """Greedy decoding speed: tokens per second after the prompt pass."""
    return _decode(bench, num_beams=1)


def measure_decode_beams(bench: Bench) -> dict:
    """Beam search (`--num-beams`, the original's 4) speed: answer tokens (steps) per second."""
    return _decode(bench, num_beams=bench.options.num_beams)


def measure_ask(bench: Bench) -> dict:
    """End to end, as `salmonn ask` runs: 30 s clip -> encoders -> beam search for `new_tokens` tokens."""
    model, clip, n = bench.model, synthetic_audio(WINDOW_SECONDS, seed=5), bench.options.new_tokens
    beams = bench.options.num_beams

    def run() -> None:
        model.generate(clip, bench.prompt, max_new_tokens=n, num_beams=beams, min_length=n + 1)

    firsts, totals, _ = _timed_steps(bench, run, n - 1)
    return {"tokens": n, "num_beams": beams, "first_token_s": Stat.of(firsts), "total_s": Stat.of(totals)}


def measure_long_audio(bench: Bench) -> dict:
    """Audio seconds per wall second over a long file's segments, batch size 1 vs `batch_size`.

    One timed pass per batch size, after one batch of that size untimed: a long file is already an average over
    its segments, and `repeat` passes over 10 minutes of audio would take most of a GPU check's time.
    """
    opts = bench.options
    waveform = synthetic_audio(opts.long_seconds, seed=4)
    segmenter, clips = segments_of(waveform)
    decode = {"max_new_tokens": opts.new_tokens, "num_beams": opts.num_beams}
    runs = {}
    for size in dict.fromkeys((1, opts.batch_size)):
        bench.model.generate_batch(clips[:size], bench.prompt, batch_size=size, **decode)  # warm-up
        bench.sync()
        start = time.perf_counter()
        bench.model.generate_batch(clips, bench.prompt, batch_size=size, **decode)
        bench.sync()
        wall = Stat.of([time.perf_counter() - start])
        runs[str(size)] = {"wall_s": wall, "audio_s_per_s": opts.long_seconds / wall.median}
    speeds = [run["audio_s_per_s"] for run in runs.values()]
    return {
        "audio_s": opts.long_seconds,
        "segments": len(clips),
        "segmenter": segmenter,
        "decode": decode,
        "by_batch_size": runs,
        "batch_speedup": speeds[-1] / speeds[0],
    }


def measure_live(bench: Bench) -> dict:
    """`salmonn live --input` at real-time pace: the end of each fixed window -> its text (beams, new tokens as `ask`).

    Fixed windows, not silero-vad's utterances: the synthetic audio is not speech. A window's latency is what a
    user waits after its last sample was captured; the model's warm before the clock starts.
    """
    from salmonn_cli.live.loop import LiveConfig, LiveHooks, run_live
    from salmonn_cli.live.segmenter import WindowSegmenter
    from salmonn_cli.live.source import FileSource

    model, opts = bench.model, bench.options
    decode = {"max_new_tokens": opts.new_tokens, "num_beams": opts.num_beams, "min_length": opts.new_tokens + 1}

    def answer(audio: np.ndarray) -> str:
        return model.generate(audio, bench.prompt, **decode).text

    answer(synthetic_audio(LIVE_WINDOW_S, seed=6))  # warm (on CUDA: records the step graphs)
    results = []
    source = FileSource(synthetic_audio(opts.live_seconds, seed=7))
    summary = run_live(source, WindowSegmenter(LIVE_WINDOW_S), answer, LiveConfig(max_queue=64, force=True),
                       LiveHooks(on_result=results.append))  # fmt: skip
    return {
        "audio_s": opts.live_seconds,
        "window_s": LIVE_WINDOW_S,
        "segments": len(results),
        "dropped": summary.dropped,
        "latency_s": Stat.of([r.latency_s for r in results]) if results else None,
        "rtf": summary.rtf,
    }


MEASUREMENTS: dict[str, Callable[[Bench], dict]] = {
    "stages": measure_stages,
    "first_token": measure_first_token,
    "decode": measure_decode,
    "decode_beams": measure_decode_beams,
    "ask": measure_ask,
    "long_audio": measure_long_audio,
    "live": measure_live,
}
assert tuple(MEASUREMENTS) == MEASUREMENT_NAMES  # the light list the CLI options read

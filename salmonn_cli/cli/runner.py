"""What every task command does: open the model the options describe, run one instruction per input file,
print each result as it finishes, report each failure and go on; the exit code says whether any failed."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from ..distributed import ALONE, Ranks, summed
from ..errors import OutOfMemoryError, SalmonnError, UsageError
from ..output import Record
from ..stop import stop_deferred
from .options import DecodeChoice, ModelChoice

if TYPE_CHECKING:
    from ..inputs import InputItem
    from ..longform import FileAnswer, LongformSettings
    from .batch import OutputPlan

stderr = Console(stderr=True, highlight=False, soft_wrap=True)  # one message = one line, never wrapped


@dataclass(frozen=True)
class Task:
    """A task preset: its name, the instruction the model gets, and its LoRA scale unless the user names one."""

    name: str
    instruction: str
    lora_scale: float | None = None


@dataclass
class LoadedModel:
    """A loaded model and what `-f json` reports about it."""

    model: object
    name: str
    checkpoint: str
    quantization: str
    device: str
    checkpoint_sha256: str | None = None


def warn(message: str) -> None:
    stderr.print(f"[yellow]salmonn: warning:[/] {message}")


class NoticeLines(logging.Handler):
    """The library's notices (salmonn_cli.notices) as our own lines: warnings as `warn`, the rest dimmed."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            warn(message)
        else:
            stderr.print(f"[dim]{message}[/]")


def show_notices() -> None:
    """Route the `salmonn` logger's records to stderr as our lines, once per process."""
    from ..notices import logger

    if not any(isinstance(h, NoticeLines) for h in logger.handlers):
        logger.addHandler(NoticeLines())
        logger.setLevel(logging.INFO)
        logger.propagate = False  # a server's root handlers must not print them a second time


def model_spec_of(choice: ModelChoice):
    """The model file's `ModelSpec` with the user's local components."""
    from ..model_file import load_model_spec, with_local_components
    from ..train.composed_file import is_composed_model_file

    if is_composed_model_file(choice.model):
        raise UsageError(f"{choice.model} is a model `salmonn train` built: this command runs the published"
                         " architecture only (train another stage of the recipe instead)")  # fmt: skip

    return with_local_components(
        load_model_spec(choice.model),
        whisper=choice.whisper,
        beats=choice.beats,
        llm=choice.llm,
        checkpoint=choice.checkpoint,
    )


def resolve_model(choice: ModelChoice):
    """(`model_spec_of(choice)`, `ComponentPaths` of all four): what is missing is downloaded unless offline
    (--offline, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    from ..hub import resolve_components

    spec = model_spec_of(choice)
    return spec, resolve_components(spec, offline=choice.offline)  # hub.is_offline decides, with the env


def open_model(choice: ModelChoice, *, long_lived: bool = False) -> LoadedModel:
    """Check the mode fits, resolve the model's components (downloading what is missing unless offline) and load
    it, with progress. `long_lived`: the run decodes much (a server, live, many files, long audio), which `--compile
    auto` weighs against the start cost of compiling the decode step."""
    from ..train.composed_file import is_composed_model_file

    if is_composed_model_file(choice.model):
        return open_composed(choice, long_lived=long_lived)
    return _open_published(choice, long_lived)


def _plan_compiling(model, plan) -> None:
    """Tell the model's decode engine which step shapes to compile (a causal LLM's; T5's steps are not compiled)."""
    from torch import nn

    from ..engine import plan_compile

    engine = model.decode_engine()
    if isinstance(engine, nn.Module):
        plan_compile(engine, plan)


def _open_published(choice: ModelChoice, long_lived: bool) -> LoadedModel:
    from ..hub import resolve_components
    from ..loading import load_model, resolve_device
    from ..step_compile import ALWAYS, compile_plan
    from .quant import pick_quantization

    model_spec = model_spec_of(choice)
    device = resolve_device(choice.device)
    plan = compile_plan(choice.compile, long_lived=long_lived, device_type=device.type)  # before anything loads
    if device.type == "cpu" and choice.device == "auto":
        warn("no CUDA GPU found: running on the CPU, which is slow")
    # before any download: a mode that cannot fit is refused without fetching 20 GB for it
    quant = pick_quantization(choice.quant, choice.quant_backend, model_spec, device, choice.dtype,
                              compiled=plan.when == ALWAYS)  # fmt: skip
    paths = resolve_components(model_spec, offline=choice.offline)  # hub.is_offline decides, with the env
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our status line says what is loading
    started = time.perf_counter()
    import torch

    with stderr.status(f"Loading {model_spec.name} on {device} ({quant.placement.describe()})…"):
        model = load_model(
            paths.whisper,
            paths.beats,
            paths.llm,
            paths.checkpoint,
            device=device,
            dtype=getattr(torch, quant.dtype),
            quantization=quant.spec,
            settings=model_spec.settings,
        )
    stderr.print(f"[dim]Loaded {model_spec.name} in {time.perf_counter() - started:.1f} s[/]")
    _plan_compiling(model, plan)
    checkpoint = model_spec.checkpoint
    known_sha = None if checkpoint.path else next((s.sha256 for s in checkpoint.sources if s.sha256), None)
    return LoadedModel(model, model_spec.name, Path(paths.checkpoint).name, quant.describe(), str(device), known_sha)


def open_composed(choice: ModelChoice, *, long_lived: bool = False) -> LoadedModel:
    """A model `salmonn train` built (its model.toml names the encoder, the LLM and the trained weights)."""
    import torch

    from ..hub import resolve_component
    from ..loading import llm_quantization, resolve_device
    from ..step_compile import compile_plan
    from ..train.composed_file import load_composed, read_composed_file

    if any(p is not None for p in (choice.whisper, choice.beats, choice.llm, choice.checkpoint)):
        raise UsageError("--whisper/--beats/--llm/--checkpoint replace a published model's components; a trained"
                         " model's are named in its model.toml")  # fmt: skip
    spec = read_composed_file(choice.model)
    device = resolve_device(choice.device)
    plan = compile_plan(choice.compile, long_lived=long_lived, device_type=device.type)  # before anything loads
    if device.type == "cpu" and choice.device == "auto":
        warn("no CUDA GPU found: running on the CPU, which is slow")
    dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32}.get(choice.dtype)
    dtype = dtype or getattr(torch, choice.dtype)
    quant = None
    if choice.quant not in ("auto", "none"):  # auto: these models are small enough to run unquantised
        from quantize import QuantSpec

        quant = llm_quantization(QuantSpec.parse(choice.quant, backend=choice.quant_backend), device, dtype)
    arg = spec.file
    encoder = resolve_component(spec.encoder.component, model_arg=str(arg), offline=choice.offline).path
    llm = resolve_component(spec.llm, model_arg=str(arg), offline=choice.offline).path
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our status line says what is loading
    started = time.perf_counter()
    with stderr.status(f"Loading {spec.name} on {device}…"):
        model, _ = load_composed(spec, encoder_path=encoder, llm_path=llm, device=device, dtype=dtype,
                                 quantization=quant)  # fmt: skip
    stderr.print(f"[dim]Loaded {spec.name} in {time.perf_counter() - started:.1f} s[/]")
    _plan_compiling(model, plan)
    described = "none" if quant is None else choice.quant
    return LoadedModel(model, spec.name, spec.weights.name, described, str(device))


def run_task(
    loaded: LoadedModel,
    task: Task,
    items: list[InputItem],
    decode: DecodeChoice,
    plan: OutputPlan,
    settings: LongformSettings,
    *,
    failed: list[SalmonnError] | None = None,
    skipped: int = 0,
    ranks: Ranks = ALONE,
) -> int:
    """Run `task` on each input in turn (skipping those already done); emit each result as it finishes;
    report each failure and go on. `failed`: inputs refused (and reported) before the model loaded, and
    `skipped`: inputs found done beforehand, both counted in the summary. Under a launcher, `items` is this
    rank's share and the summary is the whole job's, printed by rank 0. Returns the exit code: 0, or the first
    failure's."""
    from .batch import Tally

    failures: list[SalmonnError] = list(failed or [])
    tally = Tally(total=len(items) + len(failures) + skipped, failed=len(failures), skipped=skipped)
    stopped = False
    try:
        with _progress(len(items) if ranks.main else 0) as advance:
            for item in items:
                if plan.done(item.path):
                    tally.skipped += 1
                    advance(item.path, tally)
                    continue
                try:
                    record = answer_item(loaded, task, item, decode, settings)
                except SalmonnError as exc:
                    stderr.print(f"[red]salmonn: error:[/] {exc}")
                    failures.append(exc)
                    tally.failed += 1
                else:
                    with stop_deferred():  # a stop never cuts a result from its results.jsonl line or its count
                        plan.emit(record)
                        tally.done += 1
                        tally.audio_s += record.audio_seconds
                advance(item.path, tally)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the input in flight is dropped, the files written are whole
        stopped = True
        raise
    finally:
        if tally.total > 1 or plan.output_dir is not None:
            _summarise(tally, stopped, ranks)
    return failures[0].exit_code if failures else 0


def _summarise(tally, stopped: bool, ranks: Ranks) -> None:
    """The summary line: alone, this run's; under a launcher, the whole job's from rank 0 (every rank adds its
    counts). A stopped rank speaks for itself, without waiting on ranks that may be gone."""
    from .batch import Tally

    if not ranks.distributed:
        stderr.print(tally.summary(stopped))
    elif stopped:
        stderr.print(f"rank {ranks.rank} of {ranks.world}: {tally.summary(stopped)}")
    else:
        total, done, skipped, failed, audio_s = summed(ranks, [tally.total, tally.done, tally.skipped, tally.failed,
                                                               tally.audio_s])  # fmt: skip
        if ranks.main:
            job = Tally(int(total), int(done), int(skipped), int(failed), audio_s, started=tally.started)
            stderr.print(f"{ranks.world} processes, {job.summary()}")


@contextmanager
def _progress(total: int):
    """A live progress line on a terminal (files, audio time, x real time, ETA); nothing otherwise."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if total < 2 or not stderr.is_terminal:
        yield lambda path, tally: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=stderr, transient=True) as progress:
        task_id = progress.add_task("files", total=total, info="")

        def advance(path: Path, tally) -> None:
            info = f"{tally.audio_s / 3600:.2f} h audio, {tally.speed()}"
            progress.update(task_id, advance=1, description=path.name[:40], info=info)

        yield advance


def answer_item(
    loaded: LoadedModel, task: Task, item: InputItem, decode: DecodeChoice, settings: LongformSettings
) -> Record:
    """One input -> one Record: the whole file, in <= 30 s segments cut at pauses (silent ones not run)."""
    from ..audio import load_audio

    waveform = load_audio(item.audio_path)
    instruction = item.instruction or task.instruction
    answer = answer_waveform(loaded, task, waveform, instruction, decode, settings)
    if answer.skipped == "silence":
        warn(f"{item.path}: no audible content (silence); nothing to answer. Use --force to run the model anyway")
    return record_for(loaded, task, str(item.path), waveform, instruction, decode, answer)


def answer_waveform(
    loaded: LoadedModel,
    task: Task,
    waveform,
    instruction: str,
    decode: DecodeChoice,
    settings: LongformSettings,
    *,
    on_text=None,
    on_cue=None,
) -> FileAnswer:
    """`longform.answer_file` at the task's LoRA scale and the run's seed: what the command line and the server
    both run for one clip, so their answers are the same. `on_text`, `on_cue`: see `answer_file`."""
    from ..generate import seeded_generator
    from ..longform import answer_file

    generator = seeded_generator(decode.seed, loaded.model.device)
    with oom_hint(loaded):
        scale = decode.scale_for(task.lora_scale)
        return answer_file(loaded.model, waveform, instruction, decode.options, settings,
                           lora_scale=scale, generator=generator, on_text=on_text, on_cue=on_cue)  # fmt: skip


def record_for(
    loaded: LoadedModel, task: Task, file: str, waveform, instruction: str, decode: DecodeChoice, answer: FileAnswer
) -> Record:
    """The Record of one answered clip (what -f json prints and the subtitle writers read)."""
    from ..audio import SAMPLE_RATE

    scale = decode.scale_for(task.lora_scale)
    return Record(
        file=file,
        task=task.name,
        instruction=instruction,
        text=answer.text,
        model=loaded.name,
        checkpoint=loaded.checkpoint,
        quantization=loaded.quantization,
        lora_scale=scale if scale is not None else loaded.model.settings.trained_lora_scale,
        decode=asdict(decode.options),
        audio_seconds=round(waveform.shape[0] / SAMPLE_RATE, 3),
        timings={k: round(v, 4) for k, v in answer.timings.items()},
        token_count=answer.token_count,
        skipped=answer.skipped,
        checkpoint_sha256=loaded.checkpoint_sha256,
        segments=answer.cues,
        extra={"segments_total": answer.segments, "segments_answered": answer.answered},
    )


@contextmanager
def oom_hint(loaded: LoadedModel):
    """Out of GPU memory -> one sentence with what to try (exit 6)."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemoryError(
            f"out of GPU memory on {loaded.device} with the LLM {loaded.quantization}: try --quant 4bit, "
            "a smaller --batch-size, --beams or --max-new-tokens, or --model salmonn-7b"
        ) from None

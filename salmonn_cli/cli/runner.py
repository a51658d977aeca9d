"""What every task command does: open the model the options describe, run one instruction per input file,
print each result as it finishes, report each failure and go on; the exit code says whether any failed."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..errors import OutOfMemoryError, SalmonnError
from ..output import WRITERS, Record
from .options import DecodeChoice, ModelChoice

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


def offline_requested(choice: ModelChoice) -> bool:
    return choice.offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def open_model(choice: ModelChoice) -> LoadedModel:
    """Resolve the model's components (downloading what is missing unless offline) and load it, with progress."""
    from ..hub import resolve_components
    from ..loading import load_model, resolve_device
    from ..model_file import load_model_spec, with_local_components
    from .quant import pick_quantization

    spec = with_local_components(
        load_model_spec(choice.model),
        whisper=choice.whisper,
        beats=choice.beats,
        llm=choice.llm,
        checkpoint=choice.checkpoint,
    )
    paths = resolve_components(spec, offline=offline_requested(choice), download=not offline_requested(choice))
    device = resolve_device(choice.device)
    if device.type == "cpu" and choice.device == "auto":
        warn("no CUDA GPU found: running on the CPU, which is slow")
    quant = pick_quantization(choice.quant, choice.quant_backend, spec, device)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our status line says what is loading
    started = time.perf_counter()
    with stderr.status(f"Loading {spec.name} on {device} (LLM {quant.describe()})…"):
        model = load_model(
            paths.whisper,
            paths.beats,
            paths.llm,
            paths.checkpoint,
            device=str(device),
            quantization=quant.spec,
            second_per_window=spec.settings.second_per_window,
            second_stride=spec.settings.second_stride,
            qformer_heads=spec.settings.qformer_heads,
            lora_scale=spec.settings.lora_scale,
            prompt_template=spec.settings.prompt_template,
        )
    stderr.print(f"[dim]Loaded {spec.name} in {time.perf_counter() - started:.1f} s[/]")
    known_sha = None if spec.checkpoint.path else next((s.sha256 for s in spec.checkpoint.sources if s.sha256), None)
    return LoadedModel(model, spec.name, Path(paths.checkpoint).name, quant.describe(), str(device), known_sha)


def run_task(loaded: LoadedModel, task: Task, files: list[Path], decode: DecodeChoice, fmt: str, force: bool) -> int:
    """Run `task` on each file in turn; print each result; return the exit code (0, or the first failure's)."""
    writer = WRITERS[fmt]
    failures: list[tuple[Path, SalmonnError]] = []
    for path in files:
        try:
            record = answer_file(loaded, task, path, decode, force)
        except SalmonnError as exc:
            stderr.print(f"[red]salmonn: error:[/] {exc}")
            failures.append((path, exc))
            continue
        print(writer(record), flush=True)
    if failures and len(files) > 1:
        stderr.print(f"[red]{len(failures)} of {len(files)} inputs failed[/]")
    return failures[0][1].exit_code if failures else 0


def answer_file(loaded: LoadedModel, task: Task, path: Path, decode: DecodeChoice, force: bool) -> Record:
    """One input -> one Record (the model is not run on silent audio unless `force`)."""
    from ..audio import SAMPLE_RATE, WINDOW_SECONDS, is_silent, load_audio

    waveform = load_audio(path)
    seconds = waveform.shape[0] / SAMPLE_RATE
    if seconds > WINDOW_SECONDS:
        warn(f"{path}: {seconds:.0f} s long; the model hears the first {WINDOW_SECONDS:.0f} s")
    scale = decode.lora_scale if decode.lora_scale is not None else task.lora_scale
    effective_scale = scale if scale is not None else loaded.model.settings.trained_lora_scale
    base = dict(
        file=str(path),
        task=task.name,
        instruction=task.instruction,
        model=loaded.name,
        checkpoint=loaded.checkpoint,
        quantization=loaded.quantization,
        lora_scale=effective_scale,
        decode=decode.generate_kwargs(),
        audio_seconds=round(seconds, 3),
        checkpoint_sha256=loaded.checkpoint_sha256,
    )
    if not force and is_silent(waveform):
        warn(f"{path}: no audible content (silence); nothing to answer. Use --force to run the model anyway")
        return Record(text="", timings={}, token_count=0, skipped="silence", **base)
    result = _generate(loaded, waveform, task.instruction, decode, scale)
    timings = {k: round(v, 4) for k, v in vars(result.timings).items()}
    return Record(text=result.text.strip(), timings=timings, token_count=len(result.token_ids), **base)


def _generate(loaded: LoadedModel, waveform, instruction: str, decode: DecodeChoice, scale: float | None):
    import torch

    generator = None
    if decode.seed is not None:
        torch.manual_seed(decode.seed)
        generator = torch.Generator(device=loaded.model.device).manual_seed(decode.seed)
    try:
        return loaded.model.generate(
            waveform, instruction, lora_scale=scale, generator=generator, **decode.generate_kwargs()
        )
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemoryError(
            f"out of GPU memory on {loaded.device} with the LLM {loaded.quantization}: try --quant 4bit, "
            "a smaller --beams or --max-new-tokens, or --model salmonn-7b"
        ) from None

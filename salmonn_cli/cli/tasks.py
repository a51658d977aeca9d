"""The task commands: ask, transcribe, translate, caption, story. Each picks its instruction (the original's
test prompts, `prompt.TASK_INSTRUCTIONS`); `--instruction` or a jsonl manifest's per-file instruction overrides it.
Any length of audio: long files are cut at pauses into <= 30 s segments (see salmonn_cli.longform)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import UsageError
from ..longform import LongformSettings
from ..model_file import WAKE_UP_LORA_SCALE
from ..train.composed_file import is_composed_model_file
from ..window import WINDOW_SECONDS
from .batch import RESULTS_FILE
from .commands import (
    DECODE_OPTIONS,
    MODEL_OPTIONS,
    TASK_OPTIONS,
    WHOLE_OPTION,
    decode_choice,
    model_choice,
    with_options,
)
from .options import FileArg, OptionalFilesArg
from .runner import Task, open_model, resolve_model, run_task, stderr

if TYPE_CHECKING:
    from ..inputs import InputItem
    from ..probe import ProbedInputs

SPEECH_TASKS = ("transcribe", "translate")  # joined as running text, subtitles follow the speech

task_options = with_options(MODEL_OPTIONS, DECODE_OPTIONS, TASK_OPTIONS)
open_task_options = with_options(MODEL_OPTIONS, DECODE_OPTIONS, TASK_OPTIONS, WHOLE_OPTION)


def run(task: Task, files: list[Path], options: dict) -> None:
    """Shared tail of every task command: inputs, output plan, model; answer each input; exit code."""
    from ..inputs import expand_inputs

    items = expand_inputs(files, recursive=options["recursive"], glob=options["glob"], manifest=options["manifest"])
    run_items(task, items, options)


def run_items(task: Task, items: list[InputItem], options: dict) -> None:
    """Answer `items` (each with the task's instruction unless it has its own) as the options say: one process
    per GPU with --gpus, results to stdout or -o DIR (skipping those done). Exits non-zero if any failed."""
    from ..output import writer_for
    from ..probe import probe_inputs

    if options["gpus"] is not None:
        from .launch import run_on_gpus

        run_on_gpus(options["gpus"])  # the same command, one process per GPU; never returns
    fmt, writer = writer_for(options["format"])
    if options["instruction"] is not None:
        if not options["instruction"].strip():
            raise UsageError("--instruction is empty")
        task = replace(task, instruction=options["instruction"].strip())
    # every input's header is read before the model loads: the bad ones are reported now, the rest run
    with probe_inputs(items) as probed:
        _run_probed(task, probed, options, fmt, writer)


def longform_settings(task_name: str, chosen: LongformSettings) -> LongformSettings:
    """The user's long-audio settings as `task_name` runs them: speech tasks keep to the speech and join their
    segments as running text; the others answer every audible segment and label each line with its time."""
    speech = task_name in SPEECH_TASKS
    return replace(chosen, speech_only=speech, timestamped=not speech)


def _run_probed(task: Task, probed: ProbedInputs, options: dict, fmt: str, writer) -> None:
    """Report the inputs that cannot be read; run the rest (if any) with the model loaded once.

    Under a launcher (torchrun, `accelerate launch`) each rank runs its share of the inputs not yet done, on its
    own device, appending to its own results file; rank 0 folds those into results.jsonl at the end (and at the
    start, so a crashed job's are kept), and reports for the whole job."""
    from ..distributed import barrier, device_for, launched, main_first, process_group
    from .batch import RANK_RESULTS, OutputPlan, merge_results, unique_names

    ranks = launched()
    bad, good = probed.bad, probed.good
    for problem in bad.values() if ranks.main else ():
        stderr.print(f"[red]salmonn: error:[/] {problem}")
    failed_code = next(iter(bad.values())).exit_code if bad else 0  # the first problem's, as for later failures
    if not good:
        raise typer.Exit(failed_code)  # nothing to run
    if ranks.distributed and options["output_dir"] is None:
        raise UsageError(f"under a launcher ({ranks.world} processes), give -o DIR: each process writes its results "
                         "there")  # fmt: skip
    plan = OutputPlan(fmt, writer, options["output_dir"], options["overwrite"],
                      unique_names([item.path for item in good]),
                      RANK_RESULTS.format(rank=ranks.rank) if ranks.distributed else RESULTS_FILE)  # fmt: skip
    settings = longform_settings(task.name, LongformSettings(vad=options["vad"], batch_size=options["batch_size"],
                                                             force=options["force"], whole=options.get("whole", False)))
    if all(plan.done(item.path) for item in good):
        if ranks.main:
            if plan.output_dir is not None:
                merge_results(plan.output_dir)
            stderr.print(f"all {len(good)} inputs are already done in {plan.output_dir} (--overwrite redoes them)")
        if failed_code:
            raise typer.Exit(failed_code)
        return
    choice = model_choice(options)
    choice = replace(choice, device=device_for(ranks, choice.device))
    with process_group(ranks, choice.device):
        pending = [item for item in good if not plan.done(item.path)]
        if ranks.main and plan.output_dir is not None:
            merge_results(plan.output_dir)  # a crashed job's shards, before any rank appends to its own
        barrier(ranks)  # every rank has its list of what is left, and nothing has been written yet
        with main_first(ranks):  # rank 0 downloads what is missing; then every rank finds it in the cache
            if ranks.main and ranks.distributed and not is_composed_model_file(choice.model):
                resolve_model(choice)
        # many inputs or long ones decode long enough to repay compiling the decode step (`--compile auto`)
        loaded = open_model(choice, long_lived=len(pending) > 1 or probed.longer_than(WINDOW_SECONDS))
        # rank 0 counts the inputs refused and those found done, for the whole job's summary
        refused, found_done = (list(bad.values()), len(good) - len(pending)) if ranks.main else ([], 0)
        code = run_task(loaded, task, ranks.share(pending), decode_choice(options), plan, settings, failed=refused,
                        skipped=found_done, ranks=ranks)  # fmt: skip
        barrier(ranks)
        if ranks.main and plan.output_dir is not None:
            merge_results(plan.output_dir)  # the ranks' files (none alone)
    if code:
        raise typer.Exit(code)


@open_task_options
def ask(
    file: FileArg,
    question: Annotated[str, typer.Argument(help="Your question about the audio.", show_default=False)],
    options: dict,
) -> None:
    """Ask anything about an audio file: speech, sounds or music."""
    if not question.strip():
        raise UsageError("the question is empty")
    run(Task("ask", question.strip()), [file], options)


@task_options
def transcribe(
    files: OptionalFilesArg = None,
    lang: Annotated[str, typer.Option("--lang", "-l", help="Spoken language: en, zh, de or auto.")] = "en",
    options: dict = None,  # filled by task_options
) -> None:
    """Write down what is said (any length; -f srt/vtt for subtitles)."""
    from ..prompt import transcribe_instruction

    run(Task("transcribe", transcribe_instruction(lang)), files or [], options)


@task_options
def translate(
    files: OptionalFilesArg = None,
    to: Annotated[str, typer.Option("--to", "-t", help="Target language: a name (German) or code (de).")] = "",
    options: dict = None,
) -> None:
    """Translate the speech into another language."""
    from ..prompt import translate_instruction

    run(Task("translate", translate_instruction(to)), files or [], options)


@open_task_options
def caption(
    files: OptionalFilesArg = None,
    music: Annotated[bool, typer.Option("--music", help="Describe it as music.")] = False,
    options: dict = None,
) -> None:
    """Describe what can be heard (long audio: one line per segment, with its time)."""
    run(caption_task(music=music), files or [], options)


@open_task_options
def story(file: FileArg, options: dict) -> None:
    """Write a story inspired by the audio (LoRA scale 2.0 unless --lora-scale says otherwise)."""
    run(story_task(), [file], options)


def caption_task(*, music: bool = False) -> Task:
    """`salmonn caption`'s task (the web page's caption button runs it too)."""
    from ..prompt import TASK_INSTRUCTIONS

    name = "music" if music else "caption"
    return Task(name, TASK_INSTRUCTIONS[name])


def story_task() -> Task:
    """`salmonn story`'s task: the paper's prompt at the LoRA scale that wakes story-telling."""
    from ..prompt import TASK_INSTRUCTIONS

    return Task("story", TASK_INSTRUCTIONS["story"], lora_scale=WAKE_UP_LORA_SCALE)


def register(app: typer.Typer) -> None:
    for command in (ask, transcribe, translate, caption, story):
        app.command(command.__name__)(command)

"""The task commands: ask, transcribe, translate, caption, story. Each picks its instruction (the original's
test prompts, DESIGN.md section 1); `--instruction` overrides it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from ..output import WRITERS
from .commands import DECODE_OPTIONS, MODEL_OPTIONS, TASK_OPTIONS, decode_choice, model_choice, with_options
from .options import FileArg, FilesArg
from .runner import Task, open_model, run_task, stderr

STORY_LORA_SCALE = 2.0  # the paper: story-telling wakes up at about half the trained scaling

task_options = with_options(MODEL_OPTIONS, DECODE_OPTIONS, TASK_OPTIONS)


def run(task: Task, files: list[Path], options: dict) -> None:
    """Shared tail of every task command: validate, load, answer each file, exit with the right code."""
    if options["format"] not in WRITERS:
        raise UsageError(f"--format must be one of {', '.join(WRITERS)}; got {options['format']!r}")
    if options["instruction"] is not None:
        if not options["instruction"].strip():
            raise UsageError("--instruction is empty")
        task = replace(task, instruction=options["instruction"].strip())
    missing = [str(f) for f in files if not f.is_file()]
    if missing and len(missing) == len(files):
        from ..errors import AudioError

        raise AudioError(f"audio file not found: {', '.join(missing)}")
    loaded = open_model(model_choice(options))
    code = run_task(loaded, task, files, decode_choice(options), options["format"], options["force"])
    if code:
        raise typer.Exit(code)


@task_options
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
    files: FilesArg,
    lang: Annotated[str, typer.Option("--lang", "-l", help="Spoken language: en, zh, de or auto.")] = "en",
    options: dict = None,  # filled by task_options
) -> None:
    """Write down what is said."""
    from ..prompt import transcribe_instruction

    run(Task("transcribe", transcribe_instruction(lang)), files, options)


@task_options
def translate(
    files: FilesArg,
    to: Annotated[str, typer.Option("--to", "-t", help="Target language: a name (German) or code (de).")],
    options: dict = None,
) -> None:
    """Translate the speech into another language."""
    from ..prompt import translate_instruction

    run(Task("translate", translate_instruction(to)), files, options)


@task_options
def caption(
    files: FilesArg,
    music: Annotated[bool, typer.Option("--music", help="Describe it as music.")] = False,
    options: dict = None,
) -> None:
    """Describe what can be heard."""
    from ..prompt import TASK_INSTRUCTIONS

    name = "music" if music else "caption"
    run(Task(name, TASK_INSTRUCTIONS[name]), files, options)


@task_options
def story(file: FileArg, options: dict) -> None:
    """Write a story inspired by the audio (LoRA scale 2.0 unless --lora-scale says otherwise)."""
    from ..prompt import TASK_INSTRUCTIONS

    run(Task("story", TASK_INSTRUCTIONS["story"], lora_scale=STORY_LORA_SCALE), [file], options)


def register(app: typer.Typer) -> None:
    for command in (ask, transcribe, translate, caption, story):
        app.command(command.__name__)(command)


__all__ = ["register", "stderr"]

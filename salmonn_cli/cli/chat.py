"""`salmonn chat FILE`: many questions about one clip. The audio is encoded once; each question reuses its audio
tokens. `/file PATH` switches audio, `/quit` (or end of input) leaves. Errors in a turn never end the chat."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..errors import AudioError
from .commands import DECODE_OPTIONS, MODEL_OPTIONS, decode_choice, model_choice, with_options
from .options import FileArg
from .runner import LoadedModel, open_model, stderr, warn

HELP = "Ask a question about the audio. /file PATH switches to another file, /quit leaves."


def _encode(loaded: LoadedModel, path: Path):
    from ..audio import is_silent, load_audio

    waveform = load_audio(path)
    if is_silent(waveform):
        warn(f"{path}: no audible content (silence)")
    with stderr.status(f"Listening to {path}…"):
        return loaded.model.audio_tokens(waveform)


def _read_line(interactive: bool) -> str | None:
    if interactive:
        stderr.print("[bold cyan]you>[/] ", end="")
    line = sys.stdin.readline()
    return None if line == "" else line.strip()


@with_options(MODEL_OPTIONS, DECODE_OPTIONS)
def chat(file: FileArg, options: dict) -> None:
    """Talk about an audio file, one question after another."""
    from ..generate import seeded_generator

    loaded = open_model(model_choice(options), long_lived=True)  # a conversation
    tokens = _encode(loaded, file)
    decode = decode_choice(options)
    interactive = sys.stdin.isatty()
    if interactive:
        stderr.print(f"[dim]{HELP}[/]")
    while (line := _read_line(interactive)) is not None:
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            break
        if line == "/help":
            stderr.print(HELP)
            continue
        if line.startswith("/file"):
            path = Path(line.removeprefix("/file").strip())
            try:
                tokens = _encode(loaded, path)
                stderr.print(f"[dim]now listening to {path}[/]")
            except AudioError as exc:
                stderr.print(f"[red]salmonn: error:[/] {exc}")
            continue
        if line.startswith("/"):
            stderr.print(f"[red]unknown command {line.split()[0]}[/]: {HELP}")
            continue
        generator = seeded_generator(decode.seed, loaded.model.device)  # each answer as if it were the first
        result = loaded.model.answer(tokens, line, decode.options, lora_scale=decode.lora_scale, generator=generator)
        print(result.text.strip(), flush=True)


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)

"""`salmonn bench`: speed and memory of a model shape (random weights) or of real checkpoints.

The options are the bench's own (salmonn_cli.bench.runner, shared with scripts/bench.py), passed through
as they are; `salmonn bench --help` lists them without importing torch.
"""

from __future__ import annotations

import typer

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def bench(ctx: typer.Context) -> None:
    """Measure load time, memory, encoder times, time to first token and tokens/s (see `salmonn bench --help`)."""
    from ..bench.runner import main

    try:
        code = main(list(ctx.args), prog="salmonn bench")
    except SystemExit as exc:  # argparse: --help, or a usage error it has already printed
        code = exc.code if isinstance(exc.code, int) else 2
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("bench", context_settings=_PASS_THROUGH)(bench)

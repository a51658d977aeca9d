"""`salmonn bench`: the repository's benchmark (benchmarks/, run by scripts/bench.py), from a source checkout.

The benchmark is a tool of the repository, not part of the installed package: this command only finds it next
to the package and passes the options on as they are, importing it when it runs (`--help` loads no torch).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..errors import DependencyError

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding salmonn_cli, in a source checkout


def bench(ctx: typer.Context) -> None:
    """Measure load time, memory, encoder times, time to first token and tokens/s (see `salmonn bench --help`)."""
    if not (CHECKOUT / "benchmarks" / "runner.py").is_file():
        raise DependencyError(
            "salmonn bench runs the benchmark of a source checkout (benchmarks/), which this installation does not"
            " have: clone the repository and run python scripts/bench.py there"
        )
    sys.path.insert(0, str(CHECKOUT))
    from benchmarks.runner import main

    try:
        code = main(list(ctx.args), prog="salmonn bench")
    except SystemExit as exc:  # argparse: --help, or a usage error it has already printed
        code = exc.code if isinstance(exc.code, int) else 2
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("bench", context_settings=_PASS_THROUGH)(bench)

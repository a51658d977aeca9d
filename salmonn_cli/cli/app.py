"""The `salmonn` command. Commands register here; heavy imports happen inside the commands that need them.

One table (`salmonn_cli.errors`) gives every user error its exit code; `main()` applies it, so a user sees
one clear line on stderr and no traceback (set SALMONN_DEBUG=1 to see it).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Annotated, Optional

import typer

from .. import __version__
from ..errors import EXIT_INTERRUPTED, EXIT_TERMINATED, OutOfMemoryError, SalmonnError
from ..stop import interrupted_exit, sigterm_as_interrupt

app = typer.Typer(
    name="salmonn",
    help="Local, offline audio understanding with the SALMONN audio LLM: speech, sounds and music.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"salmonn {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Local, offline audio understanding with the SALMONN audio LLM."""


def _register_commands() -> None:
    from . import bench, chat, evaluate, finetune, info, live, serve, tasks, train

    tasks.register(app)
    chat.register(app)
    live.register(app)
    serve.register(app)
    finetune.register(app)
    train.register(app)
    evaluate.register(app)
    info.register(app)
    bench.register(app)


_register_commands()


def _stopped() -> int:
    """Ctrl-C (exit 130) or SIGTERM (exit 143): one line saying which."""
    code, word = interrupted_exit()
    print(f"salmonn: {word}", file=sys.stderr)
    return code


def console() -> None:
    """The `salmonn` command: `main()`, then exit. After a stop, without waiting for a library's worker thread
    (huggingface_hub fetches a folder's files in a thread pool, which would go on downloading for minutes
    after Ctrl-C): nothing of ours is left to do then, and a half-fetched file resumes on the next run."""
    code = main()
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED) and _workers_alive():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _workers_alive() -> bool:
    main_thread = threading.main_thread()
    return any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not main_thread)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app and turn our errors into one line and an exit code."""
    from .runner import show_notices

    debug = os.environ.get("SALMONN_DEBUG") == "1"
    sigterm_as_interrupt()
    show_notices()
    try:
        # outside standalone mode the parser returns a command's typer.Exit code instead of raising it
        code = app(args=argv, prog_name="salmonn", standalone_mode=False)
        if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C in a command into a silent Exit(130)
            return _stopped()
        if isinstance(code, int):
            return code
    except SalmonnError as exc:
        if debug:
            raise
        print(f"salmonn: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except MemoryError:
        if debug:
            raise
        print(
            "salmonn: error: out of memory (host RAM): try --quant 8bit or 4bit, or --model salmonn-7b", file=sys.stderr
        )
        return OutOfMemoryError.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        return _stopped()
    except typer.Exit as exc:
        return _stopped() if exc.exit_code == EXIT_INTERRUPTED else exc.exit_code
    except typer.Abort:  # the parser turns Ctrl-C inside a command into Abort
        return _stopped()
    except typer.TyperException as exc:  # usage errors from the command-line parser: they print themselves
        exc.show()
        return getattr(exc, "exit_code", 2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`salmonn serve`: the model behind an OpenAI-compatible HTTP API (salmonn_cli.serve), run by uvicorn.

The address is bound before the model loads (a busy port is one line in a second, not after a load), and
listened on once it has: then exactly one line goes to stdout, `listening on http://HOST:PORT`, with the real
port (`--port 0` picks a free one). Ctrl-C and SIGTERM stop it gracefully: no new connections, queued requests
answered 503, the running one stopped at its next decode step; then it exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from typing import Annotated, Optional

import typer

from ..errors import AddressError, DependencyError, UsageError
from ..longform import LongformSettings
from .commands import DECODE_OPTIONS, MODEL_OPTIONS, decode_choice, model_choice, with_options
from .options import BatchSizeOpt, ForceOpt, VadOpt
from .runner import open_model, stderr, warn

SERVE_PANEL = "Server"
GRACE_S = 10  # after a stop, how long open connections get to finish before they are cut
_LONGFORM = LongformSettings()
LONGFORM_OPTIONS: dict[str, tuple[object, object]] = {
    "vad": (VadOpt, _LONGFORM.vad),
    "batch_size": (BatchSizeOpt, _LONGFORM.batch_size),
    "force": (ForceOpt, _LONGFORM.force),
}
SERVE_PACKAGES = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart"))


def _require_server_packages() -> None:
    import importlib.util

    absent = [name for module, name in SERVE_PACKAGES if importlib.util.find_spec(module) is None]
    if absent:
        raise DependencyError(f"salmonn serve needs {', '.join(absent)}: pip install 'salmonn-cli[serve]'")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening), or one line saying why it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]  # fmt: skip
    except socket.gaierror:
        raise AddressError(f"cannot listen on {host}: no such address") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "the port is in use (--port 0 picks a free one)" if exc.errno == 98 else exc.strerror
        raise AddressError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, announcing itself once listening, and stopping the worker on a signal. uvicorn would
        re-raise the signal after its graceful stop (exit 130/143); a server asked to stop has done its job: 0."""

        def __init__(self, config, announce, on_stop) -> None:
            super().__init__(config)
            self._announce, self._on_stop = announce, on_stop

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                self._announce()

        @contextlib.contextmanager
        def capture_signals(self):
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            self._on_stop()
            super().handle_exit(sig, frame)

    return Server


@with_options(MODEL_OPTIONS, DECODE_OPTIONS, LONGFORM_OPTIONS)
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).",
                                      rich_help_panel=SERVE_PANEL)] = "127.0.0.1",  # fmt: skip
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).",
                                      rich_help_panel=SERVE_PANEL)] = 8000,  # fmt: skip
    api_key: Annotated[Optional[str], typer.Option(envvar="SALMONN_API_KEY", show_envvar=True,
                                                   help="Require Authorization: Bearer KEY on /v1.",
                                                   rich_help_panel=SERVE_PANEL)] = None,  # fmt: skip
    model_alias: Annotated[Optional[list[str]], typer.Option(help="Another name clients may use (whisper-1), "
                                                             "repeatable.", rich_help_panel=SERVE_PANEL)] = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest upload (chat: its base64).",
                                                 rich_help_panel=SERVE_PANEL)] = 100.0,  # fmt: skip
    max_audio_minutes: Annotated[float, typer.Option(min=0.001, help="Longest audio a request may send.",
                                                     rich_help_panel=SERVE_PANEL)] = 120.0,  # fmt: skip
    queue: Annotated[int, typer.Option(min=0, help="Requests that may wait behind the running one (more: 503).",
                                       rich_help_panel=SERVE_PANEL)] = 16,  # fmt: skip
    cors_origin: Annotated[Optional[list[str]], typer.Option(help="A web origin allowed to call the API from a "
                                                             "browser; repeatable (default: none).",
                                                             rich_help_panel=SERVE_PANEL)] = None,  # fmt: skip
    options: dict = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (transcriptions, translations, chat with audio)."""
    _require_server_packages()
    from ..serve.config import ServeConfig, is_loopback

    aliases = tuple(dict.fromkeys(model_alias or ()))
    if any(not alias.strip() for alias in aliases):
        raise UsageError("--model-alias is empty")
    if not is_loopback(host) and not api_key:
        warn(f"listening on {host} without --api-key: anyone who can reach this machine can use the model")
    sock = bind(host, port)
    try:
        loaded = open_model(model_choice(options), long_lived=True)
        config = ServeConfig(
            served_name=loaded.name,
            aliases=tuple(a for a in aliases if a != loaded.name),
            host=host,
            api_key=api_key,
            max_upload_bytes=round(max_upload_mb * 2**20),
            max_audio_seconds=max_audio_minutes * 60,
            queue=queue,
            cors_origins=tuple(cors_origin or ()),
            decode=decode_choice(options),
            longform=LongformSettings(vad=options["vad"], batch_size=options["batch_size"], force=options["force"]),
        )
        _run(loaded, config, sock)
    finally:
        sock.close()


def _run(loaded, config, sock: socket.socket) -> None:
    import uvicorn

    from ..serve.app import create_app
    from ..serve.inference import ServedModel
    from ..serve.worker import InferenceWorker

    worker = InferenceWorker(config.queue)
    app = create_app(ServedModel(loaded, config), worker, config)
    uvicorn_config = uvicorn.Config(app, log_config=None, access_log=False, log_level="warning", lifespan="off",
                                    timeout_graceful_shutdown=GRACE_S)  # fmt: skip
    url = url_of(sock)

    def announce() -> None:
        print(f"listening on {url}", flush=True)
        stderr.print(f"[dim]serving {', '.join(config.model_ids)} at {url}/v1 (Ctrl-C stops)[/]")

    def stop_worker() -> None:  # from a signal handler: in a thread, as the handler may have cut one holding a lock
        threading.Thread(target=worker.stop, name="salmonn-stop", daemon=True).start()

    server = _server_class()(uvicorn_config, announce, stop_worker)
    server.run(sockets=[sock])
    worker.stop()
    worker.join(timeout_s=GRACE_S)
    stderr.print("[dim]salmonn serve: stopped[/]")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)

"""A local stand-in for the Hugging Face Hub, speaking the parts of its HTTP protocol huggingface_hub uses.

Learned from huggingface_hub's own code (2.x):
- `HfApi.repo_info`: GET /api/{models|spaces|datasets}/{repo}/revision/{rev} -> JSON with `id` and `sha`.
- `list_repo_tree` (snapshot_download): GET /api/{type}s/{repo}/tree/{rev}?recursive=True&expand=False -> JSON
  list of {"type": "file", "path", "size", "oid"}; pagination is a `Link: <...>; rel="next"` header (not needed).
- `hf_hub_download`: HEAD /{repo}/resolve/{rev}/{path} (spaces/datasets prefixed `spaces/`, `datasets/`) needs
  `X-Repo-Commit` and an `ETag` (or `X-Linked-Etag`; it names the blob in the cache) and the size
  (`X-Linked-Size` or `Content-Length`); then GET of the same URL, with `Range: bytes=N-` when it resumes
  after a dropped connection (answered 206 + `Content-Range`).
- Errors are told apart by `X-Error-Code`: RepoNotFound, RevisionNotFound, EntryNotFound.

Switches: `missing` (repos answering 404), `malformed` (repos whose API answers JSON of the wrong shape),
`drop_once` (files whose first GET is cut after so many bytes), `corrupt` (files served with wrong bytes),
`hold` (files whose GET sends half the bytes, sets `held`, and waits for `released`: a download in flight).
Every request is recorded in `requests`.

Also runnable as `python -m tests.hub_server resolve|download|status MODEL_TOML [--offline] [--no-download]`:
the driver the tests run in a subprocess, so that huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE
at import, as in real use.
It prints one JSON object: {"ok": ...} or {"error": {"type", "message", "exit_code"}}.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

URL_PREFIX = {"model": "", "space": "spaces/", "dataset": "datasets/"}
API_TYPES = {"models": "model", "spaces": "space", "datasets": "dataset"}


@dataclass
class FakeRepo:
    """A repo at one commit: path -> bytes."""

    repo_id: str
    files: dict[str, bytes]
    repo_type: str = "model"

    @property
    def sha(self) -> str:
        return hashlib.sha1(f"{self.repo_type}/{self.repo_id}".encode()).hexdigest()


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class HubServer:
    """Threaded HTTP server on 127.0.0.1 serving `repos`; use as a context manager."""

    repos: list[FakeRepo]
    missing: set[str] = field(default_factory=set)
    drop_once: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the cut
    corrupt: set[str] = field(default_factory=set)
    malformed: set[str] = field(default_factory=set)  # repo ids whose API answers are JSON of the wrong shape
    hold: set[str] = field(default_factory=set)
    held: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._dropped: set[str] = set()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True  # a stuck client never keeps the test process alive
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()  # a held download must not outlive the server
        self._httpd.shutdown()
        self._httpd.server_close()

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def take_drop(self, path: str) -> int | None:
        """The cut point the first time `path` is asked for while it is in `drop_once`, else None."""
        with self._lock:
            if path in self.drop_once and path not in self._dropped:
                self._dropped.add(path)
                return self.drop_once[path]
            return None

    def find(self, repo_type: str, repo_id: str) -> FakeRepo | None:
        if repo_id in self.missing:
            return None
        return next((r for r in self.repos if r.repo_id == repo_id and r.repo_type == repo_type), None)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response has a Content-Length

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        url = urlsplit(self.path)
        self.hub.record(Request(self.command, url.path, self.headers.get("Range")))
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[0] == "api" and len(parts) >= 6 and parts[1] in API_TYPES:
            self._api(API_TYPES[parts[1]], "/".join(parts[2:4]), parts[4], parts[5], body)
            return
        repo_type = {"spaces": "space", "datasets": "dataset"}.get(parts[0], "model")
        parts = parts[1:] if repo_type != "model" else parts
        if len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(repo_type, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
            return
        self._error(404, "RepoNotFound", body)

    def _repo_at(self, repo_type: str, repo_id: str, revision: str, body: bool) -> FakeRepo | None:
        repo = self.hub.find(repo_type, repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", body)
        elif revision not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", body, repo)
            repo = None
        return repo

    def _api(self, repo_type: str, repo_id: str, action: str, revision: str, body: bool) -> None:
        repo = self._repo_at(repo_type, repo_id, revision, body)
        if repo is None:
            return
        if action == "revision":
            payload = {"id": repo.repo_id, "sha": repo.sha, "siblings": [{"rfilename": p} for p in repo.files]}
        elif action == "tree":
            payload = [
                {"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for p, data in sorted(repo.files.items())
            ]
        else:
            self._error(404, "EntryNotFound", body, repo)
            return
        if repo.repo_id in self.hub.malformed:  # an object where a list belongs, and the other way round
            payload = [payload] if isinstance(payload, dict) else {"files": payload}
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, body: bool) -> None:
        repo = self._repo_at(repo_type, repo_id, revision, body)
        if repo is None:
            return
        data = repo.files.get(path)
        if data is None:
            self._error(404, "EntryNotFound", body, repo)
            return
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        if path in self.hub.corrupt:
            data = bytes(b ^ 0xFF for b in data)  # same length, wrong bytes
        start = _range_start(self.headers.get("Range"))
        if body and start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send(206, data[start:], headers, body)
        elif body and (cut := self.hub.take_drop(path)) is not None:
            self._send_cut(data, cut, headers)
        elif body and path in self.hub.hold and not self.hub.released.is_set():
            self._send_held(data, headers)
        else:
            self._send(200, data, headers, body)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _send_cut(self, data: bytes, cut: int, headers: dict[str, str]) -> None:
        """Announce the whole file, send `cut` bytes of it, then close the connection: a network drop mid-file."""
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:cut])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def _send_held(self, data: bytes, headers: dict[str, str]) -> None:
        """Announce the whole file, send half of it, and wait for `released` before the rest."""
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.hub.held.set()
        self.hub.released.wait(timeout=120)
        try:
            self.wfile.write(data[len(data) // 2 :])
        except OSError:  # the client went away meanwhile
            self.close_connection = True

    def _error(self, status: int, code: str, body: bool, repo: FakeRepo | None = None) -> None:
        headers = {"X-Error-Code": code, "Content-Type": "application/json"}
        if repo is not None:
            headers["X-Repo-Commit"] = repo.sha
        self._send(status, json.dumps({"error": code}).encode(), headers, body)


def _range_start(header: str | None) -> int:
    """`bytes=N-` -> N (the only form huggingface_hub sends when it resumes)."""
    if not header or not header.startswith("bytes="):
        return 0
    return int(header[len("bytes=") :].split("-")[0] or 0)


# ---------------------------------------------------------------- the subprocess driver
def _drive(argv: list[str]) -> dict:
    from salmonn_cli import hub
    from salmonn_cli.model_file import load_model_spec

    action, model = argv[0], argv[1]
    spec = load_model_spec(model)
    if action == "status":
        return {"ok": [_status_json(s) for s in hub.cache_status(spec)]}
    if action == "download":  # the public entry points: download() -> resolve_components() -> ComponentPaths
        paths = hub.download(spec, progress=lambda line: print(line, file=sys.stderr))
        return {"ok": {name: str(getattr(paths, name)) for name in ("whisper", "beats", "llm", "checkpoint")}}
    used: dict[str, dict] = {}
    for component in spec.components:
        found = hub.resolve_component(
            component,
            model_arg=spec.model_arg,
            offline="--offline" in argv,
            download="--no-download" not in argv,
        )
        used[found.name] = {"path": str(found.path), "source": found.source, "downloaded": found.downloaded}
    return {"ok": used}


def _status_json(status) -> dict:
    return {
        "name": status.name,
        "source": status.source,
        "cached": status.cached,
        "size_bytes": status.size_bytes,
        "expected_bytes": status.expected_bytes,
    }


def main(argv: list[str]) -> int:
    from salmonn_cli.errors import SalmonnError

    try:
        result = _drive(argv)
    except SalmonnError as exc:
        result = {"error": {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Where a model's components are on disk: local paths, or the Hugging Face cache (downloading what is missing).

Rules: a cached component is used without touching the network; offline mode (`offline=True` or
`HF_HUB_OFFLINE=1`) never touches it; several sources are tried in order (a missing repo or an unreachable
server moves on to the next); a single file is checked against its size and sha256 after download and on
every later run, the verdict being remembered next to the file so a 400 MB hash is computed once.
huggingface_hub does the transfers, its cache layout and its progress bars (on stderr).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TypeVar

from .atomic import write_text_atomically
from .errors import CheckpointError
from .model_file import ComponentPaths, ComponentSpec, HubSource, ModelSpec

Progress = Callable[[str], None]
T = TypeVar("T")
VERIFIED_SUFFIX = ".sha256-ok"
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")  # a Hugging Face model folder needs one of these and config.json
_HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class ResolvedComponent:
    """A component found on disk, and where it came from (`local` or the Hub source that was used)."""

    name: str
    path: Path
    source: str
    downloaded: bool = False


@dataclass(frozen=True)
class ComponentStatus:
    """What `salmonn models` shows per component: where it comes from, whether it is here, and how big it is."""

    name: str
    source: str
    cached: bool
    size_bytes: int  # on disk; 0 when not cached
    expected_bytes: int | None
    path: Path | None


def is_offline(offline: bool = False) -> bool:
    """True when the caller asked for offline mode or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    # constants reads the variable at import time; the environment may have changed since
    return offline or constants.HF_HUB_OFFLINE or any(f and f.lower() in ("1", "true", "yes", "on") for f in flags)


def hub_endpoint() -> str:
    """The Hub address huggingface_hub talks to (HF_ENDPOINT or https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def resolve_components(
    spec: ModelSpec, *, offline: bool = False, download: bool = True, progress: Progress | None = None
) -> ComponentPaths:
    """Local paths of the four components of `spec`: local ones checked, Hub ones from the cache or downloaded.

    offline (or HF_HUB_OFFLINE=1): only the cache is read, nothing is sent. download=False: a component that
    is not cached is an error instead of a download. progress: called with one line per notable step
    (which source is fetched, which fallback was used). Every failure is a CheckpointError (exit 4).
    """
    found = {
        c.name: resolve_component(c, model_arg=spec.model_arg, offline=offline, download=download, progress=progress)
        for c in spec.components
    }
    return ComponentPaths(**{name: r.path for name, r in found.items()})


def download(spec: ModelSpec, progress: Progress | None = None) -> ComponentPaths:
    """Fetch every Hub component of `spec` that is not cached yet (and verify every file); return the paths."""
    return resolve_components(spec, offline=False, download=True, progress=progress)


def resolve_component(
    component: ComponentSpec,
    *,
    model_arg: str,
    offline: bool = False,
    download: bool = True,
    progress: Progress | None = None,
) -> ResolvedComponent:
    """One component -> its path on disk (see `resolve_components`); says which source was used."""
    if component.path is not None:
        return ResolvedComponent(component.name, _check_local(component), source="local")
    for source in component.sources:  # the cache first, in source order: no network for what is here
        cached = cached_path(source)
        if cached is not None:
            _verify(component, source, cached, model_arg)
            return ResolvedComponent(component.name, cached, source=source.describe())
    what = f"the {component.name} component ({component.describe()})"
    if is_offline(offline):
        run = f"run `salmonn download --model {model_arg}` while online"
        raise CheckpointError(f"{what} is not in the cache and offline mode is on: {run}")
    if not download:
        raise CheckpointError(f"{what} is not downloaded yet: run `salmonn download --model {model_arg}`")
    return _download_component(component, model_arg, progress or _quiet)


def cache_status(spec: ModelSpec) -> list[ComponentStatus]:
    """Per component: the source that is cached (or the first one), whether it is on disk, and its size there."""
    statuses = []
    for component in spec.components:
        if component.path is not None:
            here = component.path.exists()
            size = _disk_size(component.path) if here else 0
            statuses.append(
                ComponentStatus(component.name, str(component.path), here, size, component.size, component.path)
            )
            continue
        hits = ((s, cached_path(s)) for s in component.sources)
        source, path = next(((s, p) for s, p in hits if p is not None), (component.sources[0], None))
        statuses.append(
            ComponentStatus(
                component.name,
                source.describe(),
                path is not None,
                _disk_size(path) if path is not None else 0,
                source.size if source.size is not None else component.display_size,
                path,
            )
        )
    return statuses


def cached_path(source: HubSource) -> Path | None:
    """Where `source` is in the huggingface_hub cache, complete, or None. Reads the disk only."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    if source.is_file:
        hit = try_to_load_from_cache(source.repo, source.file, revision=source.revision, repo_type=source.repo_type)
        return Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None
    try:
        root = snapshot_download(
            source.repo,
            repo_type=source.repo_type,
            revision=source.revision,
            allow_patterns=source.allow_patterns(),
            local_files_only=True,
        )
    except (LocalEntryNotFoundError, OSError):  # not cached, or a cached listing says files are missing
        return None
    folder = Path(root) / source.folder if source.folder else Path(root)
    return folder if _folder_complete(folder) else None


# ---------------------------------------------------------------- downloading
def _download_component(component: ComponentSpec, model_arg: str, progress: Progress) -> ResolvedComponent:
    failures: list[tuple[HubSource, str, bool]] = []
    for index, source in enumerate(component.sources):
        progress(f"{component.name}: fetching {source.describe()}")
        try:
            path = _fetch(source)
        except _SourceFailed as failed:
            failures.append((source, failed.reason, failed.unreachable))
            if index + 1 < len(component.sources):
                progress(f"{component.name}: {source.describe()} failed ({failed.reason}); trying the next source")
            continue
        if not source.is_file and not _folder_complete(path):
            failures.append((source, f"the folder lacks config.json or weights ({path})", False))
            continue
        _verify(component, source, path, model_arg)
        if failures:
            progress(f"{component.name}: used {source.describe()}")
        return ResolvedComponent(component.name, path, source=source.describe(), downloaded=True)
    if all(unreachable for _, _, unreachable in failures):
        raise CheckpointError(
            f"cannot reach the Hub (HF_ENDPOINT={hub_endpoint()}) to download the {component.name} component:"
            " check the network, or run with the component already in the cache"
        )
    tried = "; ".join(f"{s.describe()}: {reason}" for s, reason, _ in failures)
    raise CheckpointError(f"could not download the {component.name} component from any source (tried {tried})")


class _SourceFailed(Exception):
    def __init__(self, reason: str, unreachable: bool) -> None:
        super().__init__(reason)
        self.reason, self.unreachable = reason, unreachable


def _fetch(source: HubSource) -> Path:
    """Download one source into the cache (resuming within the run after a dropped connection)."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        # A cheap probe first: it fails at once when the server is unreachable, where the file download
        # would back off and retry for half a minute before giving up.
        HfApi().repo_info(source.repo, repo_type=source.repo_type, revision=source.revision)
        if source.is_file:
            return Path(hf_hub_download(source.repo, source.file, repo_type=source.repo_type, revision=source.revision))
        root = _stoppable(lambda: snapshot_download(
            source.repo, repo_type=source.repo_type, revision=source.revision, allow_patterns=source.allow_patterns()
        ))  # fmt: skip
    except _download_errors() as exc:  # every way one source can fail is a reason to try the next
        raise _SourceFailed(*_classify(exc)) from exc
    return Path(root) / source.folder if source.folder else Path(root)


def _stoppable(call: Callable[[], T]) -> T:
    """`call()` in a thread of its own, waited for where Ctrl-C and SIGTERM can cut the wait.

    snapshot_download fetches a folder's files in a thread pool, and on Ctrl-C the pool's shutdown would hold the
    main thread until every file is in; here the stop reaches the command at once (the `salmonn` entry point then
    exits without waiting for the pool; a half-fetched file resumes on the next run).
    """
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the caller's thread as it is
            outcome.append((False, exc))

    # not a daemon: neither are the pool's threads it starts, so the entry point sees them after a stop
    worker = threading.Thread(target=run, name="salmonn-download")
    worker.start()
    worker.join()  # a signal interrupts this wait (lock waits are interruptible on POSIX)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _classify(exc: Exception) -> tuple[str, bool]:
    """(a short reason, whether the server could not be reached at all) for a failed download."""
    from huggingface_hub import errors

    if isinstance(exc, errors.RepositoryNotFoundError):
        return "repository not found (or private/gated)", False
    if isinstance(exc, errors.RevisionNotFoundError):
        return "revision not found", False
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return "file not found in the repository", False
    if isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return f"HTTP {status}", False
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return "offline mode is on", True
    if isinstance(exc, (errors.LocalEntryNotFoundError, ConnectionError, TimeoutError)) or _is_transport_error(exc):
        return f"cannot reach the Hub (HF_ENDPOINT={hub_endpoint()})", True
    if isinstance(exc, (*_MALFORMED_ANSWER, json.JSONDecodeError)):
        return f"a malformed answer from the Hub (HF_ENDPOINT={hub_endpoint()}; {type(exc).__name__})", False
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "), False


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's network errors: huggingface_hub 1.x/2.x speak httpx2/httpx, older releases requests."""
    found = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _download_errors() -> tuple[type[BaseException], ...]:
    """What a download from one source can raise: Hub errors (HTTP statuses, missing entries), the network,
    the disk (OSError covers ConnectionError and TimeoutError too) and malformed answers (ValueError)."""
    from huggingface_hub import errors

    hub = (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)
    return (*hub, OSError, ValueError, *_MALFORMED_ANSWER, *_transport_errors())


# What huggingface_hub raises when a server's JSON has the wrong shape (an object where a list belongs, a
# missing field): `string indices must be integers`, KeyError 'sha', ... A mirror's bug, not ours: one source failed.
_MALFORMED_ANSWER = (TypeError, KeyError, AttributeError)


def _is_transport_error(exc: Exception) -> bool:
    return isinstance(exc, _transport_errors())


# ---------------------------------------------------------------- checks
def _check_local(component: ComponentSpec) -> Path:
    path = component.path
    if component.is_folder:
        if not path.is_dir():
            raise CheckpointError(f"the {component.name} folder {path} does not exist or is not a folder")
        if not _folder_complete(path):
            raise CheckpointError(
                f"the {component.name} folder {path} is not a Hugging Face model folder (no config.json or weights)"
            )
    elif not path.is_file():
        raise CheckpointError(f"the {component.name} file {path} does not exist or is not a file")
    return path


def _folder_complete(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    return any(f.is_file() and any(fnmatch(f.name, p) for p in _WEIGHT_PATTERNS) for f in folder.iterdir())


def _verify(component: ComponentSpec, source: HubSource, path: Path, model_arg: str) -> None:
    """Size and sha256 of a single-file source; a good verdict is remembered next to the file."""
    if not source.is_file or (source.size is None and source.sha256 is None):
        return
    real = Path(os.path.realpath(path))
    stat = real.stat()
    remove = f"`rm {' '.join(shlex.quote(str(p)) for p in dict.fromkeys((path, real)))}`"
    again = f"run `salmonn download --model {model_arg}` again"
    if source.size is not None and stat.st_size != source.size:
        raise CheckpointError(
            f"the {component.name} file {source.file} from {source.repo} is {stat.st_size} bytes, expected"
            f" {source.size}; the download is corrupt: delete it with {remove} and {again}"
        )
    if source.sha256 is None or _verified(real, stat, source.sha256):
        return
    got = sha256_of(real)
    if got != source.sha256:
        raise CheckpointError(
            f"the {component.name} file {source.file} from {source.repo} has sha256 {got}, expected"
            f" {source.sha256}; the download is corrupt: delete it with {remove} and {again}"
        )
    _remember(real, stat, got)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _marker(real: Path) -> Path:
    return real.with_name(real.name + VERIFIED_SUFFIX)


def _verified(real: Path, stat: os.stat_result, sha256: str) -> bool:
    """True when a marker says this very file (same path, size and mtime) already hashed to `sha256`."""
    try:
        record = json.loads(_marker(real).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record == {"path": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def _remember(real: Path, stat: os.stat_result, sha256: str) -> None:
    record = {"path": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    try:  # a read-only cache only costs a re-hash next time
        write_text_atomically(_marker(real), json.dumps(record))
    except OSError:
        pass


def _disk_size(path: Path) -> int:
    """Bytes on disk, following the cache's symlinks to the blobs."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _quiet(_: str) -> None:
    pass

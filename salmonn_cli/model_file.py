"""Model files: a small TOML that says where a model's four components come from and how to run them.

    name = "salmonn-13b"
    description = "..."
    [checkpoint]                      # each of whisper, beats, llm, checkpoint: a local `path` OR Hub `sources`
    size = 400466533                  # approximate total bytes, for display
    [[checkpoint.sources]]            # tried in order
    repo = "tsinghua-ee/SALMONN"
    repo_type = "model"               # model | space | dataset
    revision = "main"
    file = "salmonn_v1.pth"           # a single file (with `size` and `sha256` when known) ...
    sha256 = "709c..."
    # folder = ""  allow = ["config.json", "*.safetensors"]   ... or a (sub-)folder and the files to fetch from it
    [settings]                        # second_per_window, second_stride, qformer_heads, lora_scale, prompt_template
    [sizes]                           # parameter counts for memory estimates

Reading a model file needs no network and imports no torch.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, UsageError
from .prompt import PROMPT_TEMPLATE, template_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

BUILTIN_DIR = Path(__file__).resolve().parent / "models"
BUILTIN_DEFAULT = "salmonn-13b"  # what every command loads unless --model says otherwise
ROLES = ("whisper", "beats", "llm", "checkpoint")
# Hugging Face folders (wavlm: `salmonn train`'s other encoder); beats and checkpoint are single files
FOLDER_ROLES = frozenset({"whisper", "llm", "wavlm"})
REPO_TYPES = ("model", "space", "dataset")
_PUBLISHED_WINDOW_S = 0.333333  # the audio each token reads (17 Whisper frames), as the original's config writes it
WAKE_UP_LORA_SCALE = 2.0  # the paper: about half the trained scaling wakes stories, spoken QA and translation
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_MISSING = object()


@dataclass(frozen=True)
class HubSource:
    """One place on the Hugging Face Hub a component can be fetched from: a single `file` or a `folder` + `allow`."""

    repo: str
    repo_type: str = "model"
    revision: str = "main"
    file: str | None = None
    folder: str | None = None
    allow: tuple[str, ...] = ()
    size: int | None = None  # exact bytes of `file`, checked after download
    sha256: str | None = None

    @property
    def is_file(self) -> bool:
        return self.file is not None

    def allow_patterns(self) -> list[str]:
        """The glob patterns relative to the repo root (what `snapshot_download` filters on)."""
        prefix = f"{self.folder.strip('/')}/" if self.folder and self.folder.strip("/") else ""
        return [prefix + pattern for pattern in self.allow]

    def describe(self) -> str:
        """`space tsinghua-ee/SALMONN-7B-gradio@main:beats/x.pt` - enough to find it again by hand."""
        where = self.file if self.is_file else (self.folder or "/")
        return f"{self.repo_type} {self.repo}@{self.revision}:{where}"


@dataclass(frozen=True)
class ComponentSpec:
    """One of the four components: either a local `path` or Hub `sources` tried in order."""

    name: str
    path: Path | None = None
    sources: tuple[HubSource, ...] = ()
    size: int | None = None  # approximate total bytes, for display only

    @property
    def is_folder(self) -> bool:
        return self.name in FOLDER_ROLES

    @property
    def display_size(self) -> int | None:
        """The size to show before anything is downloaded (the first source's exact size when known)."""
        if self.size is not None:
            return self.size
        return next((s.size for s in self.sources if s.size is not None), None)

    def describe(self) -> str:
        return str(self.path) if self.path is not None else self.sources[0].describe()


@dataclass(frozen=True)
class ComponentPaths:
    """Where the four components are: an HF Whisper folder, a BEATs .pt, an HF LLaMA folder, a SALMONN .pth."""

    whisper: Path
    beats: Path
    llm: Path
    checkpoint: Path


@dataclass(frozen=True)
class ModelSettings:
    """Facts about how the checkpoint was trained that are in no tensor; passed on to `load_model`.

    The defaults are the published models': the one place these numbers are written in code.
    """

    second_per_window: float = _PUBLISHED_WINDOW_S
    second_stride: float = _PUBLISHED_WINDOW_S  # windows do not overlap
    qformer_heads: int | None = None  # None: Q-Former width / 64
    lora_scale: float = 4.0  # lora_alpha / r the checkpoint was trained at (32 / 8); every call uses it by default
    prompt_template: str = PROMPT_TEMPLATE


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts, for memory estimates before anything is loaded."""

    llm_params: int
    whisper_encoder_params: int
    beats_params: int
    connector_params: int

    @property
    def encoder_params(self) -> int:
        """Everything but the LLM: the part that is never quantised."""
        return self.whisper_encoder_params + self.beats_params + self.connector_params


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model file. `model_arg` is what to pass to `--model` to get this spec again."""

    name: str
    description: str
    whisper: ComponentSpec
    beats: ComponentSpec
    llm: ComponentSpec
    checkpoint: ComponentSpec
    settings: ModelSettings
    sizes: ModelSizes
    file: Path | None = None
    builtin: bool = False

    @property
    def components(self) -> tuple[ComponentSpec, ...]:
        return (self.whisper, self.beats, self.llm, self.checkpoint)

    @property
    def model_arg(self) -> str:
        return self.name if self.builtin or self.file is None else str(self.file)


def builtin_models() -> list[str]:
    """Names of the model files shipped with the package."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_model_spec(name_or_path: str) -> ModelSpec:
    """A built-in model name (`salmonn-13b`) or the path of a `.toml` model file -> its validated `ModelSpec`."""
    text = str(name_or_path)
    known = builtin_models()
    if text in known:  # a built-in name wins over a file of that name in the current folder
        return parse_model_file(BUILTIN_DIR / f"{text}.toml", builtin=True)
    as_path = Path(text).expanduser()
    if as_path.is_file():
        return parse_model_file(as_path)
    if text.endswith(".toml") or "/" in text or "\\" in text:
        raise UsageError(f"model file {text} does not exist: give {', '.join(known)} or a model .toml file")
    choices = ", ".join(known)
    raise UsageError(f"unknown model {text!r}: choose one of {choices}, or give the path of a model .toml file")


def read_toml(path: Path, *, error=CheckpointError, what: str = "model file") -> dict:
    """A TOML file's tables; an unreadable or invalid file is `error(message, path=)` naming `what` it is."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what}: {exc}", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} is not valid TOML: {exc}", path=path) from None


def parse_model_file(path: Path, *, builtin: bool = False) -> ModelSpec:
    """Read and validate one model file; every problem is a CheckpointError naming the file and the field."""
    path = Path(path).resolve()
    data = read_toml(path)
    top = TomlTable(data, "", path)
    name = top.take("name", str)
    description = top.take("description", str, "")
    components = {role: component_spec(role, top.take(role, dict), path) for role in ROLES}
    settings = _settings(TomlTable(top.take("settings", dict, {}), "settings", path))
    sizes = _sizes(TomlTable(top.take("sizes", dict), "sizes", path))
    top.done()
    return ModelSpec(name, description, **components, settings=settings, sizes=sizes, file=path, builtin=builtin)


def with_local_components(spec: ModelSpec, **paths: str | Path | None) -> ModelSpec:
    """`spec` with some components replaced by local paths (e.g. from --whisper/--beats/--llm/--checkpoint)."""
    unknown = set(paths) - set(ROLES)
    if unknown:
        raise UsageError(f"unknown component(s) {sorted(unknown)}: the components are {', '.join(ROLES)}")
    changes = {
        role: ComponentSpec(role, path=Path(value).expanduser().resolve())
        for role, value in paths.items()
        if value is not None
    }
    return dataclasses.replace(spec, **changes) if changes else spec


# ---------------------------------------------------------------- parsing helpers
class TomlTable:
    """One TOML table being read: typed `take`s, then `done` rejects any field nobody took (typos fail loudly).

    `error(message, path=, key=)` makes the exception a problem raises (model files: CheckpointError, exit 4)."""

    def __init__(self, data: dict, where: str, file: Path, *, error=CheckpointError, what: str = "model file") -> None:
        self.data, self.where, self.file = dict(data), where, file
        self._error, self._what = error, what

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, problem: str) -> Exception:
        return self._error(f"malformed {self._what}: {problem}", path=self.file, key=self.key(name))

    def table(self, name: str, default=_MISSING) -> "TomlTable":
        """The sub-table `name`, read the same way."""
        data = self.take(name, dict, default)
        return TomlTable(data, self.key(name), self.file, error=self._error, what=self._what)

    def take(self, name: str, kind: type | tuple[type, ...], default=_MISSING):
        value = self.data.pop(name, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.fail(name, "this required field is missing")
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python, never in a model file
        if isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.fail(name, f"expected {names}, got {_TYPE_NAMES.get(type(value), type(value).__name__)}")
        return value

    def take_positive(self, name: str, kind: type | tuple[type, ...], default=_MISSING):
        value = self.take(name, kind, default)
        if value is not None and value <= 0:
            raise self.fail(name, f"must be positive, got {value}")
        return value

    def done(self) -> None:
        if self.data:
            unknown = sorted(self.data)[0]
            raise self.fail(unknown, f"unknown field {unknown!r}")


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "a table", list: "a list"}


def component_spec(role: str, data: dict, file: Path, *, where: str | None = None, **reading) -> ComponentSpec:
    """One component's table (a local `path`, relative to `file`, or Hub `sources`) -> its ComponentSpec.

    `where`: the table's key in the file (default the role); `reading`: TomlTable's `error` and `what`."""
    table = TomlTable(data, where or role, file, **reading)
    local = table.take("path", str, None)
    raw_sources = table.take("sources", list, None)
    size = table.take_positive("size", int, None)
    table.done()
    if (local is None) == (raw_sources is None):
        raise table.fail("path", "give either a local `path` or Hub `sources`, not both and not neither")
    if local is not None:
        # Relative paths are relative to the model file, so a model folder can be moved as a whole.
        return ComponentSpec(role, path=(file.parent / Path(local).expanduser()).resolve(), size=size)
    if not raw_sources:
        raise table.fail("sources", "the list of sources is empty")
    sources = tuple(_source(role, i, item, file, table) for i, item in enumerate(raw_sources))
    return ComponentSpec(role, sources=sources, size=size)


def _source(role: str, index: int, data: object, file: Path, parent: TomlTable) -> HubSource:
    where = f"{parent.where}.sources[{index}]"
    if not isinstance(data, dict):
        raise parent.fail(f"sources[{index}]", "each source must be a table")
    t = TomlTable(data, where, file, error=parent._error, what=parent._what)
    repo, repo_type = t.take("repo", str), t.take("repo_type", str, "model")
    revision, rel_file, folder = t.take("revision", str, "main"), t.take("file", str, None), t.take("folder", str, None)
    allow, size, sha256 = t.take("allow", list, None), t.take_positive("size", int, None), t.take("sha256", str, None)
    t.done()
    if not _REPO_ID.fullmatch(repo):
        raise t.fail("repo", f"{repo!r} is not a repo id of the form owner/name")
    if repo_type not in REPO_TYPES:
        raise t.fail("repo_type", f"{repo_type!r} is not one of {', '.join(REPO_TYPES)}")
    if not revision:
        raise t.fail("revision", "the revision is empty")
    if role in FOLDER_ROLES:
        if rel_file is not None or folder is None or not allow:
            raise t.fail("folder", f'{role} is a folder: give `folder` ("" for the repo root) and `allow` patterns')
        if sha256 is not None or size is not None:
            raise t.fail(
                "sha256", f"`size` and `sha256` of a source are for single files; put the folder's size on [{role}]"
            )
        if not all(isinstance(p, str) and p for p in allow):
            raise t.fail("allow", "`allow` must be a list of non-empty glob patterns")
        _check_relative(t, "folder", folder)
        return HubSource(repo, repo_type, revision, folder=folder.strip("/"), allow=tuple(allow))
    if rel_file is None or folder is not None or allow is not None:
        raise t.fail("file", f"{role} is a single file: give `file` (its path in the repo), not `folder`/`allow`")
    _check_relative(t, "file", rel_file)
    if not rel_file:
        raise t.fail("file", "the file path is empty")
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        raise t.fail("sha256", "must be 64 lowercase hexadecimal characters")
    return HubSource(repo, repo_type, revision, file=rel_file, size=size, sha256=sha256)


def _check_relative(table: TomlTable, name: str, value: str) -> None:
    if value.startswith("/") or ".." in value.split("/") or "\\" in value:
        raise table.fail(name, f"{value!r} must be a path inside the repo, with / separators")


def _settings(t: TomlTable) -> ModelSettings:
    default = ModelSettings()
    settings = ModelSettings(
        second_per_window=float(t.take_positive("second_per_window", (float, int), default.second_per_window)),
        second_stride=float(t.take_positive("second_stride", (float, int), default.second_stride)),
        qformer_heads=t.take_positive("qformer_heads", int, None),
        lora_scale=float(t.take("lora_scale", (float, int), default.lora_scale)),
        prompt_template=t.take("prompt_template", str, default.prompt_template),
    )
    t.done()
    problem = template_problem(settings.prompt_template)
    if problem is not None:
        raise t.fail("prompt_template", problem)
    if settings.lora_scale < 0:
        raise t.fail("lora_scale", f"must be 0 or more, got {settings.lora_scale}")
    return settings


def _sizes(t: TomlTable) -> ModelSizes:
    # 13.0e9 reads better than 13_000_000_000 in a hand-written file; counts are whole numbers either way
    sizes = ModelSizes(**{f.name: int(t.take_positive(f.name, (int, float))) for f in dataclasses.fields(ModelSizes)})
    t.done()
    return sizes

"""When the decode step is compiled (`--compile auto|on|off`), and where compiled steps are kept between runs.

Compiling the one-token step (torch.compile, inductor, one graph) fuses the ~50 small kernels of each decoder layer
(norms, rotary, LoRA, casts) into a few; a graph replay of it then costs little more than reading the weights. The
price is a start cost: tens of seconds the first time a machine meets a model and a step shape, a few seconds
after, when inductor's persistent cache (kept here beside the model cache) already holds the compiled code.

`auto` therefore compiles where the start cost is repaid: in long-lived processes (`serve`, `live`, many-file and
long-audio runs) always, and in a one-shot run only when this machine compiled the same step before (a marker file
per step says so, written once its compile succeeded). Full precision, bitsandbytes NF4 and quanto int8 compile
into one graph; LLM.int8 (bitsandbytes 8-bit) and quanto int4 cannot (`quantize.uncompilable_reason`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UsageError

COMPILE_MODES = ("auto", "on", "off")
NEVER, CACHED, ALWAYS = "never", "cached", "always"  # what the engine does for a step shape it meets
CACHE_ENV = "SALMONN_COMPILE_CACHE"  # overrides where compiled steps are kept
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's own; a user's setting is kept
# `auto` compiles where it was measured faster at the sizes people run. On the CPU it was not: the 7B shape in
# quanto int8 (what `--quant auto` runs there) took 2.35 s a step compiled against 0.48 s eager, after a 112 s
# compile; only the tiny test model gains (0.58 against 1.15 ms), never by more than its start cost. `--compile on`
# still compiles there.
COMPILED_BY_AUTO = ("cuda",)
# every row count and cache length is its own graph (static shapes): a server meets a few dozen at most
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class CompilePlan:
    """Which step shapes the engine compiles: NEVER, CACHED (only those compiled on this machine before) or ALWAYS;
    `asked`: the user said `--compile on`, so a model that cannot be compiled is worth a line."""

    when: str = NEVER
    asked: bool = False


def compile_plan(mode: str, *, long_lived: bool, device_type: str) -> CompilePlan:
    """`--compile`'s value for a run (`long_lived`: a server, live, many files or long audio) on `device_type` ->
    its plan. `auto` compiles on CUDA only (CPU_AUTO says why)."""
    if mode not in COMPILE_MODES:
        raise UsageError(f"--compile must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    if mode == "off" or (mode == "auto" and device_type not in COMPILED_BY_AUTO):
        return CompilePlan(NEVER)
    if mode == "on":
        return CompilePlan(ALWAYS, asked=True)
    return CompilePlan(ALWAYS if long_lived else CACHED)


def compile_cache_dir() -> Path:
    """Where compiled steps are kept: $SALMONN_COMPILE_CACHE, else `salmonn-compile` beside the Hugging Face
    model cache (~/.cache/huggingface/salmonn-compile by default)."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen:
        return Path(chosen).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().parent / "salmonn-compile"


def use_compile_cache() -> Path:
    """Point inductor's persistent cache at `compile_cache_dir()` (unless the user pointed it elsewhere) before
    anything compiles; returns the folder of this project's step markers.

    Importing transformers already writes torch's default (/tmp/torchinductor_USER) into the variable, so that
    value counts as unset; inductor reads the variable at each use.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    root = compile_cache_dir()
    current = os.environ.get(INDUCTOR_CACHE_ENV)
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ[INDUCTOR_CACHE_ENV] = str(root / "inductor")
    return root / "steps"


@dataclass(frozen=True)
class StepShape:
    """What a compiled step is specific to: the model (its config, dtype, layer types), the row count and cache
    length, the device and the library versions. Its `key` names the step's marker file."""

    model: str
    rows: int
    capacity: int
    device: str
    versions: str

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


def was_compiled(markers: Path, shape: StepShape) -> bool:
    """This machine compiled `shape` before (so inductor's cache holds its code)."""
    return (markers / f"{shape.key}.json").is_file()


def mark_compiled(markers: Path, shape: StepShape, seconds: float) -> None:
    """Remember that `shape` compiled here, and how long it took; a folder that cannot be written is no error."""
    from .atomic import write_text_atomically

    try:
        markers.mkdir(parents=True, exist_ok=True)
        record = {**asdict(shape), "seconds": round(seconds, 2)}
        write_text_atomically(markers / f"{shape.key}.json", json.dumps(record))
    except OSError:
        pass

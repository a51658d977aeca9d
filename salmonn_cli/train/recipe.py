"""Training recipes: a TOML file naming the encoder(s), the connector, the LLM, LoRA and the stages.

    name = "speechverse"
    seed = 0
    [[encoders]]                  # whisper | wavlm | beats; each a local `path` or Hub `sources` (as model files)
    kind = "wavlm"
    path = "models/wavlm-large"
    [connector]                   # conv (SpeechVerse) | qformer (SALMONN's window Q-Former)
    kind = "conv"
    layers = "weighted"           # conv: weighted (softmax over every hidden state) | last
    strides = [2, 2]              # conv: one Conv1d(kernel 3) + LayerNorm block per stride
    [llm]                         # any decoder-only causal LM, or T5 / Flan-T5 (encoder-decoder)
    path = "models/flan-t5-xl"
    quant = "none"                # none | 8bit | 4bit (QLoRA)
    [lora]
    rank = 16
    alpha = 16
    targets = ["q", "v"]          # default: q, v on T5; q_proj, v_proj otherwise
    [[stages]]
    name = "align"
    train = ["connector", "layer_weights"]   # of connector, layer_weights, lora
    data = "asr.jsonl"            # finetune's format: audio, task or instruction, response
    lr = 1e-3
    steps = 5000

Paths are relative to the recipe file. Reading a recipe imports no torch and touches no network.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import UsageError
from ..model_file import ComponentSpec, TomlTable, component_spec, read_toml
from ..prompt import template_problem

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised on 3.10 only
    pass

BUILTIN_RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
ENCODER_KINDS = ("whisper", "wavlm", "beats")
CONNECTOR_KINDS = ("conv", "qformer")
LAYER_CHOICES = ("weighted", "last")
PARTS = ("connector", "layer_weights", "lora")
QUANT_MODES = ("none", "8bit", "4bit")
SPEECHVERSE_RATE_HZ = 12.5  # the paper's audio rate into the LLM: one token per 80 ms


class RecipeError(UsageError):
    """A recipe that cannot be used: the file and the key, like a model file's errors (but exit 2: it is input)."""

    def __init__(self, message: str, *, path: object = None, key: str | None = None) -> None:
        where = ", ".join(part for part in (f"file {path}" if path else "", f"key {key!r}" if key else "") if part)
        super().__init__(f"{message} ({where})" if where else message)


@dataclass(frozen=True)
class EncoderSpec:
    kind: str  # whisper | wavlm | beats
    component: ComponentSpec


@dataclass(frozen=True)
class ConnectorSpec:
    kind: str  # conv | qformer
    layers: str = "weighted"  # conv: weighted | last
    kernel: int = 3
    strides: tuple[int, ...] = (2, 2)  # 50 Hz (Whisper, WavLM) / 4 = the paper's 12.5 Hz
    # qformer: SALMONN's published shapes
    window_seconds: float = 0.333333
    qformer_layers: int = 2
    qformer_hidden: int = 768
    queries: int = 1


@dataclass(frozen=True)
class LlmSpec:
    component: ComponentSpec
    quant: str = "none"


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] | None = None  # None: q, v (T5) or q_proj, v_proj (LLaMA, Qwen2, Mistral, ...)

    @property
    def scale(self) -> float:
        """What every LoRA layer multiplies by: alpha / rank (SALMONN's 32 / 8 = 4)."""
        return self.alpha / self.rank

    def targets_for(self, seq2seq: bool) -> tuple[str, ...]:
        """The modules LoRA wraps: the recipe's, else q and v attention projections (peft's defaults)."""
        return self.targets or (("q", "v") if seq2seq else ("q_proj", "v_proj"))


@dataclass(frozen=True)
class StageSpec:
    """One stage: what it trains, on what, how. Steps are optimizer steps of `batch_size * grad_accum` examples
    per process."""

    name: str
    train: tuple[str, ...]
    data: Path
    val: Path | None = None
    lr: float = 1e-4
    steps: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    save_every: int = 100
    max_text_tokens: int = 300  # SALMONN's max_txt_len


@dataclass(frozen=True)
class TrainRecipe:
    name: str
    description: str
    encoders: tuple[EncoderSpec, ...]
    connector: ConnectorSpec
    llm: LlmSpec
    lora: LoraSettings
    stages: tuple[StageSpec, ...]
    seed: int = 0
    prompt_template: str | None = None  # None: the LLM's chat template, else Vicuna's (SALMONN's)
    file: Path | None = None

    @property
    def family(self) -> str:
        """`salmonn` (a Q-Former result is a SALMONN checkpoint) or `composed` (our own model file)."""
        return "salmonn" if self.connector.kind == "qformer" else "composed"

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise UsageError(f"recipe {self.name} has no stage {name!r}: its stages are {self.stage_names()}")

    def stage_names(self) -> str:
        return ", ".join(s.name for s in self.stages)


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in BUILTIN_RECIPES_DIR.glob("*.toml"))


def builtin_recipe_text(name: str) -> str:
    """The TOML text of a built-in recipe (what `--print` writes)."""
    if name not in builtin_recipes():
        raise UsageError(f"unknown recipe {name!r}: the built-in recipes are {', '.join(builtin_recipes())}")
    return (BUILTIN_RECIPES_DIR / f"{name}.toml").read_text(encoding="utf-8")


def load_recipe(path: str | Path) -> TrainRecipe:
    """Read and check a recipe file; every problem is a RecipeError naming the file and the key."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"recipe {path} does not exist (`salmonn train --recipe speechverse --print` writes one)")
    path = path.resolve()
    data = read_toml(path, error=RecipeError, what="the recipe")
    top = TomlTable(data, "", path, error=RecipeError, what="recipe")
    name = top.take("name", str)
    description = top.take("description", str, "")
    seed = top.take("seed", int, 0)
    template = top.take("prompt_template", str, None)
    encoders = tuple(_encoder(top, i, item) for i, item in enumerate(top.take("encoders", list)))
    connector = read_connector(top.table("connector"))
    llm = _llm(top.table("llm"))
    lora = read_lora(top.table("lora", {}))
    stages = tuple(_stage(top, i, item) for i, item in enumerate(top.take("stages", list)))
    top.done()
    recipe = TrainRecipe(name, description, encoders, connector, llm, lora, stages, seed, template, path)
    _check_whole(recipe, top)
    return recipe


def _encoder(top: TomlTable, index: int, data: object) -> EncoderSpec:
    where = f"encoders[{index}]"
    if not isinstance(data, dict):
        raise top.fail(where, "each encoder must be a table")
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in ENCODER_KINDS:
        raise top.fail(f"{where}.kind", f"kind must be one of {', '.join(ENCODER_KINDS)}, got {kind!r}")
    component = component_spec(kind, data, top.file, where=where, error=RecipeError, what="recipe")
    return EncoderSpec(kind, component)


def read_connector(t: TomlTable) -> ConnectorSpec:
    d = ConnectorSpec("conv")
    kind = t.take("kind", str)
    if kind not in CONNECTOR_KINDS:
        raise t.fail("kind", f"must be one of {', '.join(CONNECTOR_KINDS)}, got {kind!r}")
    layers = t.take("layers", str, d.layers)
    if layers not in LAYER_CHOICES:
        raise t.fail("layers", f"must be one of {', '.join(LAYER_CHOICES)}, got {layers!r}")
    strides = t.take("strides", list, list(d.strides))
    if not strides or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in strides):
        raise t.fail("strides", "must be a non-empty list of whole numbers >= 1 (one per convolution block)")
    spec = ConnectorSpec(
        kind,
        layers,
        t.take_positive("kernel", int, d.kernel),
        tuple(strides),
        float(t.take_positive("window_seconds", (float, int), d.window_seconds)),
        t.take_positive("qformer_layers", int, d.qformer_layers),
        t.take_positive("qformer_hidden", int, d.qformer_hidden),
        t.take_positive("queries", int, d.queries),
    )
    t.done()
    return spec


def _llm(t: TomlTable) -> LlmSpec:
    quant = t.take("quant", str, "none")
    if quant not in QUANT_MODES:
        raise t.fail("quant", f"must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    component = component_spec("llm", t.data, t.file, where=t.where, error=RecipeError, what="recipe")
    return LlmSpec(component, quant)


def read_lora(t: TomlTable) -> LoraSettings:
    d = LoraSettings()
    targets = t.take("targets", list, None)
    if targets is not None and not (targets and all(isinstance(x, str) and x for x in targets)):
        raise t.fail("targets", "must be a non-empty list of module names, e.g. [\"q_proj\", \"v_proj\"]")
    spec = LoraSettings(
        t.take_positive("rank", int, d.rank),
        float(t.take_positive("alpha", (float, int), d.alpha)),
        float(t.take("dropout", (float, int), d.dropout)),
        tuple(targets) if targets else None,
    )
    t.done()
    if not 0 <= spec.dropout < 1:
        raise t.fail("dropout", f"must be in [0, 1), got {spec.dropout}")
    return spec


_STAGE_NUMBERS = {"lr": (float, int), "max_grad_norm": (float, int), "weight_decay": (float, int)}


def _stage(top: TomlTable, index: int, data: object) -> StageSpec:
    where = f"stages[{index}]"
    if not isinstance(data, dict):
        raise top.fail(where, "each stage must be a table")
    t = TomlTable(data, where, top.file, error=RecipeError, what="recipe")
    name = t.take("name", str)
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise t.fail("name", f"a stage name is letters, digits, - and _ (it names a folder), got {name!r}")
    train = t.take("train", list)
    unknown = [p for p in train if p not in PARTS]
    if not train or unknown or len(set(train)) != len(train):
        raise t.fail("train", f"list each trainable part once, of {', '.join(PARTS)}; got {train!r}")
    data_path = top.file.parent / Path(t.take("data", str)).expanduser()
    val = t.take("val", str, None)
    values = {}
    for f in fields(StageSpec):
        if f.name in ("name", "train", "data", "val"):
            continue
        kind = _STAGE_NUMBERS.get(f.name, int)
        value = t.take(f.name, kind, f.default)
        if f.name in ("weight_decay", "warmup_steps"):
            ok = value >= 0
        else:
            ok = value > 0 and math.isfinite(value)
        if not ok:
            raise t.fail(f.name, f"must be {'>= 0' if f.name in ('weight_decay', 'warmup_steps') else '> 0'}")
        values[f.name] = float(value) if kind is not int else value
    t.done()
    if values["warmup_steps"] >= values["steps"]:
        raise t.fail("warmup_steps", f"must be fewer than the stage's {values['steps']} steps")
    val_path = top.file.parent / Path(val).expanduser() if val else None
    return StageSpec(name, tuple(train), data_path.resolve(), val_path, **values)


def _check_whole(recipe: TrainRecipe, top: TomlTable) -> None:
    """What no single table can check: the encoders fit the connector, stage names are unique, parts exist."""
    kinds = tuple(e.kind for e in recipe.encoders)
    c = recipe.connector
    if c.kind == "conv" and (len(kinds) != 1 or kinds[0] == "beats"):
        raise top.fail("encoders", f"the conv connector reads one Whisper or WavLM encoder, got {list(kinds)}")
    if c.kind == "qformer" and kinds not in (("whisper",), ("whisper", "beats")):
        raise top.fail("encoders", f"the Q-Former connector reads Whisper, or Whisper then BEATs; got {list(kinds)}")
    names = [s.name for s in recipe.stages]
    if not names:
        raise top.fail("stages", "a recipe needs at least one stage")
    if len(set(names)) != len(names):
        raise top.fail("stages", f"stage names must differ, got {names}")
    for i, stage in enumerate(recipe.stages):
        if "layer_weights" in stage.train and not (c.kind == "conv" and c.layers == "weighted"):
            raise top.fail(f"stages[{i}].train", "layer_weights exist only with connector.layers = \"weighted\"")
    if recipe.prompt_template is not None:
        problem = template_problem(recipe.prompt_template)
        if problem:
            raise top.fail("prompt_template", problem)

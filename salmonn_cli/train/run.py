"""A recipe end to end: components resolved, every stage's data checked up front, then stage after stage, each
starting from the previous stage's result, each resumable; rank 0 writes.

    OUT/stages/<name>/state.pt              the stage's training state while it runs (finetune's format)
    OUT/stages/<name>/model.toml            the stage's result, a model file every command opens
    OUT/stages/<name>/weights.safetensors   (composed) or salmonn.pth + salmonn.safetensors (SALMONN recipe)
    OUT/stages/<name>/stage.json            written last: the stage is complete
    OUT/model.toml                          the last stage's model file
    OUT/train.json                          the record: recipe, components, every stage's settings and losses
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_atomically
from ..distributed import ALONE, Ranks
from ..errors import UsageError
from ..finetune.config import FinetuneConfig
from ..finetune.data import BadLine, DataError, FewShotData, data_sha256, read_examples
from .recipe import StageSpec, TrainRecipe

STAGES_DIR = "stages"
STAGE_RECORD = "stage.json"
RECORD_FILE = "train.json"


@dataclass(frozen=True)
class Components:
    """Where the recipe's components are on this machine."""

    encoders: tuple[Path, ...]
    llm: Path

    @property
    def whisper(self) -> Path:
        return self.encoders[0]

    @property
    def beats(self) -> Path:
        return self.encoders[1]


@dataclass(frozen=True)
class StageResult:
    name: str
    model_file: Path
    fit: object | None  # finetune.train.FitResult; None when the stage was complete before this run
    interrupted: bool = False


def stage_dir(out: Path, stage: StageSpec) -> Path:
    return Path(out) / STAGES_DIR / stage.name


def is_complete(out: Path, stage: StageSpec) -> bool:
    return (stage_dir(out, stage) / STAGE_RECORD).is_file()


def check_output(recipe: TrainRecipe, out: Path, *, resume: bool) -> None:
    """A fresh run needs a new or empty folder; `--resume` needs one this recipe started. Creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file, not a folder")
    started = (out / STAGES_DIR).is_dir()
    if resume and not started:
        raise UsageError(f"nothing to resume: {out} holds no training run (start without --resume)")
    if not resume and (started or (out / RECORD_FILE).exists()):
        raise UsageError(f"{out} already holds a training run: --resume continues it, or choose another -o")


def stage_config(recipe: TrainRecipe, stage: StageSpec, processes: int) -> FinetuneConfig:
    """The training loop's settings for a stage (`Trainer` runs every stage as it runs a fine-tuning)."""
    return FinetuneConfig(
        lr=stage.lr, steps=stage.steps, batch_size=stage.batch_size, grad_accum=stage.grad_accum,
        warmup_ratio=0.0, warmup=stage.warmup_steps, max_grad_norm=stage.max_grad_norm,
        weight_decay=stage.weight_decay, seed=recipe.seed, save_every=stage.save_every, eval_every=stage.save_every,
        quant=recipe.llm.quant, train_connector="connector" in stage.train, max_text_tokens=stage.max_text_tokens,
        lora_dropout=recipe.lora.dropout, processes=processes,
    )  # fmt: skip


def load_stage_data(stages: tuple[StageSpec, ...], tokenizer) -> dict[str, FewShotData]:
    """Every stage's examples, read and checked before anything trains; a DataError lists every bad line."""
    found: dict[str, FewShotData] = {}
    problems: list[BadLine] = []
    for stage in stages:
        train, bad = read_examples(stage.data, tokenizer=tokenizer, max_text_tokens=stage.max_text_tokens)
        val, bad_val = read_examples(stage.val, tokenizer=tokenizer) if stage.val else ([], [])
        problems += bad + bad_val
        if not bad and not bad_val:
            found[stage.name] = FewShotData(tuple(train), tuple(val), data_sha256(train),
                                            data_sha256(val) if val else None)  # fmt: skip
    if problems:
        raise DataError(problems)
    return found


def run_recipe(recipe: TrainRecipe, out: Path, components: Components, *, only: str | None = None,
               resume: bool = False, device, console, ranks: Ranks = ALONE) -> list[StageResult]:  # fmt: skip
    """Train the recipe's stages (or `only` that one) into `out`; the list ends early at an interruption."""
    from ..tokenizer import load_tokenizer

    out = Path(out)
    stages = recipe.stages if only is None else (recipe.stage(only),)
    todo = tuple(s for s in stages if not is_complete(out, s))
    data = load_stage_data(todo, load_tokenizer(components.llm))
    if only is not None:
        _check_previous_done(recipe, out, recipe.stage(only))
    results = []
    for number, stage in enumerate(stages, start=1):
        folder = stage_dir(out, stage)
        if stage.name not in data:
            console.print(f"stage {stage.name}: complete already ({folder})")
            results.append(StageResult(stage.name, folder / "model.toml", None))
            continue
        console.print(f"[bold]stage {number}/{len(stages)} {stage.name}[/]: trains {', '.join(stage.train)} on"
                      f" {len(data[stage.name].train)} examples of {stage.data.name}, {stage.steps} steps")  # fmt: skip
        result = _run_stage(recipe, out, stage, data[stage.name], components, resume, device, console, ranks)
        results.append(result)
        if result.interrupted:
            return results
    if ranks.main and all(is_complete(out, s) for s in recipe.stages):
        _finish(recipe, out, components)
    return results


def _check_previous_done(recipe: TrainRecipe, out: Path, stage: StageSpec) -> None:
    index = recipe.stages.index(stage)
    if index > 0 and not is_complete(out, recipe.stages[index - 1]):
        previous = recipe.stages[index - 1].name
        raise UsageError(f"stage {stage.name} starts from stage {previous}'s result, which is not in {out} yet:"
                         f" run --stage {previous} first (or no --stage for all)")  # fmt: skip


def _previous(recipe: TrainRecipe, out: Path, stage: StageSpec) -> Path | None:
    """The folder of the stage this one starts from, None for the first."""
    index = recipe.stages.index(stage)
    return stage_dir(out, recipe.stages[index - 1]) if index > 0 else None


def _run_stage(recipe, out, stage, data, components, resume, device, console, ranks) -> StageResult:
    from ..finetune.progress import Reporter
    from ..finetune.state import STATE_FILE, load_state
    from ..finetune.train import Trainer
    from .build import INIT_DIR, build_stage_model, write_stage_outputs

    folder = stage_dir(out, stage)
    config = stage_config(recipe, stage, ranks.world)
    built = build_stage_model(recipe, stage, components, _previous(recipe, out, stage), device, config,
                              init=out / INIT_DIR, ranks=ranks)  # fmt: skip
    identity = {"start": built.start_identity, "parts": ",".join(stage.train),
                "train_sha256": data.train_sha256, "val_sha256": data.val_sha256}  # fmt: skip
    trainer = Trainer(built.target, config, data.train, data.val, identity=identity, ranks=ranks)
    model_file = folder / "model.toml"
    try:
        has_state = (folder / STATE_FILE).is_file()
        if has_state and not resume:
            raise UsageError(f"{folder} holds a stage half done: --resume continues it")
        if ranks.main:
            folder.mkdir(parents=True, exist_ok=True)
        if has_state:
            trainer.load(load_state(folder))
            console.print(f"  resumed at step {trainer.progress.step}/{trainer.total}")
        fit = trainer.fit(folder, Reporter(console))
        if fit.interrupted:
            return StageResult(stage.name, model_file, fit, interrupted=True)
        if ranks.main:  # before `release`: a trained connector is written from its float32 master weights
            model_file = write_stage_outputs(recipe, stage, built, components, folder)
    finally:
        trainer.release()
    if ranks.main:
        record = {"stage": stage.name, "train": list(stage.train), "data": str(stage.data),
                  "train_examples": len(data.train), "train_sha256": data.train_sha256,
                  "hyperparameters": config.as_dict(), "steps": fit.steps_done, "first_loss": fit.first_loss,
                  "final_loss": fit.final_loss, "losses": list(fit.losses),
                  "val_losses": [list(v) for v in fit.val_losses], "wall_s": round(fit.wall_s, 3),
                  "start": built.start_identity, "model_file": str(model_file)}  # fmt: skip
        _write_json(folder / STAGE_RECORD, record)
        console.print(f"  stage {stage.name} done: loss {fit.first_loss:.4f} -> {fit.final_loss:.4f} in"
                      f" {fit.wall_s:.1f} s; its model: {model_file}")  # fmt: skip
    return StageResult(stage.name, model_file, fit)


def _finish(recipe: TrainRecipe, out: Path, components: Components) -> None:
    """OUT/model.toml (the last stage's: every path in it is absolute) and OUT/train.json."""
    last = stage_dir(out, recipe.stages[-1]) / "model.toml"
    text = last.read_text(encoding="utf-8")
    write_atomically(out / "model.toml", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    stages = [json.loads((stage_dir(out, s) / STAGE_RECORD).read_text(encoding="utf-8")) for s in recipe.stages]
    record = {"recipe": recipe.name, "recipe_file": str(recipe.file), "family": recipe.family,
              "components": {"encoders": [str(p) for p in components.encoders], "llm": str(components.llm)},
              "stages": stages, "model_file": str(out / "model.toml")}  # fmt: skip
    _write_json(out / RECORD_FILE, record)


def _write_json(path: Path, record: dict) -> None:
    text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

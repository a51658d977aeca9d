"""What an evaluation will do, settled before any model loads: the task, the items and their instructions, the
one language (or translation target) they share, the BLEU tokeniser, the paper's figures, and the scorers'
libraries, each refused with one line when something is wrong or missing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text_atomically
from ..errors import UsageError
from ..inputs import InputItem
from .manifest import EvalItem, read_eval_manifest
from .tasks import EvalTask, PaperFigure, eval_task, paper_figures

ANSWERS_FOLDER = "answers"  # DIR/answers: the task commands' -o output, one json file per item (the resume state)
SETTINGS_FILE = "settings.json"  # DIR/settings.json: what the answers were made with
ITEMS_FILE = "items.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class EvalPlan:
    task: EvalTask
    manifest: Path
    items: tuple[EvalItem, ...]
    output_dir: Path
    language: str  # the spoken language every item shares
    target: str | None  # the translation target every item shares (ast)
    bleu_tokenize: str | None  # sacrebleu's tokeniser (ast)
    paper: str | None
    figures: tuple[PaperFigure, ...]

    @property
    def answers_dir(self) -> Path:
        return self.output_dir / ANSWERS_FOLDER

    @property
    def bleu_tokenizer(self) -> str | None:
        """sacrebleu's tokeniser for an ast plan (None for other tasks)."""
        from .metrics import bleu_tokenizer

        return bleu_tokenizer(self.target, self.bleu_tokenize) if self.task.scoring == "bleu" else None

    def instruction_for(self, item: EvalItem) -> str:
        return item.instruction or self.task.instruction_for(item.language or self.language, item.target or self.target)

    def input_items(self, instruction: str | None) -> list[InputItem]:
        """The batch path's inputs: each item's audio with its instruction (`instruction` replaces them all)."""
        return [InputItem(item.audio, instruction or self.instruction_for(item)) for item in self.items]


def default_output_dir(task: str, manifest: Path) -> Path:
    return Path(f"eval-{task}-{manifest.stem}")


def plan_eval(task_name: str, manifest: Path, output_dir: Path | None, *, language: str, to: str | None,
              bleu_tokenize: str | None, paper: str | None) -> EvalPlan:  # fmt: skip
    """Check everything that can be checked without the model, and the scorers' libraries."""
    from . import captions, metrics

    task = eval_task(task_name)
    figures = paper_figures(task, paper)
    items = tuple(read_eval_manifest(manifest))
    languages = {item.language or language for item in items}
    targets = {item.target or to for item in items}
    if len(languages) > 1:
        raise UsageError(f"{manifest} mixes spoken languages ({', '.join(sorted(languages))}): score one at a time")
    if len(targets) > 1 and task.scoring == "bleu":
        named = ", ".join(sorted(t or "none" for t in targets))
        raise UsageError(f"{manifest} mixes translation targets ({named}): score one at a time")
    plan = EvalPlan(task, manifest, items, output_dir or default_output_dir(task.name, manifest),
                    languages.pop().lower(), targets.pop(), bleu_tokenize, paper, figures)  # fmt: skip
    for item in items:
        plan.instruction_for(item)  # a missing target or an unknown language, named now
    _refuse_repeats(items)
    metrics.require_libraries(task.scoring)
    if task.scoring == "yes_no":
        metrics.check_yes_no([item.references[0] for item in items])
    if task.scoring == "bleu":
        metrics.check_bleu_tokenizer(plan.bleu_tokenizer)
    elif bleu_tokenize is not None:
        raise UsageError(f"--bleu-tokenize is for --task ast (BLEU), not --task {task.name}")
    if task.scoring in ("captions", "music_captions"):
        captions.check_toolkit()
    return plan


def _refuse_repeats(items: tuple[EvalItem, ...]) -> None:
    """Each audio once: its answer file is named after it, so a second item would share the first's answer."""
    seen: dict[Path, str] = {}
    for item in items:
        if item.audio in seen:
            raise UsageError(
                f"{item.where}: {item.audio} is already the item of {seen[item.audio]}: give each audio once"
            )
        seen[item.audio] = item.where


def check_settings(output_dir: Path, settings: dict, overwrite: bool) -> None:
    """Answers already in `output_dir` are reused only if they were made with the same settings: a resumed run
    must not score a mix of two models or two decodings. `--overwrite` redoes them with these."""
    path = output_dir / SETTINGS_FILE
    if path.is_file() and not overwrite:
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
        if changed:
            shown = "; ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
            raise UsageError(f"{output_dir} holds answers made with other settings ({shown}): give --overwrite "
                             "to redo them, or another -o")  # fmt: skip
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")

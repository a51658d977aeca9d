"""What an evaluation leaves: DIR/items.jsonl (each item's reference, answer and scores), DIR/summary.json (the
scores, the model, every setting, the libraries) and a table with the paper's figure beside ours."""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version

from rich.console import Console
from rich.table import Table

from ..atomic import failure_reason, write_text_atomically
from ..errors import OutputError
from .captions import JavaRuntime
from .plan import ITEMS_FILE, SUMMARY_FILE, EvalPlan
from .score import Evaluation
from .tasks import PAPER_FIGURES, TASKS

_LIBRARIES = ("salmonn-cli", "jiwer", "sacrebleu", "whisper-normalizer", "pycocoevalcap")
UNCONFIRMED = "*"  # marks a paper figure read from one secondary source only


def write_report(plan: EvalPlan, evaluation: Evaluation, settings: dict, java: JavaRuntime | None) -> dict:
    """Write items.jsonl and summary.json (each atomically); returns the summary."""
    summary = {
        "task": plan.task.name,
        "manifest": str(plan.manifest.resolve()),
        "items": len(plan.items),
        "answered": evaluation.answered,
        "missing": len(plan.items) - evaluation.answered,
        "metrics": [asdict(score) for score in evaluation.scores],
        "paper": None if plan.paper is None else {
            "test_set": plan.paper, "model": "SALMONN-13B", "figures": [asdict(f) for f in plan.figures]},
        "model": _model_identity(evaluation.records),
        "settings": {**settings, "bleu_tokenize": plan.bleu_tokenizer},
        "versions": {name: _version(name) for name in _LIBRARIES},
        "java": None if java is None else java.describe,  # asked for by the caption scores only
    }  # fmt: skip
    items = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in evaluation.rows)
    try:
        write_text_atomically(plan.output_dir / ITEMS_FILE, items)
        write_text_atomically(plan.output_dir / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write the report in {plan.output_dir}: {failure_reason(exc)}") from None
    return summary


def _model_identity(records: tuple[dict, ...]) -> dict | None:
    """Who answered: the model, checkpoint, quantisation, LoRA scale and decoding of the answers (the settings
    check keeps them the same across resumed runs)."""
    if not records:
        return None
    keys = ("model", "checkpoint", "checkpoint_sha256", "quantization", "lora_scale", "decode")
    return {key: records[0].get(key) for key in keys}


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def print_table(plan: EvalPlan, evaluation: Evaluation, console: Console) -> None:
    """Our scores, and the paper's for the same test set when --paper names one."""
    table = Table(title=f"{plan.task.name} on {plan.manifest.name}: {evaluation.answered} of {len(plan.items)} items")
    table.add_column("metric")
    table.add_column("this run", justify="right")
    if plan.paper is not None:
        table.add_column(f"paper: SALMONN-13B, {plan.paper}", justify="right")
    table.add_column("items", justify="right")
    figures = {f.metric: f for f in plan.figures}
    notes = []
    for score in evaluation.scores:
        ours = "-" if score.value is None else _shown(score.value, score.unit)
        row = [_arrowed(score), ours]
        if plan.paper is not None:
            figure = figures.get(score.metric)
            row.append(
                "" if figure is None else _shown(figure.value, score.unit) + ("" if figure.confirmed else UNCONFIRMED)
            )
        table.add_row(*row, str(score.count))
        if score.value is None:
            notes.append(f"{score.metric} not computed: {score.note}")
        elif score.signature:
            notes.append(f"{score.metric}: {score.signature}")
    console.print(table)
    for note in notes:
        console.print(note, soft_wrap=True)
    if any(not f.confirmed for f in plan.figures):
        console.print(f"{UNCONFIRMED} read from one secondary source of the paper's table, not yet checked")


def _arrowed(score) -> str:
    return f"{score.metric} {'↑' if score.higher_is_better else '↓'}"


def _shown(value: float, unit: str) -> str:
    if unit == "fraction":
        return f"{value:.3f}"
    return f"{value:.2f}{'%' if unit == '%' else ''}"


def task_list() -> str:
    """`salmonn eval --list`: the tasks, their metrics and the paper's figures, as plain lines (to read or grep)."""
    lines = ["task    what it scores: metrics", "        --paper test set: SALMONN-13B's figure", ""]
    for task in TASKS.values():
        lines.append(f"{task.name:<7} {task.what}: {', '.join(task.metrics)}")
        for f in (f for f in PAPER_FIGURES if f.task == task.name):
            note = f" ({f.note})" if f.note else ""
            lines.append(f"        {f.test_set}: {f.metric} {f.value}{'' if f.confirmed else UNCONFIRMED}{note}")
    lines += ["", f"{UNCONFIRMED} read from one secondary source of the paper's table, not yet checked"]
    return "\n".join(lines)

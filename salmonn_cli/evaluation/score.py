"""From the answers on disk to scores: each item's answer is read from its own answer file (written whole, once,
by the batch path), so an item is scored once however many times the run was stopped and resumed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .captions import JavaRuntime, caption_scores
from .manifest import EvalItem
from .metrics import (
    Score,
    Scored,
    bleu,
    contains_accuracy,
    error_rate,
    label_accuracy,
    phone_error_rate,
    yes_no_accuracy,
)
from .plan import EvalPlan

_NOT_ANSWERED = "no answer: the model failed on it, or the run stopped before it"


@dataclass(frozen=True)
class Evaluation:
    """The scores, one row per manifest item (answered or not), and the answers' model identity."""

    scores: tuple[Score, ...]
    rows: tuple[dict, ...]
    answered: int
    records: tuple[dict, ...]  # the answer records scored, in manifest order


def read_answers(answers_dir: Path) -> dict[str, dict]:
    """Every answer record in `answers_dir`, by the audio path the batch path wrote it for."""
    answers = {}
    for path in sorted(answers_dir.glob("*.json")) if answers_dir.is_dir() else ():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not one of ours: the batch path writes whole files (atomically)
        if isinstance(record, dict) and isinstance(record.get("file"), str) and isinstance(record.get("text"), str):
            answers[record["file"]] = record
    return answers


def evaluate(plan: EvalPlan, instruction: str | None, java: JavaRuntime, offline: bool) -> Evaluation:
    """Score the answers found for the plan's items (`instruction`: the run's --instruction, if any)."""
    answers = read_answers(plan.answers_dir)
    found: list[tuple[EvalItem, dict | None, str | None]] = []
    for item, inputs in zip(plan.items, plan.input_items(instruction), strict=True):
        record = answers.get(str(inputs.path))
        if record is not None and record.get("instruction") != inputs.instruction:
            # the manifest's instruction changed since: the settings check cannot see a per-item one
            found.append((item, None, "its answer was made with another instruction: --overwrite redoes it"))
        else:
            found.append((item, record, None if record else _NOT_ANSWERED))
    answered = [(item, record) for item, record, _ in found if record is not None]
    scored = _score(plan, [i for i, _ in answered], [r["text"] for _, r in answered], java, offline) if answered \
        else Scored(())  # fmt: skip
    per_item = iter(scored.items)
    rows = []
    for item, record, problem in found:
        row = {"audio": str(item.audio), **_references(item)}
        if record is None:
            row.update(hypothesis=None, error=problem)
        else:
            row.update(hypothesis=record["text"], instruction=record["instruction"], **next(per_item, {}))
        rows.append(row)
    return Evaluation(scored.scores, tuple(rows), len(answered), tuple(r for _, r in answered))


def _references(item: EvalItem) -> dict:
    return {"reference": item.references[0]} if len(item.references) == 1 else {"references": list(item.references)}


def _score(plan: EvalPlan, items: list[EvalItem], hypotheses: list[str], java: JavaRuntime, offline: bool) -> Scored:
    first = [item.references[0] for item in items]
    every = [item.references for item in items]
    scoring = plan.task.scoring
    if scoring == "words":
        return error_rate(first, hypotheses, plan.language)
    if scoring == "phones":
        return phone_error_rate(first, hypotheses)
    if scoring == "bleu":
        return bleu(every, hypotheses, plan.bleu_tokenizer)
    if scoring in ("captions", "music_captions"):
        return caption_scores(every, hypotheses, music=scoring == "music_captions", java=java, offline=offline)
    if scoring == "label":
        return label_accuracy(first, hypotheses)
    if scoring == "yes_no":
        return yes_no_accuracy(first, hypotheses)
    return contains_accuracy(every, hypotheses)

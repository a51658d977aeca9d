"""`salmonn eval`: the paper's table on your own copy of a test set.

    salmonn eval --list                                                  # tasks, metrics, the paper's figures
    salmonn eval test-clean.jsonl --task asr --paper librispeech-test-clean -o eval/ls-clean
    salmonn eval covost2-en-zh.jsonl --task ast --to zh --paper covost2-en-zh

The answers come from the task commands' batch path (one process per GPU with --gpus or under torchrun, the
items done skipped on a re-run), each into its own file under DIR/answers; then DIR/items.jsonl and
DIR/summary.json are written and the table printed. Heavy imports happen inside the function.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .commands import DECODE_OPTIONS, MODEL_OPTIONS, TASK_OPTIONS, decode_choice, model_choice, with_options

# The task commands' options an evaluation takes; the rest (format, inputs, -o) are its own.
EVAL_RUN_OPTIONS = {name: TASK_OPTIONS[name] for name in ("instruction", "force", "overwrite", "vad", "batch_size",
                                                          "gpus")}  # fmt: skip
# What the answers depend on: a resumed run must have made its answers with the same (device and batching aside).
_ANSWER_SETTINGS = ("model", "whisper", "beats", "llm", "checkpoint", "quant", "quant_backend", "dtype")


@with_options(MODEL_OPTIONS, DECODE_OPTIONS, EVAL_RUN_OPTIONS)
def evaluate(
    manifest: Annotated[
        Optional[Path],
        typer.Argument(help="The test set: jsonl with audio and reference(s).", show_default=False, readable=False),
    ] = None,  # fmt: skip
    task: Annotated[
        Optional[str], typer.Option("--task", help="asr, osr, pr, ast, aac, music, er, sv or sqqa.")
    ] = None,
    output_dir: Annotated[
        Optional[Path],
        typer.Option("--output-dir", "-o", help="Where answers and scores go (default eval-TASK-MANIFEST)."),
    ] = None,  # fmt: skip
    paper: Annotated[
        Optional[str],
        typer.Option(help="The paper's test set to compare with, e.g. librispeech-test-clean (see --list)."),
    ] = None,  # fmt: skip
    lang: Annotated[str, typer.Option("--lang", "-l", help="Spoken language of items that name none.")] = "en",
    to: Annotated[Optional[str], typer.Option("--to", help="ast: target language of items that name none.")] = None,
    bleu_tokenize: Annotated[
        Optional[str],
        typer.Option(help="ast: sacrebleu's tokeniser (default: zh for Chinese, ja-mecab for Japanese, else 13a)."),
    ] = None,  # fmt: skip
    list_tasks: Annotated[
        bool, typer.Option("--list", help="The tasks, their metrics and the paper's figures.")
    ] = False,
    options: dict = None,
) -> None:
    """Score the model on a test set, beside the paper's figures: WER, BLEU, METEOR, accuracy."""
    if list_tasks:
        from ..evaluation.report import task_list

        typer.echo(task_list())
        return
    if manifest is None or task is None:
        raise UsageError("salmonn eval needs a manifest and --task (salmonn eval --list names the tasks)")
    code = _evaluate(manifest, task, output_dir, paper, lang, to, bleu_tokenize, options)
    if code:
        raise typer.Exit(code)


def _evaluate(manifest: Path, task: str, output_dir: Path | None, paper: str | None, lang: str, to: str | None,
              bleu_tokenize: str | None, options: dict) -> int:  # fmt: skip
    from rich.console import Console

    from ..distributed import launched
    from ..evaluation.captions import find_java, java_problem
    from ..evaluation.plan import check_settings, plan_eval
    from ..evaluation.report import print_table, write_report
    from ..evaluation.score import evaluate as score_answers
    from ..hub import is_offline
    from .runner import Task, stderr, warn
    from .tasks import run_items

    plan = plan_eval(task, manifest, output_dir, language=lang, to=to, bleu_tokenize=bleu_tokenize, paper=paper)
    instruction = options["instruction"]
    if instruction is not None and not instruction.strip():
        raise UsageError("--instruction is empty")
    java = find_java() if plan.task.scoring in ("captions", "music_captions") else None
    if java is not None and java_problem(java):
        warn(f"the {plan.task.name} scores will not be computed: {java_problem(java)}")
    settings = _answer_settings(plan, options)
    ranks = launched()
    if ranks.main:
        check_settings(plan.output_dir, settings, options["overwrite"])
    run_options = {**options, "instruction": None, "format": "json", "output_dir": plan.answers_dir,
                   "whole": plan.task.whole}  # fmt: skip
    code = 0
    try:
        run_items(Task(plan.task.command, ""), plan.input_items(instruction), run_options)
    except typer.Exit as exc:  # some items failed (each reported): the others are scored all the same
        code = exc.exit_code
    if not ranks.main:
        return code  # rank 0 scores for the whole job
    stderr.print(f"scoring the {plan.task.what} answers…")
    evaluation = score_answers(plan, instruction, java, offline=is_offline(model_choice(options).offline))
    write_report(plan, evaluation, settings, java)
    print_table(plan, evaluation, Console(soft_wrap=True))
    stderr.print(f"items: {plan.output_dir / 'items.jsonl'}; summary: {plan.output_dir / 'summary.json'}")
    return code


def _answer_settings(plan, options: dict) -> dict:
    """Everything the answers depend on, as JSON: a resumed run checks its own against these."""
    choice, decode = model_choice(options), decode_choice(options)
    chosen = {name: getattr(choice, name) for name in _ANSWER_SETTINGS}
    return {
        "task": plan.task.name,
        **{k: str(v) if isinstance(v, Path) else v for k, v in chosen.items()},
        "decode": asdict(decode.options),
        "seed": decode.seed,
        "lora_scale": decode.lora_scale,
        "instruction": options["instruction"],
        "language": plan.language,
        "target": plan.target,
        "vad": options["vad"],
        "force": options["force"],
    }


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)

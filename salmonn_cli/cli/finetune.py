"""`salmonn finetune`: few-shot activation tuning with QLoRA, and `salmonn finetune make-data` to make its data.

    salmonn finetune make-data clips/*.wav --task story --lora-scale 2.0 -n 12 -o data.jsonl
    salmonn finetune --few-shot data.jsonl -o tuned/        # then: salmonn story x.wav --checkpoint tuned/salmonn.pth

Heavy imports happen inside the functions, so `salmonn finetune --help` loads no torch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EXIT_INTERRUPTED, AudioError, UsageError
from ..finetune.config import FinetuneConfig
from .commands import DECODE_OPTIONS, MODEL_OPTIONS, decode_choice, model_choice, with_options
from .options import FilesArg

TRAIN_PANEL = "Training"
_CONFIG = FinetuneConfig()  # the option defaults are the config's
# `--quant` defaults to 4bit (QLoRA) here and `--quant-backend auto` means bitsandbytes on CPU too (NF4 in
# float32, where quanto would force bfloat16), so both are declared here instead of shared.
TrainQuantBackendOpt = Annotated[
    str, typer.Option(help="auto (bitsandbytes, also on CPU), bitsandbytes or quanto.", rich_help_panel="Model")
]
QUANT_HELP = "LLM base weights: 4bit (NF4, QLoRA), 8bit or none."
TRAIN_MODEL_OPTIONS = {k: v for k, v in MODEL_OPTIONS.items() if k not in ("quant", "compile")}  # no decoding
TRAIN_MODEL_OPTIONS["quant_backend"] = (TrainQuantBackendOpt, _CONFIG.quant_backend)

finetune_app = typer.Typer(
    name="finetune",
    help="Few-shot activation tuning (QLoRA): train the LoRA adapters on a dozen long answers.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


def register(app: typer.Typer) -> None:
    """Add the `finetune` command group to the `salmonn` app."""
    app.add_typer(finetune_app, name="finetune")


def _opt(*names: str, help: str, **kwargs) -> typer.models.OptionInfo:
    return typer.Option(*names, help=help, rich_help_panel=TRAIN_PANEL, **kwargs)


@finetune_app.callback(invoke_without_command=True)
@with_options(TRAIN_MODEL_OPTIONS)
def train(
    ctx: typer.Context,
    options: dict,
    few_shot: Annotated[Optional[Path], _opt("--few-shot", help="Training data: jsonl, one example per line.")] = None,
    output_dir: Annotated[Optional[Path], _opt("--output-dir", "-o", help="Where the checkpoint goes.")] = None,
    val_split: Annotated[float, _opt("--val-split", min=0.0, max=0.9, help="Hold out this share.")] = 0.0,
    val: Annotated[Optional[Path], _opt("--val", help="Held-out examples (jsonl) for a validation loss.")] = None,
    steps: Annotated[Optional[int], _opt("--steps", min=1, help="Optimizer steps (default: from --epochs).")] = None,
    epochs: Annotated[int, _opt("--epochs", min=1, help="Passes over the data.")] = _CONFIG.epochs,
    lr: Annotated[float, _opt("--lr", min=0.0, help="Peak learning rate.")] = _CONFIG.lr,
    batch_size: Annotated[int, _opt("--batch-size", min=1, help="Examples per forward pass.")] = _CONFIG.batch_size,
    grad_accum: Annotated[int, _opt("--grad-accum", min=1, help="Forward passes per optimizer step.")] = (
        _CONFIG.grad_accum
    ),
    seed: Annotated[int, _opt("--seed", help="Seed of the data order, dropout and split.")] = _CONFIG.seed,
    save_every: Annotated[int, _opt("--save-every", min=1, help="Save the state every N steps.")] = _CONFIG.save_every,
    eval_every: Annotated[int, _opt("--eval-every", min=1, help="Validation loss every N steps.")] = _CONFIG.eval_every,
    resume: Annotated[bool, _opt("--resume", help="Continue the run saved in --output-dir.")] = False,
    train_connector: Annotated[
        bool, _opt("--train-connector", help="Also train the Q-Former and the projection.")
    ] = False,
    max_text_tokens: Annotated[int, _opt("--max-text-tokens", min=1, help="Longest response, in tokens.")] = (
        _CONFIG.max_text_tokens
    ),
    lora_dropout: Annotated[float, _opt("--lora-dropout", min=0.0, max=0.99, help="LoRA dropout while training.")] = (
        _CONFIG.lora_dropout
    ),
    quant: Annotated[str, typer.Option("--quant", "-q", help=QUANT_HELP, rich_help_panel="Model")] = _CONFIG.quant,
) -> None:
    """Few-shot activation tuning: a few steps on a dozen long answers at LoRA scale 4.0 (QLoRA).

    Data: one JSON object per line, {"audio": "clips/a.wav", "instruction": "...", "response": "..."}
    ("task": "story" instead of "instruction" picks a preset; audio paths are relative to the file).
    Writes OUT/salmonn.pth (load it with --checkpoint), OUT/salmonn.safetensors and OUT/finetune.json.
    """
    if ctx.invoked_subcommand is not None:
        return
    if few_shot is None or output_dir is None:
        raise UsageError("salmonn finetune needs --few-shot DATA.jsonl and --output-dir OUT (or: make-data --help)")
    config = FinetuneConfig(
        lr=lr, epochs=epochs, steps=steps, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
        save_every=save_every, eval_every=eval_every, quant=quant, quant_backend=options["quant_backend"],
        train_connector=train_connector, max_text_tokens=max_text_tokens, lora_dropout=lora_dropout,
    )  # fmt: skip
    code = _train(config, few_shot, output_dir, val, val_split, resume, {**options, "quant": quant})
    if code:
        raise typer.Exit(code)


def _train(config, few_shot: Path, out_dir: Path, val: Path | None, val_split: float, resume: bool, options) -> int:
    """Validate, load, train, save. Returns the exit code (130 when interrupted).

    Under a launcher, every rank trains a replica on its own device on its share of each step (see
    finetune.train); rank 0 prints and writes."""
    from ..distributed import device_for, launched, main_first, process_group
    from ..finetune.save import check_output_dir
    from .runner import stderr

    ranks = launched()
    config = replace(config, processes=ranks.world)
    check_output_dir(out_dir, resume=resume)  # before anything slow: a taken folder is a usage error
    with process_group(ranks, device_for(ranks, options["device"])):  # joined after each rank checked the folder
        with main_first(ranks):  # rank 0 downloads what is missing; the others then find it in the cache
            choice, spec_name = _resolved_choice(options, config, ranks)
        code, run = _fit(config, few_shot, out_dir, val, val_split, resume, choice, spec_name, ranks)
    if not ranks.main or code:
        return code
    result = run.result
    val_text = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    stderr.print(f"done: {result.steps_done} steps in {result.wall_s:.1f} s, loss {result.first_loss:.4f} ->"
                 f" {result.final_loss:.4f}{val_text}")  # fmt: skip
    stderr.print(f"checkpoint: {run.outputs.checkpoint} (use it with --checkpoint; report in {run.outputs.report})")
    return 0


def _fit(config, few_shot, out_dir, val, val_split, resume, choice, spec_name, ranks):
    """(exit code, the run) of the training itself, on every rank."""
    import os

    from rich.console import Console

    from ..finetune.data import load_data
    from ..finetune.progress import Reporter
    from ..finetune.recipe import run_finetune
    from ..tokenizer import load_tokenizer
    from .runner import open_model, stderr

    data = load_data(few_shot, tokenizer=load_tokenizer(choice.llm), max_text_tokens=config.max_text_tokens,
                     val_path=val, val_split=val_split, seed=config.seed)  # fmt: skip
    console = stderr if ranks.main else Console(file=open(os.devnull, "w"))  # rank 0 speaks for the job
    console.print(f"[bold]finetune[/] {spec_name}: {len(data.train)} training, {len(data.val)} validation examples")
    for line in config.describe(len(data.train)):
        console.print(f"  {line}")
    loaded = open_model(choice)
    base = _base_model(spec_name, Path(choice.checkpoint), loaded.checkpoint_sha256)
    extra = {"device": loaded.device, "quantization": loaded.quantization}
    run = run_finetune(loaded.model, data, config, out_dir, base=base, resume=resume,
                       reporter=Reporter(console), extra=extra, ranks=ranks)  # fmt: skip
    if run.outputs is None:
        if ranks.main:
            stderr.print(f"interrupted at step {run.result.steps_done}/{run.result.total_steps}; the state is saved "
                         f"in {out_dir}: run the same command with --resume to continue")  # fmt: skip
        return EXIT_INTERRUPTED, run
    return 0, run


def _resolved_choice(options: dict, config, ranks):
    """The model choice with all four components resolved to local paths (downloaded when missing and online),
    the quantisation training uses (bitsandbytes unless a backend is named), and each rank's own device."""
    from ..distributed import device_for
    from .runner import resolve_model

    choice = replace(model_choice(options), device=device_for(ranks, options["device"]))
    spec, paths = resolve_model(choice)
    backend = "bitsandbytes" if config.quant_backend == "auto" else config.quant_backend
    resolved = replace(choice, whisper=paths.whisper, beats=paths.beats, llm=paths.llm, checkpoint=paths.checkpoint,
                       quant=config.quant, quant_backend=backend)  # fmt: skip
    return resolved, spec.name


def _base_model(name: str, checkpoint: Path, known_sha256: str | None):
    from ..finetune.save import BaseModel
    from ..hub import sha256_of

    return BaseModel(name, checkpoint, known_sha256 or sha256_of(checkpoint))


@finetune_app.command("make-data")
@with_options(MODEL_OPTIONS, DECODE_OPTIONS)
def make_data(
    files: FilesArg,
    options: dict,
    output: Annotated[Path, typer.Option("--output", "-o", help="The jsonl file to write.", show_default=False)],
    task: Annotated[str, typer.Option(help="Instruction preset: story, caption, music, co_reasoning, ...")] = "story",
    instruction: Annotated[Optional[str], typer.Option(help="Your own instruction instead of --task's.")] = None,
    n: Annotated[Optional[int], typer.Option("-n", min=1, help="Examples to write (default: one per file).")] = None,
) -> None:
    """Make activation data: the model's own answers at a lowered LoRA scale (default 2.0) about the first 30 s
    of each file, written as jsonl for review and `salmonn finetune --few-shot`."""
    from ..finetune.data import TASK_PRESETS
    from ..finetune.make_data import make_examples, plan_inputs, write_examples
    from ..generate import seeded_generator
    from ..model_file import WAKE_UP_LORA_SCALE
    from .runner import open_model, stderr

    if instruction is None and task not in TASK_PRESETS:
        raise UsageError(f"unknown --task {task!r}: use one of {', '.join(TASK_PRESETS)}, or --instruction")
    text = instruction.strip() if instruction is not None else TASK_PRESETS[task]
    if not text:
        raise UsageError("--instruction is empty")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise AudioError(f"audio file not found: {', '.join(missing)}")
    decode = decode_choice(options)
    inputs = plan_inputs(files, n, sampling=decode.options.do_sample)
    loaded = open_model(model_choice(options), long_lived=len(inputs) > 1)
    scale = decode.scale_for(WAKE_UP_LORA_SCALE)

    def show(i: int, example, path: Path) -> None:
        answer = "(empty answer: skipped)" if example is None else example.response[:70].replace("\n", " ")
        stderr.print(f"[{i + 1}/{len(inputs)}] {path.name}: {answer}")

    generator = seeded_generator(decode.seed, loaded.model.device)  # reproducible data when sampling
    made = make_examples(
        loaded.model, inputs, text, decode.options, lora_scale=scale, generator=generator, on_example=show
    )
    write_examples(output, made)
    stderr.print(f"wrote {len(made)} example(s) to {output} (LoRA scale {scale}); review them, then:"
                 f" salmonn finetune --few-shot {output} -o OUT")  # fmt: skip
    if len(made) < len(inputs):
        raise typer.Exit(1)


"""`salmonn train`: build your own audio LLM from a recipe, stage by stage (SpeechVerse's or SALMONN's).

    salmonn train --recipe speechverse --print > my.toml     # a built-in recipe, to edit
    salmonn train my.toml -o out/                            # every stage; then: salmonn ask --model out/model.toml
    salmonn train my.toml -o out/ --stage align              # one stage (the ones before it must be done)
    salmonn train my.toml -o out/ --resume                   # after Ctrl-C or a crash: on from the last save

Heavy imports happen inside the function, so `salmonn train --help` loads no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EXIT_INTERRUPTED, UsageError
from .options import DeviceOpt, OfflineOpt


def train(
    recipe_file: Annotated[Optional[Path], typer.Argument(help="The recipe (TOML).", show_default=False)] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="A built-in recipe: speechverse, salmonn.")] = None,
    print_recipe: Annotated[bool, typer.Option("--print", help="Write the --recipe's TOML to stdout.")] = False,
    stage: Annotated[Optional[str], typer.Option("--stage", help="Train this stage only.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Where the run goes.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --output-dir.")] = False,
    device: DeviceOpt = "auto",
    offline: OfflineOpt = False,
) -> None:
    """Train an audio LLM from a recipe: the encoder(s), the connector, the LLM, LoRA and the stages.

    Each stage trains its parts on its data (jsonl like finetune's: audio, task or instruction, response) and
    starts from the previous stage's result. OUT/model.toml is the last stage's model; every command runs it
    with --model OUT/model.toml. Under torchrun or accelerate launch, each process trains on its own device.
    """
    from .runner import stderr

    if print_recipe or recipe is not None:
        if not (print_recipe and recipe is not None and recipe_file is None):
            raise UsageError("--recipe NAME --print writes a built-in recipe to edit; train the edited file with"
                             " `salmonn train FILE.toml`")  # fmt: skip
        from ..train.recipe import builtin_recipe_text

        typer.echo(builtin_recipe_text(recipe), nl=False)
        return
    if recipe_file is None:
        raise UsageError("salmonn train needs a recipe file (salmonn train --recipe speechverse --print > my.toml)")
    code = _train(recipe_file, stage, output_dir, resume, device, offline, stderr)
    if code:
        raise typer.Exit(code)


def _train(recipe_file: Path, stage: str | None, output_dir: Path | None, resume: bool, device: str, offline: bool,
           stderr) -> int:  # fmt: skip
    import os

    from rich.console import Console
    from transformers.utils import logging as transformers_logging

    from ..distributed import device_for, launched, main_first, process_group
    from ..loading import resolve_device
    from ..train.recipe import load_recipe
    from ..train.run import check_output, run_recipe

    transformers_logging.disable_progress_bar()  # each stage says what it loads and trains
    recipe = load_recipe(recipe_file)
    if stage is not None:
        recipe.stage(stage)  # an unknown stage is refused before anything loads
    out = (output_dir or Path(f"{recipe.name}-run")).expanduser().resolve()  # model files name absolute paths
    check_output(recipe, out, resume=resume)
    ranks = launched()
    torch_device = resolve_device(device_for(ranks, device))
    console = stderr if ranks.main else Console(file=open(os.devnull, "w"))  # rank 0 speaks for the job
    with process_group(ranks, torch_device):
        with main_first(ranks):  # rank 0 downloads what is missing; the others then find it in the cache
            components = _components(recipe, offline, console)
        console.print(f"[bold]train[/] {recipe.name} ({recipe.family}) on {torch_device}: stages"
                      f" {recipe.stage_names()}; output in {out}")  # fmt: skip
        results = run_recipe(recipe, out, components, only=stage, resume=resume, device=torch_device,
                             console=console, ranks=ranks)  # fmt: skip
    if results and results[-1].interrupted:
        fit = results[-1].fit
        console.print(f"interrupted in stage {results[-1].name} at step {fit.steps_done}/{fit.total_steps}; the"
                      f" state is saved in {out}: run the same command with --resume to continue")  # fmt: skip
        return EXIT_INTERRUPTED
    if ranks.main and (out / "model.toml").is_file():
        console.print(f"model: {out / 'model.toml'} (salmonn ask --model {out / 'model.toml'} CLIP)")
    return 0


def _components(recipe, offline: bool, console):
    """Every component on this machine: local ones checked, Hub ones from the cache or downloaded."""
    from ..hub import resolve_component
    from ..train.run import Components

    def show(line: str) -> None:
        console.print(f"[dim]{line}[/]")

    def find(component):
        return resolve_component(component, model_arg=str(recipe.file), offline=offline, progress=show).path

    return Components(tuple(find(e.component) for e in recipe.encoders), find(recipe.llm.component))


def register(app: typer.Typer) -> None:
    app.command("train")(train)

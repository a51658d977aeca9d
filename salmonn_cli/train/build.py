"""A stage's model, built from the recipe and the previous stage's result (or fresh), and its outputs written.

The SALMONN recipe builds the published `SalmonnModel` through `load_model` from a SALMONN checkpoint (a fresh
one for the first stage); the others build a `ComposedModel` through `load_composed`. Either way the stage's
`TrainingTarget` says what it trains.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..distributed import main_first
from .composed_file import WEIGHTS_FILE, composed_spec_of
from .recipe import StageSpec, TrainRecipe

INIT_DIR = "init"  # OUT/init/salmonn.pth: the SALMONN recipe's fresh checkpoint
CHECKPOINT_FILE = "salmonn.pth"
SAFETENSORS_FILE = "salmonn.safetensors"


@dataclass(frozen=True)
class BuiltStage:
    model: object
    target: object  # finetune.target.TrainingTarget
    start_identity: str  # the sha256 of the weights the stage starts from, or how fresh ones were made
    spec: object | None = None  # composed models: the ComposedSpec with the template and LoRA targets resolved


def build_stage_model(recipe: TrainRecipe, stage: StageSpec, components, previous: Path | None, device, config,
                      *, init: Path, ranks=None) -> BuiltStage:  # fmt: skip
    """The model a stage trains, from the `previous` stage's folder (None: the first stage, fresh weights; the
    SALMONN recipe writes its fresh checkpoint at `init`), with its training target."""
    import torch

    from ..distributed import ALONE
    from ..finetune.train import training_quantization

    ranks = ranks or ALONE
    device = torch.device(device)
    quant = training_quantization(recipe.llm.quant, config.quant_backend)
    if recipe.family == "salmonn":
        return _salmonn_stage(recipe, stage, components, previous or init, device, quant, ranks)
    return _composed_stage(recipe, stage, components, previous, device, quant)


def _composed_stage(recipe, stage, components, previous, device, quant) -> BuiltStage:
    import torch

    from ..hub import sha256_of
    from ..loading import llm_quantization
    from .composed_file import load_composed
    from .target import ComposedTraining

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = previous / WEIGHTS_FILE if previous is not None else None
    spec = replace(composed_spec_of(recipe), weights=weights)
    quantization = llm_quantization(quant, device, dtype) if quant.enabled else None
    model, resolved = load_composed(
        spec, encoder_path=components.encoders[0], llm_path=components.llm, device=device, dtype=dtype,
        quantization=quantization, seed=recipe.seed,
    )  # fmt: skip
    target = ComposedTraining(model, stage.train, lora_dropout=recipe.lora.dropout,
                              max_text_tokens=stage.max_text_tokens)  # fmt: skip
    start = sha256_of(weights) if weights is not None else f"fresh connector and LoRA, seed {recipe.seed}"
    return BuiltStage(model, target, start, resolved)


def _salmonn_stage(recipe, stage, components, start: Path, device, quant, ranks) -> BuiltStage:
    from ..finetune.target import SalmonnTraining
    from ..hub import sha256_of
    from ..loading import BERT_HEAD_WIDTH, load_model
    from ..model_file import ModelSettings
    from .composed_file import chat_template_of
    from .salmonn_family import write_initial_checkpoint

    checkpoint = start / CHECKPOINT_FILE
    with main_first(ranks):  # rank 0 writes the fresh checkpoint (seeded, so a rerun writes the same one)
        if ranks.main and not checkpoint.is_file():
            write_initial_checkpoint(recipe, components.whisper, components.beats, components.llm, checkpoint)
    window = recipe.connector.window_seconds
    settings = ModelSettings(
        second_per_window=window, second_stride=window,
        qformer_heads=max(1, recipe.connector.qformer_hidden // BERT_HEAD_WIDTH), lora_scale=recipe.lora.scale,
        prompt_template=recipe.prompt_template or chat_template_of(components.llm, False),
    )  # fmt: skip
    model = load_model(components.whisper, components.beats, components.llm, checkpoint, device=device,
                       quantization=quant, settings=settings)  # fmt: skip
    target = SalmonnTraining(model, connector="connector" in stage.train, lora="lora" in stage.train,
                             lora_dropout=recipe.lora.dropout, max_text_tokens=stage.max_text_tokens)  # fmt: skip
    return BuiltStage(model, target, sha256_of(checkpoint))


def write_stage_outputs(recipe: TrainRecipe, stage: StageSpec, built: BuiltStage, components, folder: Path) -> Path:
    """The stage's weights and its model file in `folder`; returns the model file."""
    description = f"trained by `salmonn train` (recipe {recipe.name}, stage {stage.name})"
    name = f"{recipe.name}-{stage.name}"
    if recipe.family == "salmonn":
        return _write_salmonn(recipe, built.model, components, folder, name, description)
    from safetensors.torch import save_file

    from ..atomic import write_atomically
    from .composed_file import trained_tensors, write_composed_file

    weights = folder / WEIGHTS_FILE
    tensors = trained_tensors(built.model)
    write_atomically(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    spec = replace(built.spec, name=name, description=description)
    return write_composed_file(folder, spec, weights=weights, encoder_path=components.encoders[0],
                               llm_path=components.llm)  # fmt: skip


def _write_salmonn(recipe, model, components, folder: Path, name: str, description: str) -> Path:
    import torch
    from safetensors.torch import save_file

    from ..atomic import write_atomically
    from ..checkpoint import original_lora_key, salmonn_state_dict
    from .salmonn_family import write_salmonn_model_file

    lora = {n: t.detach().float().cpu().contiguous() for n, t in model.llm.state_dict().items() if original_lora_key(n)}
    connector = {n: t.detach().float().cpu().contiguous() for n, t in model.connector.state_dict().items()}
    tensors = salmonn_state_dict(connector, lora)
    checkpoint = folder / CHECKPOINT_FILE
    write_atomically(checkpoint, lambda tmp: torch.save({"model": tensors}, tmp))
    write_atomically(folder / SAFETENSORS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return write_salmonn_model_file(folder, name, description, model, whisper=components.whisper,
                                    beats=components.beats, llm=components.llm, checkpoint=checkpoint,
                                    recipe=recipe)  # fmt: skip

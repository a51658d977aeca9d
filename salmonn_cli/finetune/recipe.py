"""The recipe end to end, for a model already loaded for training: data -> setup -> fit -> save.

>>> config = FinetuneConfig()
>>> model = load_model(whisper, beats, llm, ckpt, quantization=training_quantization(config.quant))
>>> data = load_data("data.jsonl", tokenizer=model.tokenizer, max_text_tokens=config.max_text_tokens)
>>> run = run_finetune(model, data, config, "out", base=BaseModel("salmonn-13b", ckpt, sha256_of(ckpt)))
>>> run.outputs.checkpoint  # out/salmonn.pth: load_model(..., checkpoint) or `--checkpoint` reads it
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import FinetuneConfig
from .data import FewShotData
from .save import BaseModel, FinetuneOutputs, prepare_output_dir, write_outputs


@dataclass(frozen=True)
class FinetuneRun:
    """A run's result; `outputs` is None when it was interrupted (its state is saved for `--resume`)."""

    result: object  # train.FitResult
    outputs: FinetuneOutputs | None


def run_finetune(
    model,
    data: FewShotData,
    config: FinetuneConfig,
    out_dir: str | Path,
    *,
    base: BaseModel,
    resume: bool = False,
    reporter=None,
    extra: dict | None = None,
    ranks=None,
) -> FinetuneRun:
    """Train `model` on `data` under `config`, saving states and outputs in `out_dir`.

    resume: continue from `out_dir/state.pt` (same config, data and base checkpoint, else a UsageError).
    extra: more fields for finetune.json (device, quantisation, ...).
    ranks: this process's place in a launched job (`distributed.Ranks`); rank 0 writes the outputs.
    """
    from ..distributed import ALONE
    from .state import load_state
    from .target import SalmonnTraining
    from .train import Trainer

    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, resume=resume)
    identity = {
        "base_checkpoint_sha256": base.checkpoint_sha256,
        "train_sha256": data.train_sha256,
        "val_sha256": data.val_sha256,
    }
    ranks = ranks or ALONE
    target = SalmonnTraining(model, connector=config.train_connector, lora_dropout=config.lora_dropout,
                             lora_scale=config.lora_scale, max_text_tokens=config.max_text_tokens)  # fmt: skip
    trainer = Trainer(target, config, data.train, data.val, identity=identity, ranks=ranks)
    try:
        if resume:
            trainer.load(load_state(out_dir))
        result = trainer.fit(out_dir, reporter)
        if result.interrupted:
            return FinetuneRun(result, None)
        if not ranks.main:  # the same weights as rank 0's, which writes them
            return FinetuneRun(result, FinetuneOutputs(*(None,) * 3))
        extra = {"model_name": base.name, **(extra or {})}
        return FinetuneRun(result, write_outputs(out_dir, model, base, data, config, result, extra=extra))
    finally:
        trainer.release()  # after writing: the trained connector is saved from its float32 master weights

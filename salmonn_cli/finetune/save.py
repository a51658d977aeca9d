"""A run's outputs in OUT_DIR: `salmonn.pth` (the SALMONN format, original key names), `salmonn.safetensors` (the
same tensors) and `finetune.json` (what was trained on what, with which settings, and how the loss went).

The checkpoint holds the LoRA matrices and the connector (trained, or the base checkpoint's own tensors), so
it is a complete SALMONN checkpoint: every command loads it with `--checkpoint`, and so would the original.
Each file is written atomically; `finetune.json` comes last, so its presence means the run is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_atomically
from ..checkpoint import original_lora_key, read_salmonn_checkpoint, salmonn_state_dict
from ..errors import UsageError
from .config import FinetuneConfig
from .data import FewShotData
from .state import STATE_FILE

CHECKPOINT_FILE = "salmonn.pth"
SAFETENSORS_FILE = "salmonn.safetensors"
REPORT_FILE = "finetune.json"


@dataclass(frozen=True)
class BaseModel:
    """The model a run starts from: its name and the SALMONN checkpoint it was loaded with."""

    name: str
    checkpoint: Path
    checkpoint_sha256: str


@dataclass(frozen=True)
class FinetuneOutputs:
    """Where a finished run's files are."""

    checkpoint: Path
    safetensors: Path
    report: Path


def check_output_dir(out_dir: Path, *, resume: bool) -> None:
    """A fresh run needs an empty or new folder; `--resume` needs one holding a saved state. Creates nothing."""
    out_dir = Path(out_dir)
    if resume:
        if not (out_dir / STATE_FILE).is_file():
            raise UsageError(f"nothing to resume: {out_dir} holds no {STATE_FILE} (start without --resume)")
        return
    taken = [n for n in (STATE_FILE, CHECKPOINT_FILE, REPORT_FILE) if (out_dir / n).exists()]
    if taken:
        raise UsageError(
            f"{out_dir} already holds a fine-tuning run ({', '.join(taken)}): --resume continues it, or choose"
            " another --output-dir"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output-dir {out_dir} is a file, not a folder")


def prepare_output_dir(out_dir: Path, *, resume: bool) -> None:
    """`check_output_dir`, then create the folder."""
    check_output_dir(out_dir, resume=resume)
    Path(out_dir).mkdir(parents=True, exist_ok=True)


def checkpoint_tensors(model, base: BaseModel, *, connector_trained: bool) -> dict:
    """The state dict to save, with the original key names: every LoRA matrix, and the connector."""
    lora = {n: t.detach().float().cpu().contiguous() for n, t in model.llm.state_dict().items() if original_lora_key(n)}
    if connector_trained:
        connector = {n: t.detach().float().cpu().contiguous() for n, t in model.connector.state_dict().items()}
    else:  # the base file's own tensors, bit for bit (the loaded copy may have been cast to float16)
        connector = read_salmonn_checkpoint(base.checkpoint).connector
        connector = {n: t.detach().clone().contiguous() for n, t in connector.items()}
    return salmonn_state_dict(connector, lora)


def write_outputs(
    out_dir: Path, model, base: BaseModel, data: FewShotData, config: FinetuneConfig, result, *, extra: dict
) -> FinetuneOutputs:
    """Write the checkpoint, its safetensors copy and finetune.json (last) into `out_dir`."""
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tensors = checkpoint_tensors(model, base, connector_trained=config.train_connector)
    paths = FinetuneOutputs(out_dir / CHECKPOINT_FILE, out_dir / SAFETENSORS_FILE, out_dir / REPORT_FILE)
    write_atomically(paths.checkpoint, lambda tmp: torch.save({"model": tensors}, tmp))
    metadata = {"format": "pt", "base_checkpoint_sha256": base.checkpoint_sha256}
    write_atomically(paths.safetensors, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    report = run_report(base, data, config, result, extra)
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    write_atomically(paths.report, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return paths


def run_report(base: BaseModel, data: FewShotData, config: FinetuneConfig, result, extra: dict) -> dict:
    """The content of finetune.json."""
    return {
        "base": {"model": base.name, "checkpoint": str(base.checkpoint), "checkpoint_sha256": base.checkpoint_sha256},
        "data": {
            "train_examples": len(data.train),
            "train_sha256": data.train_sha256,
            "val_examples": len(data.val),
            "val_sha256": data.val_sha256,
        },
        "hyperparameters": config.as_dict(),
        "steps": result.steps_done,
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "val_loss": result.val_loss,
        "losses": list(result.losses),
        "val_losses": [list(v) for v in result.val_losses],
        "wall_s": round(result.wall_s, 3),
        "files": {"checkpoint": CHECKPOINT_FILE, "safetensors": SAFETENSORS_FILE},
        **extra,
    }

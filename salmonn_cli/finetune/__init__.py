"""Few-shot activation tuning (QLoRA) of SALMONN: data (jsonl) -> setup -> fit -> save; resumable.

Modules: `config` (FinetuneConfig), `data` (validation, FewShotExample, hashes, validation split), `train`
(Trainer: setup + fit), `state` (the resumable state on disk), `save` (the SALMONN checkpoint, its safetensors
copy, finetune.json), `recipe` (all of it for a loaded model), `make_data` (activation data from the model at a
lowered LoRA scale). Importing this package imports no torch; the names below load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FinetuneConfig": "config",
    "FewShotExample": "data",
    "FewShotData": "data",
    "DataError": "data",
    "load_data": "data",
    "read_examples": "data",
    "BaseModel": "save",
    "FinetuneOutputs": "save",
    "FinetuneRun": "recipe",
    "run_finetune": "recipe",
    "Trainer": "train",
    "FitResult": "train",
    "training_quantization": "train",
    "make_examples": "make_data",
    "write_examples": "make_data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

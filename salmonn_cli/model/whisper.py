"""Whisper's encoder (transformers) from an HF Whisper folder, without ever building the decoder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..weights import WeightFolder, load_strict

_WHISPER_ENCODER_PREFIXES = ("model.encoder.", "encoder.")  # WhisperForConditionalGeneration / WhisperModel


def load_whisper_encoder(folder: str | Path, *, device: str | torch.device, dtype: torch.dtype):
    """`(WhisperEncoder, WhisperFeatureExtractor)` of an HF Whisper folder; the encoder frozen and in eval mode.

    The encoder is built on the meta device and adopts the file's tensors, so no memory is spent on random
    initial weights, and only encoder tensors are read (the decoder's never leave the disk).
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder = Path(folder)
    try:
        config = WhisperConfig.from_pretrained(str(folder))
        extractor = WhisperFeatureExtractor.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"not a Hugging Face Whisper folder: {exc}", path=folder) from None
    tensors = read_whisper_encoder(folder)
    with torch.device("meta"):
        encoder = WhisperEncoder(config)
    load_strict(encoder, tensors, path=folder, assign=True)
    encoder.to(device=device, dtype=dtype)
    encoder.requires_grad_(False)
    return encoder.eval(), extractor


def read_whisper_encoder(folder: str | Path) -> dict[str, torch.Tensor]:
    """Read only the encoder tensors of a Hugging Face Whisper folder (decoder weights are never loaded).

    Handles `model.safetensors` and `pytorch_model.bin`, single or sharded (with their index files).
    """
    weights = WeightFolder(folder)
    tensors = {}
    for key in weights.keys():
        for prefix in _WHISPER_ENCODER_PREFIXES:
            if key.startswith(prefix):
                tensors[key[len(prefix) :]] = weights.get(key)
                break
    weights.close()
    if not tensors:
        raise CheckpointError("no Whisper encoder weights found (keys 'model.encoder.*' or 'encoder.*')", path=folder)
    return tensors

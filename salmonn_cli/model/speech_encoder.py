"""A frozen speech encoder that yields every hidden state: Whisper's encoder (any size) or WavLM (transformers).

Every clip is heard as one model window: the first 30 s, zero-padded to the full 30 s (Whisper's encoder only
takes 30 s; WavLM is padded the same way), so every clip of a model gives the same number of frames, as
SALMONN's Q-Former gives every clip 88 tokens. Both run at 50 Hz: Whisper 1500 frames, WavLM 1499.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..audio import SAMPLE_RATE, WINDOW_SAMPLES, model_window
from ..errors import CheckpointError
from ..features import whisper_log_mel

SPEECH_ENCODER_KINDS = ("whisper", "wavlm")
FRAME_RATE_HZ = 50  # both: 20 ms per frame


class SpeechEncoder(nn.Module):
    """`forward(inputs) -> (S, B, T, D)`: the embedding output and every layer's, in order (S = layers + 1)."""

    def __init__(self, kind: str, model: nn.Module, extractor) -> None:
        super().__init__()
        self.kind, self.model, self.extractor = kind, model, extractor
        config = model.config
        self.width = config.d_model if kind == "whisper" else config.hidden_size
        self.states = (config.encoder_layers if kind == "whisper" else config.num_hidden_layers) + 1

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def inputs(self, waveform: np.ndarray) -> torch.Tensor:
        """One clip's encoder input: Whisper's log-mel (1, 80, 3000) or WavLM's normalised samples (1, 480000)."""
        window = model_window(waveform)
        if self.kind == "whisper":
            return torch.from_numpy(whisper_log_mel(self.extractor, window))[None]
        values = self.extractor(window, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values[0]
        padded = np.zeros(WINDOW_SAMPLES, dtype=np.float32)  # normalised on the clip itself, then padded with 0
        padded[: values.shape[0]] = values
        return torch.from_numpy(padded)[None]

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = self.model(inputs.to(device, self.dtype), output_hidden_states=True)
        return torch.stack(out.hidden_states)  # (S, B, T, D)


def load_speech_encoder(kind: str, folder: str | Path, *, device, dtype: torch.dtype) -> SpeechEncoder:
    """The encoder of an HF Whisper folder (the decoder is never read) or an HF WavLM folder, frozen, eval mode."""
    folder = Path(folder)
    if kind == "whisper":
        from .whisper import load_whisper_encoder

        encoder, extractor = load_whisper_encoder(folder, device=device, dtype=dtype)
        return SpeechEncoder(kind, encoder, extractor).eval()
    from transformers import Wav2Vec2FeatureExtractor, WavLMModel

    try:
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder))
        model = WavLMModel.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"not a Hugging Face WavLM folder: {exc}", path=folder) from None
    model.to(device).requires_grad_(False)
    return SpeechEncoder(kind, model.eval(), extractor).eval()

"""silero-vad, the one owner: how it is loaded, the frame it decides on and the settings both of its users share.

Long audio (`segment.py`) runs it over a whole file at once to cut at pauses; `salmonn live`
(`live/segmenter.py`) runs it frame by frame on the microphone. Its weights ship in the wheel.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import TYPE_CHECKING

from .errors import DependencyError
from .window import SAMPLE_RATE, WINDOW_SAMPLES

if TYPE_CHECKING:
    import numpy as np

FRAME_SAMPLES = 512  # one silero decision per 32 ms at 16 kHz
THRESHOLD = 0.5  # silero's own default: its probabilities are calibrated around it
MIN_SPEECH_S = 0.25  # shorter "speech" is a click or a cough, not a word worth a span
_STREAM_FRAMES = math.ceil(WINDOW_SAMPLES / FRAME_SAMPLES)  # 30 s per parallel stream (see speech_probabilities)
_WARMUP_FRAMES = 63  # ~2 s of audio before each stream, run and discarded, so its LSTM state is warm


def silero():
    """The silero_vad module, or a DependencyError saying what to install."""
    try:
        import silero_vad
        from silero_vad.utils_vad import get_speech_timestamps_from_probs  # noqa: F401  (silero-vad >= 6)
    except ImportError:
        raise DependencyError("cutting long audio at pauses needs silero-vad: pip install -U silero-vad") from None
    return silero_vad


def new_model():
    """A fresh silero-vad JIT model: its streaming state is its own."""
    silero_vad = silero()
    with warnings.catch_warnings():  # its loader uses importlib.resources.path and torch.jit.load: deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return silero_vad.load_silero_vad()


@lru_cache(maxsize=1)
def shared_model():
    """One model per process for whole files (`speech_probabilities` keeps no state between calls)."""
    return new_model()


def speech_probabilities(waveform: np.ndarray) -> np.ndarray:
    """Silero's speech probability per 512-sample frame of a 16 kHz waveform, (F,) with F = ceil(T / 512).

    Long audio is split into 30 s streams run as one batch (the model is a small LSTM: one frame at a time is
    slow, many streams at once cost about the same per step, ~10x faster on a CPU). Each stream first hears the
    2 s before it so its state is warm; those warm-up frames are dropped.
    """
    import numpy as np
    import torch

    model = shared_model()
    n_frames = math.ceil(waveform.shape[0] / FRAME_SAMPLES)
    n_streams = max(1, math.ceil(n_frames / _STREAM_FRAMES))
    stream_frames = math.ceil(n_frames / n_streams)
    warmup = _WARMUP_FRAMES if n_streams > 1 else 0
    total = (warmup + n_streams * stream_frames) * FRAME_SAMPLES
    padded = np.zeros(total, np.float32)  # warm-up zeros, the audio, zeros to a whole number of streams
    padded[warmup * FRAME_SAMPLES : warmup * FRAME_SAMPLES + waveform.shape[0]] = waveform
    step = stream_frames * FRAME_SAMPLES
    width = (warmup + stream_frames) * FRAME_SAMPLES
    streams = np.lib.stride_tricks.sliding_window_view(padded, width)[::step].copy()  # (B, (W+S) * 512) samples
    with torch.inference_mode():
        probs = model.audio_forward(torch.from_numpy(streams), SAMPLE_RATE)  # (B, warmup + stream_frames)
    return probs[:, warmup:].reshape(-1).numpy()[:n_frames]

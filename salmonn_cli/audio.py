"""Audio in: any file soundfile reads, any rate, any channel count -> 16 kHz mono float32.

Constants carry their units in their names. The model sees at most one window of audio; cutting longer
audio into windows is the caller's business (see `model_window`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000  # Hz: what Whisper and BEATs were trained on
MIN_SECONDS = 1.0  # the original pads shorter audio with zeros up to one second
WINDOW_SECONDS = 30.0  # Whisper's receptive field: the model hears at most this much at once
MIN_SAMPLES = int(MIN_SECONDS * SAMPLE_RATE)
WINDOW_SAMPLES = int(WINDOW_SECONDS * SAMPLE_RATE)


def load_audio(path: str | Path) -> np.ndarray:
    """Read an audio file and return it as a 1-D float32 array at 16 kHz, channels averaged to mono.

    Any format soundfile reads (wav, flac, ogg, mp3, ...) at any sample rate; resampling uses soxr (HQ).
    Raises AudioError for a missing, unreadable or empty file.
    """
    import soundfile as sf

    from .errors import AudioError

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (T, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())  # libsndfile's messages span lines; ours are one line
        raise AudioError(f"cannot read audio file {path}: {reason}") from None
    if samples.shape[0] == 0:
        raise AudioError(f"audio file has no samples: {path}")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    return resample(mono, rate)


def resample(waveform: np.ndarray, rate: int) -> np.ndarray:
    """Resample a 1-D float waveform from `rate` Hz to SAMPLE_RATE with soxr; float32 out."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(waveform)
    import soxr

    return soxr.resample(waveform, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


def model_window(waveform: np.ndarray) -> np.ndarray:
    """What the original feeds the model: zero-padded at the end to at least 1 s, then the first 30 s."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {waveform.shape}")
    if waveform.shape[0] < MIN_SAMPLES:
        waveform = np.pad(waveform, (0, MIN_SAMPLES - waveform.shape[0]))
    return waveform[:WINDOW_SAMPLES]


SILENCE_DBFS = -50.0  # a 20 ms frame louder than this (RMS, dB re full scale) counts as audible
_FRAME_SAMPLES = SAMPLE_RATE // 50  # 20 ms


def is_silent(waveform: np.ndarray, threshold_dbfs: float = SILENCE_DBFS) -> bool:
    """True when no 20 ms frame of the waveform is louder than `threshold_dbfs`: nothing for the model to hear."""
    waveform = np.asarray(waveform, dtype=np.float32)
    frames = waveform[: waveform.shape[0] // _FRAME_SAMPLES * _FRAME_SAMPLES].reshape(-1, _FRAME_SAMPLES)
    if frames.shape[0] == 0:
        frames = waveform[None]
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return bool(rms.max(initial=0.0) <= 10 ** (threshold_dbfs / 20))

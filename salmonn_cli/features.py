"""Audio front ends: waveform -> the feature matrices the encoders read.

BEATs: the Kaldi filter bank of `torchaudio.compliance.kaldi.fbank` (torchaudio cannot be installed next to
our torch), re-done in numpy with the same float64/float32 arithmetic; it reproduces the reference
fbank bit for bit.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .audio import SAMPLE_RATE

# --- BEATs Kaldi filter bank ------------------------------------------------------------------------------

BEATS_FBANK_MEAN = 15.41663  # BEATs.preprocess defaults: dataset statistics of the log-mel energies
BEATS_FBANK_STD = 6.55582
BEATS_NUM_MEL_BINS = 128
_KALDI_FRAME_LENGTH = 400  # samples: 25 ms
_KALDI_FRAME_SHIFT = 160  # samples: 10 ms
_KALDI_FFT_SIZE = 512  # the frame length rounded up to a power of two (round_to_power_of_two=True)
_KALDI_PREEMPHASIS = 0.97
_KALDI_LOW_FREQ = 20.0  # Hz; the high edge is the Nyquist frequency (high_freq=0)
# Log floor: torchaudio uses float32's machine epsilon even when it computes in float64.
_KALDI_LOG_FLOOR = float(np.finfo(np.float32).eps)


def _mel_scale(freq: np.ndarray | float) -> np.ndarray | float:
    return 1127.0 * np.log(1.0 + freq / 700.0)


@lru_cache(maxsize=1)
def _kaldi_povey_window() -> np.ndarray:
    """Kaldi's "povey" window: the symmetric Hann window to the power 0.85, float64 (400,).

    Built like torch.hann_window(periodic=False): 0.5 - 0.5 * cos(n * 2pi / (N - 1)).
    """
    n = np.arange(_KALDI_FRAME_LENGTH, dtype=np.float64)
    hann = np.cos(n * (2.0 * np.pi / (_KALDI_FRAME_LENGTH - 1))) * -0.5 + 0.5
    return hann**0.85


@lru_cache(maxsize=1)
def _kaldi_mel_banks() -> np.ndarray:
    """Triangular mel filters as torchaudio's get_mel_banks builds them, as float64 (128, 257).

    torchaudio computes the matrix in FLOAT32 (int64 arange times a Python float gives float32, and the
    scalar is rounded to float32 first) and only then casts it to the waveform's float64; we follow each
    float32 rounding so the weights are bit-for-bit the same. The Nyquist column is 0.
    """
    f32 = np.float32
    num_fft_bins = _KALDI_FFT_SIZE // 2
    nyquist = 0.5 * SAMPLE_RATE
    fft_bin_width = SAMPLE_RATE / _KALDI_FFT_SIZE
    mel_low = _mel_scale(_KALDI_LOW_FREQ)  # Python float64 scalars, as in mel_scale_scalar
    mel_high = _mel_scale(nyquist)
    mel_delta = f32((mel_high - mel_low) / (BEATS_NUM_MEL_BINS + 1))
    mel_low32 = f32(mel_low)
    bins = np.arange(BEATS_NUM_MEL_BINS, dtype=f32)[:, None]  # (M, 1)
    left = mel_low32 + bins * mel_delta
    center = mel_low32 + (bins + f32(1.0)) * mel_delta
    right = mel_low32 + (bins + f32(2.0)) * mel_delta
    freqs = f32(fft_bin_width) * np.arange(num_fft_bins, dtype=f32)  # (256,)
    # The float32 log is torch's own (not numpy's): the two differ by 1 ulp for some bins, which moves
    # filter weights near a triangle's foot by ~2e-5 and the fbank by ~1e-5; torch's log matches exactly.
    import torch

    log_ratio = torch.log(torch.from_numpy(f32(1.0) + freqs / f32(700.0))).numpy()
    mel = (f32(1127.0) * log_ratio)[None, :]  # (1, 256) float32
    up_slope = (mel - left) / (center - left)
    down_slope = (right - mel) / (right - center)
    banks = np.maximum(f32(0.0), np.minimum(up_slope, down_slope)).astype(np.float32)  # (M, 256)
    # torchaudio pads one zero column for the Nyquist bin of the 512-point rfft: (M, 257).
    return np.pad(banks.astype(np.float64), ((0, 0), (0, 1)))


def beats_fbank(waveform: np.ndarray) -> np.ndarray:
    """BEATs' normalised 128-bin Kaldi log-mel filter bank of a 16 kHz waveform: float32 (F, 128).

    Equals `(kaldi.fbank(wav64 * 2**15, num_mel_bins=128, sample_frequency=16000, frame_length=25,
    frame_shift=10) - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)` as BEATs.preprocess computes it, in
    float64, with F = 1 + (N - 400) // 160 (snip_edges: only whole frames). `waveform` is 1-D, values in
    [-1, 1]; it needs at least 400 samples.
    """
    wav = np.asarray(waveform, dtype=np.float64)  # the original's waveform is float64: so is all maths
    if wav.ndim != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {wav.shape}")
    if wav.shape[0] < _KALDI_FRAME_LENGTH:
        raise ValueError(f"need at least {_KALDI_FRAME_LENGTH} samples, got {wav.shape[0]}")
    wav = wav * 2**15  # Kaldi works on 16-bit integer sample values
    num_frames = 1 + (wav.shape[0] - _KALDI_FRAME_LENGTH) // _KALDI_FRAME_SHIFT
    frames = np.lib.stride_tricks.sliding_window_view(wav, _KALDI_FRAME_LENGTH)[::_KALDI_FRAME_SHIFT]
    frames = frames[:num_frames]  # (F, 400), a view
    frames = frames - frames.mean(axis=1, keepdims=True)  # remove the DC offset per frame
    # Pre-emphasis x[i] - 0.97 x[i-1]; the first sample uses itself as its predecessor (replicate pad).
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - _KALDI_PREEMPHASIS * previous
    frames = frames * _kaldi_povey_window()[None, :]
    # The zero padding to 512 samples happens inside rfft(n=...). Power spectrum as |X|**2 like torch.
    spectrum = np.abs(np.fft.rfft(frames, n=_KALDI_FFT_SIZE, axis=1)) ** 2  # (F, 257)
    mel_energies = spectrum @ _kaldi_mel_banks().T  # (F, 128)
    log_mel = np.log(np.maximum(mel_energies, _KALDI_LOG_FLOOR))
    normalised = (log_mel - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)
    return normalised.astype(np.float32)


def whisper_log_mel(extractor, waveform: np.ndarray) -> np.ndarray:
    """Whisper log-mel of a 16 kHz waveform, padded to the extractor's 30 s: float32 (n_mels, 3000).

    `extractor` is the Whisper folder's own `WhisperFeatureExtractor`, so its mel filters and sizes are used.
    """
    features = extractor(
        np.asarray(waveform, dtype=np.float32),
        sampling_rate=SAMPLE_RATE,
        padding="max_length",  # always a full 30 s window: the encoder's position table is that long
        max_length=extractor.n_samples,
        return_tensors="np",
    ).input_features
    return np.ascontiguousarray(features[0], dtype=np.float32)

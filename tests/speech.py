"""Generated speech for tests: espeak-ng utterances laid out with known silences, and where the speech truly is.

"Truth" is the audible extent of each utterance (an energy threshold on its own clip), not espeak's padding:
each clip is trimmed to its audible extent before it is placed, so the returned spans are exact by construction.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf

from salmonn_cli.audio import SAMPLE_RATE, resample

_FRAME_SECONDS = 0.01  # 10 ms frames for the energy measure
_BELOW_PEAK_DB = 40.0  # a frame this far below the loudest frame of the clip counts as silence

SENTENCES = (
    "The quick brown fox jumps over the lazy dog",
    "Please bring the red box to the kitchen",
    "It will rain in the north tomorrow morning",
    "My sister plays the violin every evening",
    "The train to the city leaves at nine",
    "We planted tomatoes and beans in the garden",
    "He forgot his keys on the table again",
    "The museum opens early on Saturday",
    "A small boat crossed the quiet lake",
    "She wrote a long letter to her grandmother",
    "The children laughed at the funny clown",
    "Turn left after the old stone bridge",
    "Coffee tastes better with a little milk",
    "The library closes at six today",
    "Birds were singing in the tall trees",
    "Our neighbour painted his fence green",
)


def espeak_path() -> str:
    """The espeak-ng executable; a missing one fails the test (CI installs it), it is never a reason to skip."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise AssertionError("espeak-ng is not installed: the speech tests need it (apt-get install espeak-ng)")
    return path


@lru_cache(maxsize=64)
def _espeak_cached(text: str, voice: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "utterance.wav"
        subprocess.run([espeak_path(), "-v", voice, "-w", str(out), text], check=True, capture_output=True)
        samples, rate = sf.read(out, dtype="float32")  # (T,) at 22050 Hz
    clip = resample(samples, rate)  # (T',) at 16 kHz
    clip.setflags(write=False)  # shared by the cache
    return clip


def espeak(text: str, voice: str = "en") -> np.ndarray:
    """`text` spoken by espeak-ng: 1-D float32 at 16 kHz, espeak's own leading/trailing silence included."""
    return _espeak_cached(text, voice).copy()


def audible_extent(clip: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[int, int]:
    """[start, end) in samples of the part of `clip` louder than its peak frame minus 40 dB (10 ms frames)."""
    frame = int(_FRAME_SECONDS * sample_rate)
    frames = clip[: clip.shape[0] // frame * frame].reshape(-1, frame)  # (F, frame)
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))  # (F,)
    loud = np.flatnonzero(rms > rms.max() * 10 ** (-_BELOW_PEAK_DB / 20))
    if loud.size == 0:
        raise AssertionError("espeak-ng produced a silent clip")
    return int(loud[0] * frame), int((loud[-1] + 1) * frame)


def make_speech(
    utterances: list[str], pauses_s: list[float], *, lead_s: float = 0.5, tail_s: float = 0.5
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Utterances separated by exact silences (`pauses_s[i]` between utterance i and i+1, audible edge to edge).

    Returns the 16 kHz float32 waveform and the true (start, end) seconds of each utterance's audible speech.
    """
    if len(pauses_s) != len(utterances) - 1:
        raise ValueError(f"need {len(utterances) - 1} pauses for {len(utterances)} utterances, got {len(pauses_s)}")
    pieces = [np.zeros(round(lead_s * SAMPLE_RATE), np.float32)]
    spans: list[tuple[float, float]] = []
    cursor = pieces[0].shape[0]  # samples so far
    for i, text in enumerate(utterances):
        clip = espeak(text)
        start, end = audible_extent(clip)
        pieces.append(clip[start:end])
        spans.append((cursor / SAMPLE_RATE, (cursor + end - start) / SAMPLE_RATE))
        cursor += end - start
        gap = round((pauses_s[i] if i < len(pauses_s) else tail_s) * SAMPLE_RATE)
        pieces.append(np.zeros(gap, np.float32))
        cursor += gap
    return np.concatenate(pieces), spans


def make_speech_file(
    path: str | Path, utterances: list[str], pauses_s: list[float], **kwargs: float
) -> list[tuple[float, float]]:
    """`make_speech` written to `path` (format from the suffix, 16 kHz); returns the true utterance spans."""
    waveform, spans = make_speech(utterances, pauses_s, **kwargs)
    sf.write(path, waveform, SAMPLE_RATE)
    return spans


def long_speech(n_utterances: int = 16, seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Long speech (30 utterances: about 3 minutes): utterances of 2 or 3 sentences spoken without a break,
    separated by seeded pauses of 0.6-2 s. Returns the waveform and the true utterance spans."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(SENTENCES[(i + 5 * k) % len(SENTENCES)] for k in range(2 + i % 2)) for i in range(n_utterances)]
    pauses = [float(p) for p in rng.uniform(0.6, 2.0, n_utterances - 1)]
    return make_speech(texts, pauses)

"""Long audio cut at pauses: a partition of the whole timeline into segments of at most one model window.

The model hears at most 30 s at once. `plan_segments` cuts longer audio so that no word is split where a pause
exists nearby: silero-vad finds the speech, cuts go in the middle of pauses, and long stretches without speech
(silence, music, a dog barking) become segments of their own, so the caller can skip silent ones (`speech == ()`
and `audio.is_silent`) and caption the rest. Every segment keeps its start and end time in the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from .audio import LOUDNESS_FRAME_S, SAMPLE_RATE, WINDOW_SECONDS, resample
from .vad import MIN_SPEECH_S, THRESHOLD, silero, speech_probabilities

# silero-vad settings for cutting (not for trimming): we want every real pause as a candidate cut.
_MIN_SILENCE_MS = 100  # short, so pauses between sentences show up as gaps; the planner ranks them by length
_SPEECH_PAD_MS = 30  # silero's default: covers soft word onsets/endings without eating the pauses

_LONG_PAUSE_S = 0.3  # a pause at least this long is a sentence/phrase boundary: cut there when possible
_MIN_SEGMENT_S = 1.0  # no cut closer than this to the previous one (no degenerate slivers)
_CONTEXT_S = 0.5  # non-speech kept on each side of speech when a long non-speech stretch is split off
_MIN_NONSPEECH_S = 5.0  # non-speech at least this long (after the context) becomes its own segment(s)
_QUIET_SEARCH_S = 3.0  # no pause at all: cut at the quietest 20 ms frame within this much before the limit
_FIXED_SEARCH_S = 1.0  # vad=False and non-speech stretches: same, within the last second
_ULP_GUARD_S = 1e-6  # (cursor + 30) - cursor can exceed 30 by a rounding error: stay a microsecond inside


@dataclass(frozen=True)
class Segment:
    """A stretch [start, end) of a file in seconds, with the VAD speech spans inside it (absolute seconds)."""

    start: float
    end: float
    speech: tuple[tuple[float, float], ...] = ()

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def has_speech(self) -> bool:
        return bool(self.speech)

    @property
    def speech_start(self) -> float:
        """Start of the first speech span, else the segment start."""
        return self.speech[0][0] if self.speech else self.start

    @property
    def speech_end(self) -> float:
        """End of the last speech span, else the segment end."""
        return self.speech[-1][1] if self.speech else self.end


def speech_regions(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> list[tuple[float, float]]:
    """Where silero-vad hears speech: sorted, disjoint (start, end) spans in seconds.

    The waveform is 1-D float at `sample_rate` (resampled to 16 kHz here if needed).
    """
    get_speech_timestamps_from_probs = silero().utils_vad.get_speech_timestamps_from_probs

    waveform = resample(waveform, sample_rate)  # (T,) at 16 kHz
    if waveform.shape[0] == 0:
        return []
    spans = get_speech_timestamps_from_probs(
        speech_probabilities(waveform).tolist(),
        sampling_rate=SAMPLE_RATE,
        threshold=THRESHOLD,
        min_speech_duration_ms=round(MIN_SPEECH_S * 1000),
        min_silence_duration_ms=_MIN_SILENCE_MS,
        speech_pad_ms=_SPEECH_PAD_MS,
        audio_length_samples=waveform.shape[0],
    )
    return [(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in spans]


def _quietest_time(waveform: np.ndarray, lo: float, hi: float, sample_rate: int) -> float:
    """The middle of the quietest 20 ms frame in [lo, hi] seconds (the latest one on ties), clipped to hi."""
    frame = max(1, round(LOUDNESS_FRAME_S * sample_rate))
    first = round(lo * sample_rate)
    chunk = waveform[first : round(hi * sample_rate)]
    n = chunk.shape[0] // frame
    if n == 0:
        return hi
    energy = np.square(chunk[: n * frame].reshape(n, frame), dtype=np.float64).mean(axis=1)  # (n,)
    best = n - 1 - int(np.argmin(energy[::-1]))  # latest minimum: keeps segments long in digital silence
    return min(hi, (first + best * frame + frame / 2) / sample_rate)


def _fixed_cuts(waveform: np.ndarray, start: float, end: float, max_s: float, sample_rate: int) -> list[float]:
    """Cut points that split [start, end] into pieces <= max_s, each at the quietest frame of its last second."""
    cuts, cursor = [], start
    while end - cursor > max_s:
        limit = cursor + max_s - _ULP_GUARD_S
        cursor = _quietest_time(waveform, max(cursor + max_s / 2, limit - _FIXED_SEARCH_S), limit, sample_rate)
        cuts.append(cursor)
    return cuts


def _pick_pause(gaps: list[tuple[float, float]], cursor: float, limit: float, max_s: float) -> float | None:
    """Where to cut in (cursor, limit] given the pauses: the longest long pause in the last third of the window,
    else the latest long pause, else the longest pause at all; None if there is no pause in the window."""
    candidates = []  # (cut, pause length)
    for a, b in gaps:
        lo, hi = max(a, cursor + min(_MIN_SEGMENT_S, max_s / 2)), min(b, limit)
        if lo < hi:
            candidates.append((min(max((a + b) / 2, lo), hi), b - a))  # the pause's middle, within the window
    long = [c for c in candidates if c[1] >= _LONG_PAUSE_S]
    late = [c for c in long if c[0] >= cursor + max_s * 2 / 3]
    if late:
        return max(late, key=lambda c: (c[1], c[0]))[0]
    if long:
        return max(long)[0]
    if candidates:
        return max(candidates, key=lambda c: (c[1], c[0]))[0]
    return None


def _pause_cuts(
    waveform: np.ndarray, start: float, end: float, gaps: list[tuple[float, float]], max_s: float, sample_rate: int
) -> list[float]:
    """Cut points that split a stretch with speech into pieces <= max_s, in pauses where there are any."""
    cuts, cursor = [], start
    while end - cursor > max_s:
        limit = cursor + max_s - _ULP_GUARD_S
        cut = _pick_pause(gaps, cursor, limit, max_s)
        if cut is None:  # one speech region longer than the window: cut where it is quietest
            lo = max(cursor + max_s / 2, limit - _QUIET_SEARCH_S)
            cut = _quietest_time(waveform, lo, limit, sample_rate)
        cuts.append(cut)
        cursor = cut
    return cuts


def _vad_cuts(waveform: np.ndarray, regions: list[tuple[float, float]], max_s: float, sample_rate: int) -> list[float]:
    """All cut points for a VAD-planned file: long non-speech stretches split off, then pauses or quiet frames."""
    total = waveform.shape[0] / sample_rate
    edges = [0.0] + [t for r in regions for t in r] + [total]
    gaps = [
        (a, b) for a, b in zip(edges[::2], edges[1::2], strict=True) if b > a
    ]  # non-speech stretches, incl. both ends
    boundaries = [0.0]  # stretch edges: each stretch is all non-speech or has speech with only short gaps
    for a, b in gaps:
        left = a if a == 0.0 else a + _CONTEXT_S
        right = b if b == total else b - _CONTEXT_S
        if right - left >= _MIN_NONSPEECH_S:
            boundaries += [t for t in (left, right) if 0.0 < t < total]
    boundaries.append(total)
    cuts: list[float] = []
    for lo, hi in pairwise(boundaries):
        inner = [(a, b) for a, b in gaps if a < hi and b > lo]
        speechless = not any(a < hi and b > lo for a, b in regions)
        if speechless:
            cuts += _fixed_cuts(waveform, lo, hi, max_s, sample_rate)
        else:
            cuts += _pause_cuts(waveform, lo, hi, inner, max_s, sample_rate)
        cuts.append(hi)
    return cuts[:-1]


def plan_segments(
    waveform: np.ndarray, *, max_seconds: float = WINDOW_SECONDS, vad: bool = True, sample_rate: int = SAMPLE_RATE
) -> list[Segment]:
    """Partition the whole waveform (1-D, `sample_rate` Hz) into consecutive segments of at most `max_seconds`.

    The first segment starts at 0, the last ends at the end of the file, there are no gaps. With `vad`, cuts go
    in the middle of pauses between speech (the longest pause near the end of the allowed window), long
    non-speech stretches become segments of their own, and only speech with no pause for `max_seconds` is cut
    at its quietest 20 ms frame. Without `vad`, fixed windows cut at the quietest frame of their last second.
    Each segment lists the VAD speech spans inside it (empty without `vad`, or when it holds no speech).
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    waveform = np.asarray(waveform, dtype=np.float32)
    total = waveform.shape[0] / sample_rate
    regions = speech_regions(waveform, sample_rate) if vad else []
    if total <= max_seconds:
        cuts = []
    elif vad:
        cuts = _vad_cuts(waveform, regions, max_seconds, sample_rate)
    else:
        cuts = _fixed_cuts(waveform, 0.0, total, max_seconds, sample_rate)
    edges = [0.0, *cuts, total]
    segments = []
    for start, end in pairwise(edges):
        speech = tuple((max(a, start), min(b, end)) for a, b in regions if min(b, end) > max(a, start))
        segments.append(Segment(start, end, speech))
    return segments


def segment_audio(waveform: np.ndarray, segment: Segment, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The samples of `segment` in `waveform` (1-D at `sample_rate` Hz): a view, not a copy."""
    return waveform[round(segment.start * sample_rate) : round(segment.end * sample_rate)]

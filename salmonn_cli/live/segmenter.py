"""Streaming segmentation: 16 kHz blocks in, segments out as soon as they are complete.

`UtteranceSegmenter` (transcribe, ask) runs silero-vad frame by frame (512 samples = 32 ms, the model's own
streaming state) with hysteresis, as silero's `VADIterator` does: speech starts when the probability reaches
0.5 and ends after `min_silence_s` below 0.35; an utterance is cut at the end of speech, or at 30 s (the most
the model hears) while someone keeps talking. `WindowSegmenter` (caption) cuts fixed windows.
Every segment carries its times since capture start and the wall-clock time its last sample was captured.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ..audio import SAMPLE_RATE, WINDOW_SECONDS
from ..vad import FRAME_SAMPLES, MIN_SPEECH_S, THRESHOLD, new_model
from .source import Block


@dataclass(frozen=True, eq=False)
class LiveSegment:
    """A piece of the capture to answer: [start, end) in seconds since capture start (for an utterance: its
    speech), the (T,) float32 16 kHz audio the model hears (an utterance's speech plus a little padding), and
    the `time.monotonic()` at which `end` was captured (the end of the utterance, for latency)."""

    index: int
    start: float
    end: float
    audio: np.ndarray
    captured_at: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class VadConfig:
    """How utterances are cut (silero's defaults where they suit live cutting)."""

    threshold: float = THRESHOLD
    release: float = 0.15  # speech ends below threshold - release (hysteresis, as VADIterator)
    min_silence_s: float = 0.5  # a pause this long ends an utterance: shorter ones are breaths between words
    min_speech_s: float = MIN_SPEECH_S
    pad_s: float = 0.1  # audio kept before and after the speech, for soft onsets and endings
    max_s: float = WINDOW_SECONDS  # the model hears at most this much


class _Timeline:
    """The recent audio (a growing array trimmed from the left) and when each block of it was captured."""

    def __init__(self) -> None:
        self.base = 0  # sample index of audio[0]
        self.audio = np.zeros(0, np.float32)
        self.arrivals: deque[tuple[int, float]] = deque()  # (block end sample, captured_at)

    @property
    def end(self) -> int:
        return self.base + self.audio.shape[0]

    def append(self, block: Block) -> None:
        gap = np.zeros(max(0, block.start - self.end), np.float32)  # a block lost (e.g. to Ctrl-C): silence
        self.audio = np.concatenate([self.audio, gap, block.samples])
        self.arrivals.append((block.end, block.captured_at))

    def slice(self, start: int, end: int) -> np.ndarray:
        return self.audio[max(0, start - self.base) : max(0, end - self.base)].copy()

    def captured_at(self, sample: int) -> float:
        """When sample `sample` was captured: the arrival time of the first block that holds it."""
        return next((t for end, t in self.arrivals if end >= sample), self.arrivals[-1][1])

    def trim(self, keep_from: int) -> None:
        """Forget audio before sample `keep_from` (and arrival times of blocks entirely before it)."""
        drop = min(max(0, keep_from - self.base), self.audio.shape[0])
        if drop:
            self.audio = self.audio[drop:]  # a view: the next append copies only what is kept
            self.base += drop
        while len(self.arrivals) > 1 and self.arrivals[0][0] < self.base:
            self.arrivals.popleft()


class _Cutter:
    """Shared bookkeeping: segment numbering and building a segment from the timeline."""

    def __init__(self) -> None:
        self.timeline = _Timeline()
        self._count = 0

    def _segment(self, start: int, end: int, audio_from: int | None = None, audio_to: int | None = None) -> LiveSegment:
        """Segment [start, end) (samples) whose audio is [audio_from, audio_to) (default: the same)."""
        end = min(end, self.timeline.end)
        audio = self.timeline.slice(start if audio_from is None else audio_from, end if audio_to is None else audio_to)
        segment = LiveSegment(self._count, start / SAMPLE_RATE, end / SAMPLE_RATE, audio,
                              self.timeline.captured_at(end))  # fmt: skip
        self._count += 1
        return segment


class WindowSegmenter(_Cutter):
    """Fixed windows of `window_s` seconds (the last one may be shorter), for captioning sounds."""

    def __init__(self, window_s: float) -> None:
        super().__init__()
        if not 0 < window_s <= WINDOW_SECONDS:
            raise ValueError(f"window must be in (0, {WINDOW_SECONDS:g}] seconds, got {window_s}")
        self.window = round(window_s * SAMPLE_RATE)
        self._start = 0

    def feed(self, block: Block) -> list[LiveSegment]:
        self.timeline.append(block)
        out = []
        while self.timeline.end - self._start >= self.window:
            out.append(self._segment(self._start, self._start + self.window))
            self._start += self.window
            self.timeline.trim(self._start)
        return out

    def flush(self) -> list[LiveSegment]:
        """The last, partial window (if any audio is left)."""
        if self.timeline.end <= self._start:
            return []
        segment = self._segment(self._start, self.timeline.end)
        self._start = self.timeline.end
        return [segment]


def silero_frame_model():
    """f(frame) -> speech probability, for consecutive 512-sample frames (silero keeps state between calls).

    A model of its own, not `vad.shared_model()`: the streaming state must not be shared with anyone."""
    import torch

    model = new_model()
    model.reset_states()

    def probability(frame: np.ndarray) -> float:
        with torch.inference_mode():
            return float(model(torch.from_numpy(frame), SAMPLE_RATE))

    return probability


class UtteranceSegmenter(_Cutter):
    """Utterances cut at the end of speech (silero-vad with hysteresis), at most `config.max_s` long."""

    def __init__(self, config: VadConfig = VadConfig(), probability=None) -> None:
        super().__init__()
        self.config = config
        self._probability = probability or silero_frame_model()
        self._pad = round(config.pad_s * SAMPLE_RATE)
        self._frames = 0  # frames decided so far; the next one starts at sample self._frames * FRAME_SAMPLES
        self._speech_start: int | None = None  # sample where the current utterance's speech began
        self._cut_from: int | None = None  # sample where the current segment begins (pad, or a 30 s cut)
        self._silence_from: int | None = None  # start of the current run of silent frames inside speech

    def feed(self, block: Block) -> list[LiveSegment]:
        self.timeline.append(block)
        out: list[LiveSegment] = []
        while (self._frames + 1) * FRAME_SAMPLES <= self.timeline.end:
            first = self._frames * FRAME_SAMPLES
            out += self._decide(first, self._probability(self.timeline.slice(first, first + FRAME_SAMPLES)))
            self._frames += 1
        if self._cut_from is None:  # idle: keep only the pre-speech pad (and the frame being filled)
            self.timeline.trim(self._frames * FRAME_SAMPLES - self._pad)
        return out

    def _decide(self, first: int, prob: float) -> list[LiveSegment]:
        """One frame's decision: start, continue, end (after enough silence) or cap the utterance."""
        c, end_of_frame = self.config, first + FRAME_SAMPLES
        if self._cut_from is None:
            if prob >= c.threshold:
                self._speech_start, self._silence_from = first, None
                self._cut_from = max(0, first - self._pad, self.timeline.base)
            return []
        if prob >= c.threshold:
            self._silence_from = None
        elif prob < c.threshold - c.release and self._silence_from is None:
            self._silence_from = first
        if self._silence_from is not None and end_of_frame - self._silence_from >= c.min_silence_s * SAMPLE_RATE:
            return self._close(self._silence_from)
        # one more frame would pass 30 s
        if end_of_frame + FRAME_SAMPLES - self._cut_from > round(c.max_s * SAMPLE_RATE):
            segment = self._segment(self._speech_start, end_of_frame, self._cut_from)
            self._cut_from = self._speech_start = end_of_frame
            self.timeline.trim(end_of_frame)
            return [segment]
        return []

    def _close(self, speech_end: int) -> list[LiveSegment]:
        """End the current utterance, whose speech ends at sample `speech_end`; a blip gives no segment."""
        end = min(speech_end + self._pad, self.timeline.end, self._cut_from + round(self.config.max_s * SAMPLE_RATE))
        long_enough = speech_end - self._speech_start >= self.config.min_speech_s * SAMPLE_RATE
        out = [self._segment(self._speech_start, speech_end, self._cut_from, end)] if long_enough else []
        self._cut_from, self._speech_start, self._silence_from = None, None, None
        self.timeline.trim(self._frames * FRAME_SAMPLES - self._pad)
        return out

    def flush(self) -> list[LiveSegment]:
        """At the end of the capture: the utterance still open (speech up to the last sample), if any."""
        if self._cut_from is None:
            return []
        return self._close(self._silence_from if self._silence_from is not None else self.timeline.end)

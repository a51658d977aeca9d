"""Long audio cut at pauses: generated speech with known pauses, silence, tones, fixed windows, a missing VAD."""

from __future__ import annotations

import sys
from itertools import pairwise

import numpy as np
import pytest

from salmonn_cli import segment as seg
from salmonn_cli.audio import SAMPLE_RATE, is_silent
from salmonn_cli.errors import DependencyError
from salmonn_cli.segment import Segment, plan_segments, segment_audio, speech_regions

from .speech import SENTENCES, long_speech, make_speech

TOLERANCE_S = 0.3  # how far a speech span may be from the audible truth


def assert_partition(segments: list[Segment], waveform: np.ndarray, max_s: float = 30.0) -> None:
    """Consecutive segments from 0 to the end of the file, none longer than max_s, none empty."""
    assert segments[0].start == 0.0
    assert segments[-1].end == pytest.approx(waveform.shape[0] / SAMPLE_RATE)
    for a, b in pairwise(segments):
        assert a.end == b.start
    assert all(0.0 < s.duration <= max_s for s in segments), [s.duration for s in segments]
    pieces = [segment_audio(waveform, s) for s in segments]
    assert sum(p.shape[0] for p in pieces) == waveform.shape[0]  # every sample in exactly one segment


@pytest.fixture(scope="module")
def long_file():
    """About 3 minutes: 30 utterances with 0.6-2 s pauses, the true spans, and the plan."""
    waveform, spans = long_speech(n_utterances=30, seed=0)
    assert 150 <= waveform.shape[0] / SAMPLE_RATE <= 210
    return waveform, spans, plan_segments(waveform)


def test_long_speech_is_cut_only_in_true_pauses(long_file):
    waveform, spans, segments = long_file
    assert_partition(segments, waveform)
    assert len(segments) >= 6
    pauses = [(a[1], b[0]) for a, b in pairwise(spans)]  # (end of one, start of next)
    for cut in [s.end for s in segments[:-1]]:
        assert any(a < cut < b for a, b in pauses), f"cut at {cut:.2f} s is not inside a pause"
    for start, end in spans:
        assert any(s.start <= start and end <= s.end for s in segments), f"utterance {start:.2f}-{end:.2f} was cut"


def test_speech_spans_match_the_audible_truth(long_file):
    _, spans, segments = long_file
    for s in segments:
        inside = [sp for sp in spans if s.start <= sp[0] < s.end]
        assert s.has_speech and inside
        assert s.speech_start == pytest.approx(inside[0][0], abs=TOLERANCE_S)
        assert s.speech_end == pytest.approx(inside[-1][1], abs=TOLERANCE_S)
        assert all(s.start <= a < b <= s.end for a, b in s.speech)  # clipped to the segment, in order
    regions = speech_regions(long_file[0])
    assert len(regions) >= len(spans)  # every utterance heard (a region may split inside an utterance)


def test_a_long_silence_becomes_its_own_segment():
    waveform, spans = make_speech([SENTENCES[0], SENTENCES[1], SENTENCES[2]], [1.0, 40.0])
    segments = plan_segments(waveform)
    assert_partition(segments, waveform)
    silent = [s for s in segments if not s.has_speech]
    assert silent and all(is_silent(segment_audio(waveform, s)) for s in silent)
    assert sum(s.duration for s in silent) > 30.0  # most of the 40 s is skippable
    for start, end in spans:
        assert any(s.start <= start and end <= s.end and s.has_speech for s in segments)


def test_without_vad_the_windows_are_fixed():
    waveform, _ = long_speech(n_utterances=12, seed=2)
    segments = plan_segments(waveform, vad=False)
    assert_partition(segments, waveform)
    assert all(s.speech == () for s in segments)
    assert all(29.0 <= s.duration for s in segments[:-1])  # cut within the last second of each window
    total = waveform.shape[0] / SAMPLE_RATE
    assert len(segments) in {int(np.ceil(total / 30.0)), int(np.ceil(total / 29.0))}


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("vad", [True, False])
def test_a_continuous_tone_is_cut_into_windows(vad):
    waveform = tone(70.0)
    segments = plan_segments(waveform, vad=vad)
    assert_partition(segments, waveform)
    assert 3 <= len(segments) <= 4  # silero may call the onset a blip of speech: then a short first segment
    assert sum(not s.has_speech for s in segments) >= (2 if vad else 3)


def test_without_a_pause_the_cut_goes_to_the_quietest_frame(monkeypatch):
    waveform = tone(70.0)
    dip = int(28.5 * SAMPLE_RATE)
    waveform[dip : dip + 800] *= 0.01  # 50 ms nearly silent, inside the last 3 s of the first window
    monkeypatch.setattr(seg, "speech_regions", lambda w, sr=SAMPLE_RATE: [(0.0, 70.0)])  # one endless "word"
    segments = plan_segments(waveform)
    assert_partition(segments, waveform)
    assert segments[0].end == pytest.approx(28.5 + 0.025, abs=0.03)
    assert all(s.speech == ((s.start, s.end),) for s in segments)  # the region is clipped to each segment


def test_short_audio_is_one_segment():
    waveform, spans = make_speech([SENTENCES[3], SENTENCES[4]], [1.0])
    [only] = plan_segments(waveform)
    assert (only.start, only.end) == (0.0, waveform.shape[0] / SAMPLE_RATE)
    assert only.speech_start == pytest.approx(spans[0][0], abs=TOLERANCE_S)
    assert only.speech_end == pytest.approx(spans[-1][1], abs=TOLERANCE_S)
    assert np.array_equal(segment_audio(waveform, only), waveform)


def test_other_sample_rates_give_seconds():
    waveform, spans = make_speech([SENTENCES[5]], [])
    import soxr

    at_8k = soxr.resample(waveform, SAMPLE_RATE, 8000).astype(np.float32)
    [(start, end)] = speech_regions(at_8k, 8000)
    assert (start, end) == pytest.approx(spans[0], abs=TOLERANCE_S)


def test_missing_silero_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "silero_vad", None)
    with pytest.raises(DependencyError, match="pip install -U silero-vad") as err:
        plan_segments(tone(40.0))
    assert err.value.exit_code == 5
    assert len(plan_segments(tone(40.0), vad=False)) == 2  # fixed windows need no VAD

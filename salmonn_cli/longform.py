"""Audio of any length: cut into <= 30 s segments at pauses, answer each audible segment (in batches), join.

Short audio is one segment and gives exactly what `SalmonnModel.generate` gives. `whole=True` instead puts
the audio tokens of every segment, each after its time label, into ONE prompt (for questions about the whole
recording, such as "when does the music start?"), within the LLM's context.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .decode_options import DecodeOptions
from .errors import UsageError
from .output import Cue, timestamp
from .window import SAMPLE_RATE, WINDOW_SECONDS

if TYPE_CHECKING:  # this module imports nothing heavy: the command line reads LongformSettings' defaults
    import numpy as np


@dataclass(frozen=True)
class LongformSettings:
    """How a long file is handled."""

    vad: bool = True  # cut at pauses found by silero-vad (else fixed 30 s windows)
    batch_size: int = 1  # segments decoded together
    speech_only: bool = False  # transcription: skip segments in which the VAD heard no speech
    force: bool = False  # run the model even on silent segments
    whole: bool = False  # one answer about all segments together
    timestamped: bool = False  # join per-segment answers as "[mm:ss–mm:ss] text" lines (else with spaces)


@dataclass(frozen=True)
class FileAnswer:
    """What the model said about one file: joined text, timed cues, and bookkeeping."""

    text: str
    cues: tuple[Cue, ...]
    token_count: int
    segments: int
    answered: int  # segments the model was run on
    timings: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None  # "silence" when no segment was audible
    cue_token_ids: tuple[tuple[int, ...], ...] = ()  # the LLM's ids of each cue's answer (eos included), as cues


def answer_file(
    model,
    waveform: np.ndarray,
    instruction: str,
    options: DecodeOptions,
    settings: LongformSettings,
    *,
    lora_scale: float | None = None,
    generator=None,
    on_text: Callable[[str], None] | None = None,
    on_cue: Callable[[Cue], None] | None = None,
) -> FileAnswer:
    """Answer `instruction` about a whole waveform of any length (see the module docstring).

    `on_text` sees the answer's text so far each time a batch of segments is decoded (a server streams it); each
    text begins with the one before, and the last is the answer's. `on_cue` then sees each of that batch's
    segments that said something, with its time (a server streams them as timed lines).
    """
    from .segment import plan_segments, segment_audio

    started = time.perf_counter()
    # A clip of one window is one segment whatever the VAD hears; only subtitles (speech_only) read its speech.
    long = waveform.shape[0] / SAMPLE_RATE > WINDOW_SECONDS
    segments = plan_segments(waveform, max_seconds=WINDOW_SECONDS, vad=settings.vad and (long or settings.speech_only))
    single = len(segments) == 1
    audible = [s for s in segments if settings.force or _audible(s, segment_audio(waveform, s), settings, single)]
    if not audible:
        return FileAnswer("", (), 0, len(segments), 0, {"total_s": time.perf_counter() - started}, skipped="silence")
    clips = [segment_audio(waveform, s) for s in audible]
    if settings.whole and len(audible) > 1:
        answer = _answer_whole(model, audible, clips, instruction, options, settings, lora_scale, generator)
        return FileAnswer(answer.text.strip(), (Cue(audible[0].start, audible[-1].end, answer.text.strip()),),
                          len(answer.token_ids), len(segments), len(audible),
                          {"total_s": time.perf_counter() - started},
                          cue_token_ids=(tuple(answer.token_ids),))  # fmt: skip
    cues: list[Cue] = []
    cue_ids: list[tuple[int, ...]] = []
    size = settings.batch_size
    for first in range(0, len(audible), size):  # batch by batch, as generate_batch would: the same ids and draws
        results = model.generate_batch(
            clips[first : first + size], instruction, options, batch_size=size, lora_scale=lora_scale,
            generator=generator,
        )  # fmt: skip
        for segment, result in zip(audible[first : first + size], results, strict=True):
            cues.append(_cue(segment, result.text.strip(), settings))
            cue_ids.append(tuple(result.token_ids))
        if on_text is not None:
            on_text(_join(tuple(cues), settings, single=single))
        for cue in cues[first:] if on_cue is not None else ():
            if cue.text:
                on_cue(cue)
    text = _join(tuple(cues), settings, single=single)
    timings = {"total_s": time.perf_counter() - started}
    return FileAnswer(text, tuple(cues), sum(map(len, cue_ids)), len(segments), len(audible), timings,
                      cue_token_ids=tuple(cue_ids))  # fmt: skip


def _audible(segment, clip: np.ndarray, settings: LongformSettings, single: bool) -> bool:
    """Worth running the model on? Not on silence. In long recordings, transcription also skips segments where the
    VAD heard no speech (music or noise breaks would only yield invented text); a single short clip is always
    answered as the original would, since the VAD can miss singing or speech in noise."""
    if settings.speech_only and settings.vad and not single:
        return segment.has_speech
    from .audio import is_silent

    return not is_silent(clip)


def _cue(segment, text: str, settings: LongformSettings) -> Cue:
    if settings.speech_only and segment.has_speech:  # subtitles follow the speech, not the cut points
        return Cue(segment.speech_start, segment.speech_end, text)
    return Cue(segment.start, segment.end, text)


def _join(cues: tuple[Cue, ...], settings: LongformSettings, *, single: bool) -> str:
    spoken = [c for c in cues if c.text]
    if single or not settings.timestamped:
        return " ".join(c.text for c in spoken)
    return "\n".join(f"[{timestamp(c.start)}–{timestamp(c.end)}] {c.text}" for c in spoken)


def _answer_whole(model, segments, clips, instruction, options: DecodeOptions, settings, lora_scale, generator):
    """One prompt holding every segment's audio tokens after its time label; fails when it cannot fit."""
    import torch

    tokens = torch.cat([model.audio_tokens_batch(clips[i : i + settings.batch_size])
                        for i in range(0, len(clips), settings.batch_size)])  # fmt: skip  # (S, N, D)
    labels = [f" [{timestamp(s.start)}–{timestamp(s.end)}]" for s in segments]
    embeds = model.labelled_inputs_embeds(labels, tokens, instruction)
    limit, needed = model.context_length, embeds.shape[1] + options.max_new_tokens
    if needed > limit:
        prompt_only = model.inputs_embeds(tokens[:1], instruction).shape[1] - tokens.shape[1]  # bos, before, after
        per_segment = (embeds.shape[1] - prompt_only) / len(segments)  # audio tokens + time label
        fit = max(0, int((limit - options.max_new_tokens - prompt_only) // per_segment))
        raise UsageError(
            f"--whole: {len(segments)} segments need {embeds.shape[1]} + {options.max_new_tokens} tokens but the LLM "
            f"holds {limit}; at most {fit} segments (~{fit * WINDOW_SECONDS:.0f} s of audio) fit: drop --whole for "
            "one answer per segment"
        )
    return model.answer_embeds(embeds, options, lora_scale=lora_scale, generator=generator)

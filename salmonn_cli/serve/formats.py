"""Results -> OpenAI's response bodies and server-sent events, in the shapes the openai SDK parses.

Subtitles come from the CLI's own writers (`output.write_srt`, `write_vtt`) on the CLI's own Record, so a served
srt is byte for byte what `salmonn transcribe -f srt` writes. verbose_json's segments are the same cues.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from collections.abc import Callable
from typing import Any

from ..longform import FileAnswer
from ..output import Cue, Record, write_srt, write_vtt


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line (`[DONE]` as it is)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


def duration_usage(seconds: float) -> dict[str, Any]:
    return {"type": "duration", "seconds": math.ceil(seconds)}


def transcription_text(record: Record, response_format: str) -> str:
    """The body of a text-like answer: bare text, or a subtitle file."""
    if response_format == "srt":
        return write_srt(record)
    if response_format == "vtt":
        return write_vtt(record)
    return record.text


def transcription_json(record: Record) -> dict[str, Any]:
    return {"text": record.text, "usage": duration_usage(record.audio_seconds)}


def transcription_verbose(
    record: Record, answer: FileAnswer, *, language: str, temperature: float, eos_token_id: int
) -> dict[str, Any]:
    """verbose_json: every field of OpenAI's TranscriptionSegment, from the answered segments that said something.

    `tokens` are the LLM's ids of the segment's answer; `avg_logprob` and `no_speech_prob` are 0.0, since the
    decoder keeps no per-step scores (silent segments are never answered, so none appears here)."""
    segments = []
    for cue, ids in zip(answer.cues, answer.cue_token_ids, strict=True):
        if not cue.text.strip():
            continue
        text = cue.text.strip()
        data = text.encode()
        segments.append({
            "id": len(segments),
            "seek": int(cue.start * 100),  # Whisper's unit: 10 ms frames
            "start": round(cue.start, 3),
            "end": round(cue.end, 3),
            "text": text,
            "tokens": [i for i in ids if i != eos_token_id],
            "temperature": temperature,
            "avg_logprob": 0.0,
            "compression_ratio": len(data) / len(zlib.compress(data)) if data else 0.0,
            "no_speech_prob": 0.0,
        })  # fmt: skip
    return {
        "task": "translate" if record.task == "translate" else "transcribe",
        "language": language,
        "duration": record.audio_seconds,
        "text": record.text,
        "segments": segments,
        "usage": duration_usage(record.audio_seconds),
    }


def transcript_delta(delta: str) -> dict[str, Any]:
    return {"type": "transcript.text.delta", "delta": delta}


def transcript_segment(index: int, cue: Cue) -> dict[str, Any]:
    """OpenAI's `transcript.text.segment` event (its diarized streams' shape, without a speaker): one answered
    segment and its times, sent when a stream asked for `timestamp_granularities[]=segment`."""
    return {"type": "transcript.text.segment", "id": f"seg_{index}", "start": round(cue.start, 3),
            "end": round(cue.end, 3), "text": cue.text}  # fmt: skip


def transcript_events() -> Callable[[str | Cue], str]:
    """What a transcription stream sends for each item its job emits: a text delta, or a segment (numbered)."""
    segments = itertools.count()

    def event(item: str | Cue) -> str:
        if isinstance(item, Cue):
            return sse(transcript_segment(next(segments), item))
        return sse(transcript_delta(item))

    return event


def transcript_done(text: str, seconds: float) -> dict[str, Any]:
    return {"type": "transcript.text.done", "text": text, "usage": duration_usage(seconds)}


def chat_usage(prompt_tokens: int, completion_tokens: int, audio_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"audio_tokens": audio_tokens, "cached_tokens": 0},
    }


def chat_completion(
    completion_id: str, created: int, model: str, text: str, finish_reason: str, usage: dict[str, Any]
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage,
    }


def chat_chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    *,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    """One chat.completion.chunk; `delta` None is the usage chunk (no choices). With `with_usage` (the client
    asked for usage) every chunk carries a `usage` key, null but on the last."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}  # fmt: skip
    if with_usage:
        chunk["usage"] = usage
    return chunk

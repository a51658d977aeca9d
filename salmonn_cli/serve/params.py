"""Requests as clients send them -> checked, typed requests; every problem is a 400 that names its field.

Form fields arrive as strings (the openai SDK sends `true`/`false` and numbers as text; lists as `name[]`), chat
bodies as JSON. Decoding starts from the server's settings (those of the task commands for the same options) and
each request may change the temperature, top_p, seed, token limit, beams and LoRA scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..cli.commands import sampling_fields
from ..cli.options import DecodeChoice
from ..cli.runner import Task
from ..errors import UsageError
from .api_error import ApiError, invalid, missing
from .config import ServeConfig

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAMED_FORMATS = ("json", "text")  # a stream is text deltas; subtitles and verbose_json are whole documents
AUDIO_PART_TYPES = ("input_audio", "audio_url")


@dataclass(frozen=True)
class AudioRequest:
    """A transcription or translation: what to run, how to decode and how to answer."""

    task: Task
    response_format: str
    stream: bool
    decode: DecodeChoice
    language: str  # verbose_json's `language`: the full English name, lower case ("english"), or "unknown"
    stream_segments: bool = False  # a stream that asked for segment times: a `transcript.text.segment` event each


@dataclass(frozen=True)
class ChatRequest:
    """A chat turn: the instruction (the last user message's text), its audio, and how to decode and answer."""

    instruction: str
    audio: bytes
    audio_param: str  # where the audio was, as a JSON path, for error messages
    stream: bool
    include_usage: bool
    decode: DecodeChoice


def checked_model(value: object, config: ServeConfig) -> str:
    if value is None or value == "":
        raise missing("model")
    if value not in config.model_ids:
        names = ", ".join(config.model_ids)
        raise ApiError(404, f"the model {value!r} does not exist; this server serves {names}", param="model",
                       code="model_not_found")  # fmt: skip
    return str(value)


# -- form fields --------------------------------------------------------------------------------------------------
def _text(form, name: str) -> str | None:
    value = form.get(name)
    if value is None or isinstance(value, str):
        return value
    raise invalid(name, f"'{name}' must be a text field, not a file")


def _form_number(form, name: str) -> float | None:
    text = _text(form, name)
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise invalid(name, f"'{name}' must be a number, got {text!r}") from None


def _form_int(form, name: str) -> int | None:
    number = _form_number(form, name)
    if number is None:
        return None
    if not number.is_integer():
        raise invalid(name, f"'{name}' must be an integer, got {number:g}")
    return int(number)


def _form_bool(form, name: str) -> bool:
    text = (_text(form, name) or "false").strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise invalid(name, f"'{name}' must be true or false, got {text!r}")
    return text in ("true", "1")


def audio_request(form, kind: str, config: ServeConfig) -> AudioRequest:
    """A transcription (`kind` "transcribe") or translation ("translate") from its multipart form."""
    from ..prompt import LANGUAGE_NAMES, transcribe_instruction, translate_instruction

    checked_model(_text(form, "model"), config)
    response_format = _text(form, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise invalid("response_format", f"'response_format' must be one of {', '.join(RESPONSE_FORMATS)}; got "
                      f"{response_format!r}")  # fmt: skip
    stream = _form_bool(form, "stream")
    if stream and response_format not in STREAMED_FORMATS:
        raise invalid("stream", f"stream=true gives text deltas: use response_format json or text, not "
                      f"{response_format}")  # fmt: skip
    granularities = [*form.getlist("timestamp_granularities[]"), *form.getlist("timestamp_granularities")]
    if "word" in granularities:
        raise invalid("timestamp_granularities", "word timestamps are not available: SALMONN gives segment times")
    unknown = [g for g in granularities if g != "segment"]
    if unknown:
        raise invalid("timestamp_granularities", f"unknown timestamp granularity {unknown[0]!r} (use segment)")
    stream_segments = stream and "segment" in granularities
    temperature = _form_number(form, "temperature")
    if temperature is not None and not 0 <= temperature <= 1:
        raise invalid("temperature", f"'temperature' must be between 0 and 1, got {temperature:g}")
    decode = decoding(
        config.decode,
        temperature=temperature,
        max_new_tokens=_form_int(form, "max_new_tokens"),
        num_beams=_form_int(form, "num_beams"),
        seed=_form_int(form, "seed"),
        lora_scale=_form_number(form, "lora_scale"),
    )
    if kind == "transcribe":
        language = (_text(form, "language") or "").strip().lower()
        try:
            instruction = transcribe_instruction(language or "en")
        except UsageError:
            raise invalid("language", f"no transcription prompt for language {language!r}: use en, zh, de or "
                          "leave it out (SALMONN hears the language itself)") from None  # fmt: skip
        name = LANGUAGE_NAMES.get(language, "unknown") if language else "unknown"
        return AudioRequest(Task("transcribe", instruction), response_format, stream, decode, name.lower(),
                            stream_segments)  # fmt: skip
    target = (_text(form, "to_language") or "en").strip()
    try:
        instruction = translate_instruction(target)
    except UsageError as exc:
        raise invalid("to_language", str(exc)) from None
    name = LANGUAGE_NAMES.get(target.lower(), target)
    return AudioRequest(Task("translate", instruction), response_format, stream, decode, name.lower(), stream_segments)


def decoding(
    base: DecodeChoice,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    seed: int | None = None,
    lora_scale: float | None = None,
) -> DecodeChoice:
    """`base` with what the request changed; a value the decoder refuses is a 400 naming its field."""
    changes: dict[str, Any] = {}
    if temperature is not None:
        changes.update(sampling_fields(temperature))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise invalid("top_p", f"'top_p' must be in (0, 1], got {top_p:g}")
        changes["top_p"] = top_p
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise invalid("max_tokens", f"the token limit must be at least 1, got {max_new_tokens}")
        changes["max_new_tokens"] = max_new_tokens
    if num_beams is not None:
        if not 1 <= num_beams <= 16:
            raise invalid("num_beams", f"'num_beams' must be between 1 and 16, got {num_beams}")
        changes["num_beams"] = num_beams
    if lora_scale is not None and not (math.isfinite(lora_scale) and lora_scale >= 0):
        raise invalid("lora_scale", f"'lora_scale' must be a number >= 0 (0 turns LoRA off), got {lora_scale:g}")
    return DecodeChoice(
        replace(base.options, **changes),
        seed=base.seed if seed is None else seed,
        lora_scale=base.lora_scale if lora_scale is None else lora_scale,
    )


# -- chat JSON ----------------------------------------------------------------------------------------------------
def _json_number(body: dict, name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, f"'{name}' must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise invalid(name, f"'{name}' must be between {lo:g} and {hi:g}, got {value:g}")
    return float(value)


def _json_int(body: dict, name: str, lo: int = 0) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"'{name}' must be an integer, got {value!r}")
    if value < lo:
        raise invalid(name, f"'{name}' must be at least {lo}, got {value}")
    return value


def _refuse_unsupported(body: dict) -> None:
    """Fields whose answer would take a shape this server cannot give: refused, not silently ignored."""
    if body.get("n") not in (None, 1):
        raise invalid("n", "this server gives one choice per request (n=1)")
    if body.get("logprobs"):
        raise invalid("logprobs", "log probabilities are not available")
    if "audio" in (body.get("modalities") or []) or body.get("audio"):
        raise invalid("modalities", "this server answers in text only")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        raise invalid("response_format", "only text answers are available (response_format type text)")
    if body.get("tool_choice") == "required" or isinstance(body.get("tool_choice"), dict):
        raise invalid("tool_choice", "this model cannot call tools")


def chat_request(body: object, config: ServeConfig) -> ChatRequest:
    """A chat completion request: the last user message's text is the instruction; its audio, or else the most
    recent earlier message's, is what the model hears (so a follow-up question needs no new upload)."""
    from .intake import decode_base64

    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_request")
    checked_model(body.get("model"), config)
    messages = body.get("messages")
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise invalid("messages", "'messages' must be a non-empty list of message objects")
    _refuse_unsupported(body)
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise invalid("messages", "there is no user message to answer")
    texts, audio = _parts(messages[users[-1]], users[-1])
    instruction = "\n".join(t for t in texts if t.strip()).strip()
    if not instruction:
        raise invalid("messages", "the last user message has no text: say what to do with the audio")
    for index in reversed(users[:-1]):
        if audio is not None:
            break
        audio = _parts(messages[index], index)[1]
    if audio is None:
        raise ApiError(400, "SALMONN needs an audio input: a content part of type input_audio", param="messages",
                       code="unsupported_content")  # fmt: skip
    data, param = audio
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream", f"'stream' must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options", "'stream_options' must be an object")
    limit = _json_int(body, "max_completion_tokens", 1)
    decode = decoding(
        config.decode,
        temperature=_json_number(body, "temperature", 0, 2),
        top_p=_json_number(body, "top_p", 0, 1),
        max_new_tokens=limit if limit is not None else _json_int(body, "max_tokens", 1),
        num_beams=_json_int(body, "num_beams", 1),
        seed=_json_int(body, "seed", -(2**63)),
        lora_scale=_json_number(body, "lora_scale", 0, math.inf),
    )
    return ChatRequest(instruction, decode_base64(data, param), param, stream, bool(options.get("include_usage")),
                       decode)  # fmt: skip


def _parts(message: dict, index: int) -> tuple[list[str], tuple[object, str] | None]:
    """A message's text pieces and its one audio part's (base64 data, JSON path), if any."""
    content = message.get("content")
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return [content], None
    if not isinstance(content, list):
        raise invalid(where, f"'{where}' must be a string or a list of content parts")
    texts, audios = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise invalid(at, f"'{at}.text' must be a string")
            texts.append(part["text"])
        elif kind == "input_audio":
            payload = part.get("input_audio")
            if not isinstance(payload, dict) or "data" not in payload:
                raise invalid(at, f"'{at}.input_audio' must be an object with 'data' (base64) and 'format'")
            audios.append((payload["data"], f"{at}.input_audio.data"))
        elif kind == "audio_url":
            payload = part.get("audio_url")
            url = payload.get("url") if isinstance(payload, dict) else payload
            if not isinstance(url, str) or not url.startswith("data:"):
                raise ApiError(400, "audio_url must be a data: URL (the server fetches nothing from the network)",
                               param=f"{at}.audio_url", code="unsupported_content")  # fmt: skip
            audios.append((url, f"{at}.audio_url"))
        else:
            raise ApiError(400, f"content parts of type {kind!r} are not supported: send text and input_audio",
                           param=at, code="unsupported_content")  # fmt: skip
    if len(audios) > 1:
        raise ApiError(400, "one audio part per message: SALMONN hears one clip at a time", param=where,
                       code="unsupported_content")  # fmt: skip
    return texts, (audios[0] if audios else None)

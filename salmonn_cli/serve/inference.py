"""What the model does for each request, in the worker thread: the CLI's own code paths, watched and streamed.

A transcription or translation is `runner.answer_waveform` (long audio cut at pauses, as `salmonn transcribe`);
a chat turn about a clip of at most one window is `SalmonnModel.answer` on audio tokens kept by content hash (as
`salmonn chat`: a conversation re-sending its clip is encoded once), and about a longer clip it is
`answer_waveform` again, as `salmonn ask`. Every decode runs under a `DecodeWatch`: the request's stop flag is
checked each step, and a streaming request gets text deltas as tokens or segments are decoded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..cli.runner import LoadedModel, Task, answer_waveform, oom_hint, record_for
from ..cli.tasks import longform_settings
from ..decode_watch import DecodeWatch, watched_decoding
from ..longform import FileAnswer
from ..output import Cue, Record
from ..window import WINDOW_SECONDS
from .config import ServeConfig
from .intake import Clip
from .params import AudioRequest, ChatRequest

KEPT_CLIPS = 8  # audio tokens kept for chat, by content hash (a 13B clip's tokens are ~1 MB)
CHAT_TASK = "ask"  # a chat turn answers like `salmonn ask` (long audio: one timed line per segment)


@dataclass(frozen=True)
class ChatAnswer:
    """One chat turn's answer: its text, the LLM's ids, prompt size and why it ended ("stop" or "length")."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    audio_tokens: int
    finish_reason: str


class TextDeltas:
    """The growing text of an answer as deltas that never take back what they sent.

    `on_text` gets the settled text after each decoded batch of segments; `on_step` each step's ids (one row: one
    segment at a time, greedy or sampling), whose text is offered after the settled text, one token held back (a
    token may be half of a character, or change the spacing of the one before it).
    """

    def __init__(self, emit: Callable[[str], None], decode_ids: Callable[[list[int]], str], eos: int,
                 tokens: bool) -> None:  # fmt: skip
        self._emit, self._decode, self._eos, self._tokens = emit, decode_ids, eos, tokens
        self.sent = ""
        self._settled = ""
        self._ids: list[int] = []
        self._ended = False

    def on_text(self, text: str) -> None:
        self._settled, self._ids, self._ended = text, [], False
        self._offer(text)

    def on_step(self, ids: Sequence[int]) -> None:
        if not self._tokens or len(ids) != 1 or self._ended:
            return
        if ids[0] == self._eos:
            self._ended = True  # what follows until the next segment is padding
            return
        self._ids.append(ids[0])
        partial = self._decode(self._ids[:-1]).strip()
        if partial:
            self._offer(f"{self._settled} {partial}" if self._settled else partial)

    def _offer(self, text: str) -> None:
        text = text.rstrip().rstrip("\ufffd")
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self._emit(text[len(self.sent) :])
            self.sent = text


class ServedModel:
    """The loaded model as the routes use it. Not thread-safe: only the worker thread calls `transcribe`/`chat`."""

    def __init__(self, loaded: LoadedModel, config: ServeConfig) -> None:
        self.loaded, self.config = loaded, config
        self._tokens: OrderedDict[str, object] = OrderedDict()
        self.encoded = 0  # clips run through the encoders for chat (the cache's misses)

    @property
    def _model(self):
        return self.loaded.model

    def transcribe(
        self, clip: Clip, request: AudioRequest, stop: threading.Event, emit: Callable[[str | Cue], None] | None
    ) -> tuple[Record, FileAnswer]:
        """The CLI's answer; a stream's `emit` gets text deltas, and each timed segment if the request asked."""
        settings = longform_settings(request.task.name, self.config.longform)
        deltas = self._deltas(emit, tokens=not settings.timestamped and settings.batch_size == 1)
        on_cue = emit if emit is not None and request.stream_segments else None  # a Cue among the text deltas
        with watched_decoding(DecodeWatch(stop, deltas.on_step if deltas else None)):
            answer = answer_waveform(self.loaded, request.task, clip.waveform, request.task.instruction,
                                     request.decode, settings, on_text=deltas.on_text if deltas else None,
                                     on_cue=on_cue)  # fmt: skip
        record = record_for(self.loaded, request.task, "upload", clip.waveform, request.task.instruction,
                            request.decode, answer)  # fmt: skip
        return record, answer

    def chat(
        self, clip: Clip, request: ChatRequest, stop: threading.Event, emit: Callable[[str], None] | None
    ) -> ChatAnswer:
        task = Task(CHAT_TASK, request.instruction)
        if clip.seconds > WINDOW_SECONDS:
            record, answer = self.transcribe(clip, _as_audio_request(task, request), stop, emit)
            ids = tuple(i for cue_ids in answer.cue_token_ids for i in cue_ids)
            truncated = any(self._truncated(cue_ids, request) for cue_ids in answer.cue_token_ids)
            return ChatAnswer(record.text, ids, 0, 0, "length" if truncated else "stop")
        from ..audio import is_silent
        from ..generate import seeded_generator

        tokens = self._audio_tokens(clip)
        prompt_tokens = self._model.inputs_embeds(tokens, request.instruction).shape[1]
        if is_silent(clip.waveform) and not self.config.longform.force:  # as `salmonn ask`: nothing to answer
            return ChatAnswer("", (), prompt_tokens, tokens.shape[1], "stop")
        deltas = self._deltas(emit, tokens=True)
        generator = seeded_generator(request.decode.seed, self._model.device)
        with watched_decoding(DecodeWatch(stop, deltas.on_step if deltas else None)), oom_hint(self.loaded):
            scale = request.decode.scale_for(task.lora_scale)
            result = self._model.answer(tokens, request.instruction, request.decode.options, lora_scale=scale,
                                        generator=generator)  # fmt: skip
        text, ids = result.text.strip(), tuple(result.token_ids)
        if deltas is not None:
            deltas.on_text(text)  # the token held back, and anything the steps could not settle
        finish = "length" if self._truncated(ids, request) else "stop"
        return ChatAnswer(text, ids, prompt_tokens, tokens.shape[1], finish)

    def _truncated(self, ids: Sequence[int], request) -> bool:
        eos = self._model.tokenizer.eos_token_id
        return len(ids) >= request.decode.options.max_new_tokens and (not ids or ids[-1] != eos)

    def _audio_tokens(self, clip: Clip):
        tokens = self._tokens.pop(clip.sha256, None)
        if tokens is None:
            tokens = self._model.audio_tokens(clip.waveform)
            self.encoded += 1
        self._tokens[clip.sha256] = tokens  # most recently used last
        while len(self._tokens) > KEPT_CLIPS:
            self._tokens.popitem(last=False)
        return tokens

    def _deltas(self, emit: Callable[[str], None] | None, *, tokens: bool) -> TextDeltas | None:
        if emit is None:
            return None
        tokenizer = self._model.tokenizer
        return TextDeltas(emit, tokenizer.decode, tokenizer.eos_token_id, tokens)


def _as_audio_request(task: Task, request: ChatRequest) -> AudioRequest:
    return AudioRequest(task, "text", request.stream, request.decode, "unknown")

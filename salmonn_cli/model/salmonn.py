"""SALMONN as one nn.Module: audio -> audio tokens -> LLM, with generation and the training loss.

Flow: waveform -> first 30 s (padded to >= 1 s) -> Whisper log-mel -> Whisper encoder (B, 1500, Dw)
                                                -> BEATs fbank     -> BEATs            (B, Tb, Db)
      -> SpeechConnector (LayerNorms, windows, Q-Former, projection) -> audio tokens (B, L*Q, D)
      -> [bos] + prompt-before + audio tokens + prompt-after -> LLaMA + LoRA.

Batches (`generate_batch`, `audio_tokens_batch`, `answer_batch`) are for the segments of a long file: every
clip is at most 30 s, so all have the same number of audio tokens and one prompt length, and row i of a batch
gives what the clip gives alone. Only `generate` and `generate_batch` time what they do (encoding, then
decoding); the stages below them do the work and nothing else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import prompt as prompts
from ..audio import model_window
from ..decode_options import DecodeOptions, decode_options
from ..errors import UsageError
from ..features import beats_fbank, whisper_log_mel
from ..generate import GenerationResult, Timings, decode_batch
from ..llm import input_embeddings, scaled_lora
from ..tokenizer import Tokenizer
from .qformer import SpeechConnector, WindowSpec


@dataclass(frozen=True)
class SalmonnSettings:
    """What the model needs besides its weights."""

    windows: WindowSpec
    trained_lora_scale: float  # the scaling every call uses unless it names its own
    prompt_template: str = prompts.PROMPT_TEMPLATE


class SalmonnModel(nn.Module):
    """The assembled model. Build it with `salmonn_cli.load_model`."""

    def __init__(
        self,
        *,
        whisper: nn.Module,
        whisper_extractor,
        beats: nn.Module,
        connector: SpeechConnector,
        llm: nn.Module,
        tokenizer: Tokenizer,
        settings: SalmonnSettings,
    ) -> None:
        super().__init__()
        self.whisper = whisper
        self.whisper_extractor = whisper_extractor
        self.beats = beats
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        self.settings = settings

    @property
    def device(self) -> torch.device:
        return self.connector.query_tokens.device

    @property
    def encoder_dtype(self) -> torch.dtype:
        return self.connector.query_tokens.dtype

    # -- audio -> tokens ---------------------------------------------------------------------------------
    def whisper_features(self, waveform: np.ndarray) -> torch.Tensor:
        """Log-mel of the model window: (1, 80, 3000)."""
        return self._whisper_features(model_window(waveform))

    def beats_features(self, waveform: np.ndarray) -> torch.Tensor:
        """Normalised Kaldi fbank of the model window: (1, F, 128)."""
        return self._beats_features(model_window(waveform))

    def _whisper_features(self, window: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(whisper_log_mel(self.whisper_extractor, window))[None]

    def _beats_features(self, window: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(beats_fbank(window))[None]

    def encode(self, waveform: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Both encoders on the model window of one waveform: (1, 1500, Dw), (1, Tb, Db)."""
        window = model_window(waveform)
        speech = self.encode_speech(self._whisper_features(window))
        return speech, self.encode_audio(self._beats_features(window))

    def encode_speech(self, mel: torch.Tensor) -> torch.Tensor:
        """Whisper encoder: (B, 80, 3000) -> (B, 1500, Dw)."""
        return self.whisper(mel.to(self.device, self.encoder_dtype)).last_hidden_state

    def encode_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        """BEATs: (B, F, 128) -> (B, Tb, Db)."""
        return self.beats(fbank.to(self.device, self.encoder_dtype))

    @torch.inference_mode()
    def audio_tokens(self, waveform: np.ndarray) -> torch.Tensor:
        """Audio tokens for the first 30 s of a 16 kHz mono float32 waveform: (1, N, llm_hidden)."""
        return self.connector(*self.encode(waveform))

    @torch.inference_mode()
    def audio_tokens_batch(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        """Audio tokens of several clips at once: (B, N, llm_hidden); row i equals `audio_tokens(waveforms[i])`.

        Whisper runs on the stacked log-mels (each is padded to 30 s anyway). BEATs runs on each clip's real
        length, as the original does: it has no padding mask, so padding would change its output; clips of the
        same length share one call. The connector then reads every clip's windows in one Q-Former call.
        """
        if len(waveforms) == 0:
            raise UsageError("audio_tokens_batch needs at least one waveform")
        windows = [model_window(w) for w in waveforms]
        speech = self.encode_speech(torch.cat([self._whisper_features(w) for w in windows]))
        audio = self._beats_by_length([self._beats_features(w) for w in windows])
        return self.connector.forward_batch(speech, audio)

    def _beats_by_length(self, fbanks: list[torch.Tensor]) -> list[torch.Tensor]:
        """BEATs output (1, Tb_i, Db) per clip; filter banks of one length are encoded together."""
        by_length: dict[int, list[int]] = {}
        for i, fbank in enumerate(fbanks):
            by_length.setdefault(fbank.shape[1], []).append(i)
        out: list[torch.Tensor] = [torch.empty(0)] * len(fbanks)
        for rows in by_length.values():
            encoded = self.encode_audio(torch.cat([fbanks[i] for i in rows]))
            for j, i in enumerate(rows):
                out[i] = encoded[j : j + 1]
        return out

    # -- LLM inputs --------------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """Tokens the LLM holds: prompt, audio tokens and answer together."""
        return self.llm.config.max_position_embeddings

    def prompt_ids(self, prompt: str) -> prompts.PromptIds:
        return prompts.prompt_ids(self.tokenizer, prompt, self.settings.prompt_template)

    def inputs_embeds(self, audio_tokens: torch.Tensor, prompt: str) -> torch.Tensor:
        """`[bos, before, audio, after]` embeddings: (1, 1 + Nb + N + Na, D)."""
        table = input_embeddings(self.llm)
        return prompts.assemble_inputs(table, self.prompt_ids(prompt), audio_tokens, self.tokenizer.bos_token_id)

    def labelled_inputs_embeds(self, labels: Sequence[str], audio_tokens: torch.Tensor, prompt: str) -> torch.Tensor:
        """One prompt holding several clips' audio tokens (S, N, D), each after its text label: (1, T, D).

        `[bos, before, label_1, audio_1, ..., label_S, audio_S, after]`; the published models were trained with one
        clip per prompt, so this is an extension (asking about long audio as a whole), not the original.
        """
        parts = [(self.tokenizer.encode(label), audio_tokens[i : i + 1]) for i, label in enumerate(labels)]
        table = input_embeddings(self.llm)
        return prompts.assemble_labelled_inputs(table, self.prompt_ids(prompt), parts, self.tokenizer.bos_token_id)

    def _scale(self, scale: float | None) -> float:
        if scale is None:
            return self.settings.trained_lora_scale
        if not math.isfinite(scale) or scale < 0:
            raise UsageError(f"lora_scale must be a finite number >= 0 (0 turns LoRA off), got {scale!r}")
        return float(scale)

    @torch.inference_mode()
    def next_token_logits(self, inputs_embeds: torch.Tensor, *, lora_scale: float | None = None) -> torch.Tensor:
        """LLM logits at the last position (the first generated token's): (V,)."""
        with scaled_lora(self.llm, self._scale(lora_scale)):
            out = self.llm(inputs_embeds=inputs_embeds.to(self.device), use_cache=False)
        return out.logits[0, -1].float()

    # -- generation ----------------------------------------------------------------------------------------
    def generate(
        self,
        waveform: np.ndarray,
        prompt: str,
        options: DecodeOptions | None = None,
        *,
        lora_scale: float | None = None,
        generator: torch.Generator | None = None,
        **changes,
    ) -> GenerationResult:
        """Answer `prompt` about the first 30 s of `waveform` (1-D float32, 16 kHz), as the original does.

        `options` (default `DecodeOptions()`: the original's beams 4, 200 new tokens, no sampling), with any of
        its fields changed by keyword (`max_new_tokens=8`); `lora_scale` overrides the trained scaling for this call.
        """
        options = decode_options(options, **changes)
        start = time.perf_counter()
        tokens = self.audio_tokens(waveform)
        encoded = time.perf_counter()
        result = self.answer(tokens, prompt, options, lora_scale=lora_scale, generator=generator)
        done = time.perf_counter()
        timings = Timings(encode_s=encoded - start, decode_s=done - encoded, total_s=done - start)
        return GenerationResult(result.text, result.token_ids, timings)

    def generate_batch(
        self,
        waveforms: Sequence[np.ndarray],
        prompt: str,
        options: DecodeOptions | None = None,
        *,
        batch_size: int = 8,
        lora_scale: float | None = None,
        generator: torch.Generator | None = None,
        **changes,
    ) -> list[GenerationResult]:
        """`generate` for many clips (each at most 30 s is heard), `batch_size` clips encoded and decoded together.

        Without sampling, result i equals `generate(waveforms[i], prompt, ...)`. Timings: each batch's encode and
        decode wall times split evenly over its clips, so they add up to the wall time of the whole call.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        options = decode_options(options, **changes)
        waveforms = list(waveforms)
        results: list[GenerationResult] = []
        for first in range(0, len(waveforms), batch_size):
            chunk = waveforms[first : first + batch_size]
            start = time.perf_counter()
            tokens = self.audio_tokens_batch(chunk)
            encoded = time.perf_counter()
            answers = self.answer_batch(tokens, prompt, options, lora_scale=lora_scale, generator=generator)
            encode_s, decode_s = (encoded - start) / len(chunk), (time.perf_counter() - encoded) / len(chunk)
            timings = Timings(encode_s=encode_s, decode_s=decode_s, total_s=encode_s + decode_s)
            results += [GenerationResult(a.text, a.token_ids, timings) for a in answers]
        return results

    @torch.inference_mode()
    def answer(
        self,
        audio_tokens: torch.Tensor,
        prompt: str,
        options: DecodeOptions | None = None,
        *,
        lora_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> GenerationResult:
        """Generate from audio tokens already computed (so a chat can ask many questions about one clip).

        `options` defaults to the original's decoding (`DecodeOptions()`: beams 4, 200 new tokens).
        """
        return self._answer_rows(self.inputs_embeds(audio_tokens, prompt), options, lora_scale, generator)[0]

    @torch.inference_mode()
    def answer_embeds(
        self,
        inputs_embeds: torch.Tensor,
        options: DecodeOptions | None = None,
        *,
        lora_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> GenerationResult:
        """Generate from one prompt already embedded, (1, T, D) (e.g. `labelled_inputs_embeds`)."""
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
            raise UsageError(f"answer_embeds takes one prompt (1, T, D), got {tuple(inputs_embeds.shape)}")
        return self._answer_rows(inputs_embeds, options, lora_scale, generator)[0]

    @torch.inference_mode()
    def answer_batch(
        self,
        audio_tokens: torch.Tensor,
        prompt: str,
        options: DecodeOptions | None = None,
        *,
        lora_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> list[GenerationResult]:
        """`answer` for B clips' audio tokens (B, N, D) with one prompt, decoded together (`decode_batch`).

        Without sampling row i gets `answer(audio_tokens[i:i+1], ...)`'s ids; sampled ids depend on the whole
        batch (one generator, drawn row by row).
        """
        embeds = torch.cat([self.inputs_embeds(audio_tokens[i : i + 1], prompt) for i in range(audio_tokens.shape[0])])
        return self._answer_rows(embeds, options, lora_scale, generator)

    def _answer_rows(self, embeds, options, lora_scale, generator) -> list[GenerationResult]:
        """Decode every row of `embeds` together and turn each row's ids into text."""
        tokenizer = self.tokenizer
        with scaled_lora(self.llm, self._scale(lora_scale)):
            outs = decode_batch(
                self.llm,
                embeds.to(self.device),
                options or DecodeOptions(),
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                generator=generator,
                keep_step_scores=False,
            )
        return [GenerationResult(tokenizer.decode(list(out.token_ids)), list(out.token_ids)) for out in outs]

    # -- training loss -------------------------------------------------------------------------------------
    def training_inputs(
        self, waveform: np.ndarray, prompt: str, target_text: str, max_txt_len: int = prompts.MAX_TARGET_TOKENS
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs with the target appended and labels masking all before it, as the original's forward builds."""
        tokens = self.connector(*self.encode(waveform))
        targets = prompts.target_ids(self.tokenizer, target_text, max_txt_len)
        table = input_embeddings(self.llm)
        return prompts.assemble_training(table, self.prompt_ids(prompt), tokens, self.tokenizer.bos_token_id, targets)

    def loss_from_inputs(
        self, inputs_embeds: torch.Tensor, labels: torch.Tensor, *, lora_scale: float | None = None
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled positions (Hugging Face's causal-LM loss)."""
        with scaled_lora(self.llm, self._scale(lora_scale)):
            return self.llm(
                inputs_embeds=inputs_embeds.to(self.device), labels=labels.to(self.device), use_cache=False
            ).loss

    @torch.inference_mode()
    def loss(
        self,
        waveform: np.ndarray,
        prompt: str,
        target_text: str,
        *,
        max_txt_len: int = prompts.MAX_TARGET_TOKENS,
        lora_scale: float | None = None,
    ) -> float:
        """The training loss exactly as the original's forward computes it (target + `</s>`; prompt masked)."""
        embeds, labels = self.training_inputs(waveform, prompt, target_text, max_txt_len)
        return float(self.loss_from_inputs(embeds, labels, lora_scale=lora_scale))

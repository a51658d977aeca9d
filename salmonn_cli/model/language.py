"""The LLM half every audio LLM here shares: prompt + audio tokens -> embeddings -> decoding (or a loss).

A subclass supplies the audio half (`audio_tokens`, `audio_tokens_batch`: every clip of one model gives the same
number of tokens) and has `llm`, `tokenizer` and `settings` (`trained_lora_scale`, `prompt_template`). A causal LM
decodes through engine.py's `LlamaEngine`; an encoder-decoder LM (T5) overrides `decode_engine` and `assemble`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .. import prompt as prompts
from ..decode_options import DecodeOptions, decode_options
from ..errors import UsageError
from ..generate import GenerationResult, Timings, decode_batch
from ..llm import input_embeddings, scaled_lora


class AudioLanguageModel(nn.Module):
    """Audio tokens + a prompt -> answers, with the decode semantics of generate.py."""

    def audio_tokens(self, waveform: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def audio_tokens_batch(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def bos_token_id(self) -> int | None:
        """The id the prompt starts with (LLaMA's `<s>`), or None for a tokenizer without one."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None and bos >= 0 else None

    def assemble(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """Prompt pieces (1, n_i, D) in order -> the LLM's input embeddings: `[bos] + pieces` (1, T, D)."""
        table = input_embeddings(self.llm)
        device = pieces[0].device
        head = [] if self.bos_token_id is None else [prompts.embed_ids(table, (self.bos_token_id,), device)]
        return torch.cat(head + [p.to(table.weight.dtype) for p in pieces], dim=1)

    def decode_engine(self):
        """What `decode_batch` drives: the LLM itself (a LlamaEngine is made for it)."""
        return self.llm

    # -- LLM inputs --------------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """Tokens the LLM holds: prompt, audio tokens and answer together."""
        return self.llm.config.max_position_embeddings

    def prompt_ids(self, prompt: str) -> prompts.PromptIds:
        return prompts.prompt_ids(self.tokenizer, prompt, self.settings.prompt_template)

    def inputs_embeds(self, audio_tokens: torch.Tensor, prompt: str) -> torch.Tensor:
        """`[bos, before, audio, after]` embeddings: (1, 1 + Nb + N + Na, D)."""
        ids, table, device = self.prompt_ids(prompt), input_embeddings(self.llm), audio_tokens.device
        embed = prompts.embed_ids
        return self.assemble([embed(table, ids.before, device), audio_tokens, embed(table, ids.after, device)])

    def labelled_inputs_embeds(self, labels: Sequence[str], audio_tokens: torch.Tensor, prompt: str) -> torch.Tensor:
        """One prompt holding several clips' audio tokens (S, N, D), each after its text label: (1, T, D).

        `[bos, before, label_1, audio_1, ..., label_S, audio_S, after]`; the published models were trained with one
        clip per prompt, so this is an extension (asking about long audio as a whole), not the original.
        """
        ids, table, device = self.prompt_ids(prompt), input_embeddings(self.llm), audio_tokens.device
        embed = prompts.embed_ids
        pieces = [embed(table, ids.before, device)]
        for i, label in enumerate(labels):
            pieces += [embed(table, self.tokenizer.encode(label), device), audio_tokens[i : i + 1]]
        return self.assemble(pieces + [embed(table, ids.after, device)])

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
            engine = self.decode_engine()
            if isinstance(engine, nn.Module):  # a causal LM: its own forward, as transformers runs it
                return engine(inputs_embeds=inputs_embeds.to(self.device), use_cache=False).logits[0, -1].float()
            return engine.start(inputs_embeds.to(self.device), 1, 1)[0].float()

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
                self.decode_engine(),
                embeds.to(self.device),
                options or DecodeOptions(),
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                generator=generator,
                keep_step_scores=False,
            )
        return [GenerationResult(tokenizer.decode(list(out.token_ids)), list(out.token_ids)) for out in outs]


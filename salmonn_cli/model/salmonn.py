"""SALMONN as one nn.Module: audio -> audio tokens -> LLM, with generation and the training loss.

Flow: waveform -> first 30 s (padded to >= 1 s) -> Whisper log-mel -> Whisper encoder (B, 1500, Dw)
                                                -> BEATs fbank     -> BEATs            (B, Tb, Db)
      -> SpeechConnector (LayerNorms, windows, Q-Former, projection) -> audio tokens (B, L*Q, D)
      -> [bos] + prompt-before + audio tokens + prompt-after -> LLaMA + LoRA.

Batches (`generate_batch`, `audio_tokens_batch`, `answer_batch`) are for the segments of a long file: every
clip is at most 30 s, so all have the same number of audio tokens and one prompt length, and row i of a batch
gives what the clip gives alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from .. import prompt as prompts
from ..audio import model_window
from ..errors import UsageError
from ..features import beats_fbank, whisper_log_mel
from ..generate import DecodeOptions, GenerationResult, Timings, decode_batch
from ..llm import input_embeddings
from ..llm import lora_scale as scaled_lora
from ..tokenizer import TextCodec
from .qformer import SpeechConnector, WindowSpec


@dataclass(frozen=True)
class SalmonnSettings:
    """What the model needs besides its weights."""

    windows: WindowSpec
    trained_lora_scale: float = 4.0  # the scaling every call uses unless it names its own
    prompt_template: str = prompts.PROMPT_TEMPLATE
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0


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
        tokenizer: TextCodec,
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
        mel = whisper_log_mel(self.whisper_extractor, model_window(waveform))
        return torch.from_numpy(mel)[None]

    def beats_features(self, waveform: np.ndarray) -> torch.Tensor:
        """Normalised Kaldi fbank of the model window: (1, F, 128)."""
        return torch.from_numpy(beats_fbank(model_window(waveform)))[None]

    def encode_speech(self, mel: torch.Tensor) -> torch.Tensor:
        """Whisper encoder: (B, 80, 3000) -> (B, 1500, Dw)."""
        return self.whisper(mel.to(self.device, self.encoder_dtype)).last_hidden_state

    def encode_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        """BEATs: (B, F, 128) -> (B, Tb, Db)."""
        return self.beats(fbank.to(self.device, self.encoder_dtype))

    @torch.inference_mode()
    def audio_tokens(self, waveform: np.ndarray) -> torch.Tensor:
        """Audio tokens for the first 30 s of a 16 kHz mono float32 waveform: (1, N, llm_hidden)."""
        speech = self.encode_speech(self.whisper_features(waveform))
        audio = self.encode_audio(self.beats_features(waveform))
        return self.connector(speech, audio)

    @torch.inference_mode()
    def audio_tokens_batch(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        """Audio tokens of several clips at once: (B, N, llm_hidden); row i equals `audio_tokens(waveforms[i])`.

        Whisper runs on the stacked log-mels (each is padded to 30 s anyway). BEATs runs on each clip's real
        length, as the original does: it has no padding mask, so padding would change its output; clips of the
        same length share one call. The connector then reads every clip's windows in one Q-Former call.
        """
        if len(waveforms) == 0:
            raise UsageError("audio_tokens_batch needs at least one waveform")
        speech = self.encode_speech(torch.cat([self.whisper_features(w) for w in waveforms]))
        audio = self._beats_by_length([self.beats_features(w) for w in waveforms])
        return self._connect_batch(speech, audio)

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

    def _connect_batch(self, speech: torch.Tensor, audio: list[torch.Tensor]) -> torch.Tensor:
        """`connector(speech, audio)` for clips whose BEATs lengths differ: (B, N, D).

        `SpeechConnector.fuse` LayerNorms each stream BEFORE zero-padding it, so padded frames are exactly 0;
        zero-padding BEATs outputs to one length first would LayerNorm the padding into non-zero frames. So each
        clip is fused on its own (to max(1500, Tb) = 1500 frames for <= 30 s), and the windows, Q-Former and
        projection of `SpeechConnector.qformer_states` / `forward` run on the stack.
        """
        connector = self.connector
        fused = [connector.fuse(speech[i : i + 1], frames) for i, frames in enumerate(audio)]
        if len({f.shape[1] for f in fused}) != 1:
            raise ValueError(f"clips fuse to different frame counts {sorted({f.shape[1] for f in fused})}")
        fused = torch.cat(fused)  # (B, T, C)
        k, s = connector.windows.kernel, connector.windows.stride
        windows = fused.unfold(1, k, s).permute(0, 1, 3, 2).reshape(-1, k, fused.shape[-1])  # (B*L, K, C)
        queries = connector.query_tokens.expand(windows.shape[0], -1, -1)
        states = connector.qformer(query_embeds=queries, encoder_hidden_states=windows).last_hidden_state
        tokens = connector.proj(states)  # (B*L, Q, D)
        return tokens.reshape(len(audio), -1, tokens.shape[-1])

    # -- LLM inputs --------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> prompts.PromptIds:
        return prompts.prompt_ids(self.tokenizer, prompt, self.settings.prompt_template)

    def inputs_embeds(self, audio_tokens: torch.Tensor, prompt: str) -> torch.Tensor:
        """`[bos, before, audio, after]` embeddings: (1, 1 + Nb + N + Na, D)."""
        table = input_embeddings(self.llm)
        return prompts.assemble_inputs(table, self.prompt_ids(prompt), audio_tokens, self.settings.bos_token_id)

    def _scale(self, scale: float | None) -> float:
        return self.settings.trained_lora_scale if scale is None else float(scale)

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
        *,
        max_new_tokens: int = 200,
        num_beams: int = 4,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        min_length: int = 1,
        lora_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> GenerationResult:
        """Answer `prompt` about the first 30 s of `waveform` (1-D float32, 16 kHz), as the original does.

        Decoding defaults are the original's (beams 4, 200 new tokens, no sampling); `min_length` counts the
        BOS placeholder as transformers 4.28 did. `lora_scale` overrides the trained scaling for this call.
        """
        options = DecodeOptions(
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            min_length=min_length,
        )
        start = time.perf_counter()
        tokens = self.audio_tokens(waveform)
        encode_s = time.perf_counter() - start
        result = self.answer(tokens, prompt, options, lora_scale=lora_scale, generator=generator)
        timings = replace(result.timings, encode_s=encode_s, total_s=encode_s + result.timings.total_s)
        return replace(result, timings=timings)

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
        start = time.perf_counter()
        return self._answer_rows(self.inputs_embeds(audio_tokens, prompt), options, lora_scale, generator, start)[0]

    @torch.inference_mode()
    def answer_embeds(
        self,
        inputs_embeds: torch.Tensor,
        options: DecodeOptions | None = None,
        *,
        lora_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> GenerationResult:
        """Generate from one prompt already embedded, (1, T, D) (e.g. several labelled clips in one prompt)."""
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
            raise UsageError(f"answer_embeds takes one prompt (1, T, D), got {tuple(inputs_embeds.shape)}")
        return self._answer_rows(inputs_embeds, options, lora_scale, generator, time.perf_counter())[0]

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
        batch (one generator, drawn row by row). Timings: the batch's wall time split evenly over its rows.
        """
        started = time.perf_counter()
        embeds = torch.cat([self.inputs_embeds(audio_tokens[i : i + 1], prompt) for i in range(audio_tokens.shape[0])])
        return self._answer_rows(embeds, options, lora_scale, generator, started)

    def _answer_rows(self, embeds, options, lora_scale, generator, started: float) -> list[GenerationResult]:
        """Decode every row of `embeds` together; each result's timings are the wall time since `started` / B."""
        with scaled_lora(self.llm, self._scale(lora_scale)):
            outs = decode_batch(
                self.llm,
                embeds.to(self.device),
                options or DecodeOptions(),
                eos_token_id=self.settings.eos_token_id,
                bos_token_id=self.settings.bos_token_id,
                pad_token_id=self.settings.pad_token_id,
                generator=generator,
                keep_step_scores=False,
            )
        texts = [self.tokenizer.decode(list(out.token_ids)) for out in outs]
        share = (time.perf_counter() - started) / len(outs)
        timings = Timings(decode_s=share, total_s=share)
        return [GenerationResult(text, list(out.token_ids), timings) for text, out in zip(texts, outs, strict=True)]

    def generate_batch(
        self,
        waveforms: Sequence[np.ndarray],
        prompt: str,
        *,
        batch_size: int = 8,
        lora_scale: float | None = None,
        generator: torch.Generator | None = None,
        **decode_options,
    ) -> list[GenerationResult]:
        """`generate` for many clips (each at most 30 s is heard), `batch_size` clips encoded and decoded together.

        `decode_options` are `DecodeOptions` fields (the original's defaults: beams 4, 200 new tokens). Without
        sampling, result i equals `generate(waveforms[i], prompt, ...)`. Timings: each batch's encode and decode
        wall times split evenly over its clips, so they add up to the wall time of the whole call.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        unknown = sorted(set(decode_options) - {f.name for f in fields(DecodeOptions)})
        if unknown:
            raise UsageError(f"unknown decoding option(s): {', '.join(unknown)}")
        options = DecodeOptions(**decode_options)
        waveforms = list(waveforms)
        results: list[GenerationResult] = []
        for first in range(0, len(waveforms), batch_size):
            chunk = waveforms[first : first + batch_size]
            start = time.perf_counter()
            tokens = self.audio_tokens_batch(chunk)
            encode_s = (time.perf_counter() - start) / len(chunk)
            for result in self.answer_batch(tokens, prompt, options, lora_scale=lora_scale, generator=generator):
                total = encode_s + result.timings.total_s
                results.append(replace(result, timings=replace(result.timings, encode_s=encode_s, total_s=total)))
        return results

    # -- training loss -------------------------------------------------------------------------------------
    def training_inputs(
        self, waveform: np.ndarray, prompt: str, target_text: str, max_txt_len: int = 300
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs with the target appended and labels masking all before it, as the original's forward builds."""
        speech = self.encode_speech(self.whisper_features(waveform))
        audio = self.encode_audio(self.beats_features(waveform))
        tokens = self.connector(speech, audio)
        targets = prompts.target_ids(self.tokenizer, target_text, max_txt_len)
        table = input_embeddings(self.llm)
        return prompts.assemble_training(table, self.prompt_ids(prompt), tokens, self.settings.bos_token_id, targets)

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
        max_txt_len: int = 300,
        lora_scale: float | None = None,
    ) -> float:
        """The training loss exactly as the original's forward computes it (target + `</s>`; prompt masked)."""
        embeds, labels = self.training_inputs(waveform, prompt, target_text, max_txt_len)
        return float(self.loss_from_inputs(embeds, labels, lora_scale=lora_scale))

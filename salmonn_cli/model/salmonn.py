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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import prompt as prompts
from ..audio import model_window
from ..errors import UsageError
from ..features import beats_fbank, whisper_log_mel
from ..llm import input_embeddings, scaled_lora
from ..tokenizer import Tokenizer
from .language import AudioLanguageModel
from .qformer import SpeechConnector, WindowSpec


@dataclass(frozen=True)
class SalmonnSettings:
    """What the model needs besides its weights."""

    windows: WindowSpec
    trained_lora_scale: float  # the scaling every call uses unless it names its own
    prompt_template: str = prompts.PROMPT_TEMPLATE


class SalmonnModel(AudioLanguageModel):
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

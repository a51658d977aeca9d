"""A trained audio LLM of SpeechVerse's shape: a frozen speech encoder, the conv downsampler, an LLM with LoRA.

    waveform -> 30 s window -> Whisper / WavLM -> hidden states (S, 1, T, D) -> [weighted sum] -> conv blocks
             -> audio tokens (1, N, D_llm) -> prompt around them -> causal LM, or T5's encoder (+ its decoder)

A causal LM reads `[bos] before audio after` and continues it, like SALMONN; an encoder-decoder LM (T5, the
paper's Flan-T5) encodes `before audio after </s>` and its decoder writes the answer. Build it with
`salmonn_cli.train.composed_file.load_composed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import prompt as prompts
from ..llm import input_embeddings
from ..seq2seq import Seq2SeqEngine
from ..tokenizer import Tokenizer
from .downsampler import Downsampler
from .language import AudioLanguageModel
from .speech_encoder import SpeechEncoder

SEQ2SEQ_CONTEXT = 4096  # T5's positions are relative: no table limits them; this bounds a whole-file prompt


@dataclass(frozen=True)
class ComposedSettings:
    """What the model needs besides its weights."""

    seq2seq: bool  # an encoder-decoder LLM (T5)
    trained_lora_scale: float
    prompt_template: str


class ComposedModel(AudioLanguageModel):
    def __init__(self, *, encoder: SpeechEncoder, connector: Downsampler, llm, tokenizer: Tokenizer,
                 settings: ComposedSettings) -> None:  # fmt: skip
        super().__init__()
        self.encoder, self.connector, self.llm = encoder, connector, llm
        self.tokenizer, self.settings = tokenizer, settings
        self._engine = Seq2SeqEngine(llm) if settings.seq2seq else None

    @property
    def device(self) -> torch.device:
        return self.connector.blocks[0].conv.weight.device

    @property
    def context_length(self) -> int:
        config = self.llm.config
        return SEQ2SEQ_CONTEXT if self.settings.seq2seq else config.max_position_embeddings

    # -- audio -> tokens ---------------------------------------------------------------------------------
    def encode(self, waveform: np.ndarray) -> torch.Tensor:
        """Every hidden state of the encoder on one clip's window: (S, 1, T, D)."""
        return self.encoder(self.encoder.inputs(waveform))

    @torch.inference_mode()
    def audio_tokens(self, waveform: np.ndarray) -> torch.Tensor:
        """Audio tokens for the first 30 s of a 16 kHz mono float32 waveform: (1, N, llm_hidden)."""
        return self.connector(self.encode(waveform))

    @torch.inference_mode()
    def audio_tokens_batch(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, N, D); row i equals `audio_tokens(waveforms[i])` (every window is 30 s: no padding differs)."""
        states = self.encoder(torch.cat([self.encoder.inputs(w) for w in waveforms]))
        return self.connector(states)

    # -- LLM inputs --------------------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return None if self.settings.seq2seq else super().bos_token_id

    def assemble(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """A causal LM's `[bos] + pieces`; T5's encoder input `pieces + [</s>]`, as its tokenizer ends a text."""
        if not self.settings.seq2seq:
            return super().assemble(pieces)
        table = input_embeddings(self.llm)
        eos = prompts.embed_ids(table, (self.tokenizer.eos_token_id,), pieces[0].device)
        return torch.cat([p.to(table.weight.dtype) for p in pieces] + [eos], dim=1)

    def decode_engine(self):
        return self._engine if self._engine is not None else self.llm

"""A `DecodeEngine` over an encoder-decoder LM (T5, Flan-T5): the prompt is encoded once, the decoder steps.

The decode loops of generate.py and beam.py drive it exactly as they drive `LlamaEngine`, so greedy, sampling
and beam search mean the same for both kinds of LLM. The decoder starts from `decoder_start_token_id` (T5's pad),
which is also the placeholder the loops count (transformers 4.28 started encoder-decoder generation from it).
The model's own forward does the work, with transformers' `EncoderDecoderCache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .engine import cache_keyword


class Seq2SeqEngine:
    """`DecodeEngine` over a Hugging Face encoder-decoder LM (`lm`: the model, or peft's wrapper around it)."""

    def __init__(self, lm: Any) -> None:
        self.base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft keeps the modules in place
        self.start_id = int(self.base.config.decoder_start_token_id)
        self._keyword = cache_keyword(type(self.base))  # `cache` from transformers 5.2x, `past_key_values` before
        self._encoded: torch.Tensor | None = None
        self._cache = None

    def start(self, inputs_embeds: torch.Tensor, beams: int, max_new_tokens: int) -> torch.Tensor:
        from transformers import DynamicCache, EncoderDecoderCache

        encoded = self.base.get_encoder()(inputs_embeds=inputs_embeds).last_hidden_state  # (B, T, D)
        self._encoded = encoded.repeat_interleave(beams, dim=0)  # (B * beams, T, D)
        self._cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        first = torch.full((self._encoded.shape[0],), self.start_id, dtype=torch.long, device=encoded.device)
        return self._decode(first)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._decode(tokens)

    def reorder(self, sources: Sequence[int]) -> None:
        # Beams of one prompt share its encoder output, so only the decoder's cache moves (the cross-attention
        # keys of a row's beams are equal: reordering them too is harmless).
        rows = torch.tensor(sources, device=self._encoded.device)
        self._cache.reorder_cache(rows)
        self._encoded = self._encoded.index_select(0, rows)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = {self._keyword: self._cache}  # filled in place by every decoder layer
        out = self.base(encoder_outputs=(self._encoded,), decoder_input_ids=tokens[:, None], use_cache=True, **cache)
        return out.logits[:, -1, :]

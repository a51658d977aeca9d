"""A stand-in tokenizer for random-weight models: one id per word or punctuation mark.

Timing needs token ids that exist in the LLM's table and prompts about as long as LLaMA's tokenizer makes
them (the transcribe prompt is 10 ids here, 12 with LLaMA's SentencePiece); the text of an answer from
random weights means nothing, so decoding returns a placeholder.
"""

from __future__ import annotations

import re
import zlib

from salmonn_cli.generate import LLAMA_BOS, LLAMA_EOS, LLAMA_PAD

_PIECES = re.compile(r"\w+|[^\w\s]")
_FIRST_ID = 3  # 0-2 are unk (pad), bos and eos


class WordCodec:
    """`Tokenizer` with stable ids in [3, vocab): crc32 of each word or punctuation mark."""

    bos_token_id, eos_token_id, pad_token_id = LLAMA_BOS, LLAMA_EOS, LLAMA_PAD

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def encode(self, text: str) -> tuple[int, ...]:
        span = self.vocab - _FIRST_ID
        return tuple(_FIRST_ID + zlib.crc32(piece.encode()) % span for piece in _PIECES.findall(text))

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        return f"<{len(ids)} tokens>"

    def __len__(self) -> int:
        return self.vocab

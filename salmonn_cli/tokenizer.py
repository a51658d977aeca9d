"""Text <-> token ids exactly as the original's LLaMA tokenizer (transformers 4.28, SentencePiece) did.

transformers 5 tokenizes LLaMA with the `tokenizers` library, which differs from SentencePiece on leading or
repeated spaces and decodes invalid UTF-8 byte pieces differently. The reference ids and texts were made
with SentencePiece, so that is what we use when the folder has `tokenizer.model`; a folder with only a
`tokenizer.json` falls back to transformers' tokenizer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from .errors import CheckpointError


class Tokenizer(Protocol):
    """Text <-> LLaMA token ids, plus the special ids the decoder and the prompt need."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int  # LLaMA has no pad token: <unk>, as its generation config says; fed only to finished rows

    def encode(self, text: str) -> tuple[int, ...]: ...

    def decode(self, ids: list[int] | tuple[int, ...]) -> str: ...


class SentencePieceText:
    """4.28's slow LlamaTokenizer: split the text at special-token strings (no stripping around them), encode
    each piece with SentencePiece (dummy prefix included), never add bos/eos; decode with specials skipped."""

    def __init__(self, model_file: Path) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        ids = [i for i in (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()) if i >= 0]
        self._special = {self._sp.id_to_piece(i): i for i in ids}
        pieces = sorted(self._special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(p) for p in pieces) + ")")
        self.bos_token_id = self._sp.bos_id()
        self.eos_token_id = self._sp.eos_id()
        self.pad_token_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else max(self._sp.unk_id(), 0)

    def encode(self, text: str) -> tuple[int, ...]:
        ids: list[int] = []
        for chunk in self._split.split(text):
            if chunk in self._special:
                ids.append(self._special[chunk])
            elif chunk:
                ids.extend(self._sp.encode(chunk))
        return tuple(ids)

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        specials = set(self._special.values())
        return self._sp.decode([int(i) for i in ids if int(i) not in specials])

    def __len__(self) -> int:
        return self._sp.get_piece_size()


class HuggingFaceText:
    """Fallback for folders without `tokenizer.model`: transformers' tokenizer, no special tokens added."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(folder))
        self.bos_token_id = self._tok.bos_token_id
        self.eos_token_id = self._tok.eos_token_id
        pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else self._tok.unk_token_id
        self.pad_token_id = pad if pad is not None else 0

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self._tok(text, add_special_tokens=False).input_ids)

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __len__(self) -> int:
        return len(self._tok)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of an HF LLaMA folder, as the original used it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError("LLM folder not found", path=folder)
    try:
        if (folder / "tokenizer.model").is_file():
            return SentencePieceText(folder / "tokenizer.model")
        return HuggingFaceText(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the tokenizer: {exc}", path=folder) from None

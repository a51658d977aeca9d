"""Prompt text and LLM input assembly: the one owner of the template and the task instructions.

The original wraps an instruction as `USER: <Speech><SpeechHere></Speech> {instruction}\\nASSISTANT:`, splits it
at `<SpeechHere>` and tokenises each half SEPARATELY without special tokens (so the second half starts with
SentencePiece's dummy-prefix space), then feeds `[bos] + before + audio tokens + after` as embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .tokenizer import Tokenizer

PROMPT_TEMPLATE = "USER: {}\nASSISTANT:"
AUDIO_PLACEHOLDER = "<SpeechHere>"
AUDIO_SLOT = "<Speech><SpeechHere></Speech>"
END_SYMBOL = "</s>"  # appended to training targets; the tokenizer reads it as the eos id
IGNORE_INDEX = -100  # label value the loss skips
MAX_TARGET_TOKENS = 300  # the original's max_txt_len: a training target is cut to this many tokens

# The original test prompts (prompts/test_prompt.json), by task.
TASK_INSTRUCTIONS: dict[str, str] = {
    "transcribe": "Recognize the speech and give me the transcription.",
    "transcribe_zh": "请将语音中的内容写下来。",
    "transcribe_de": "Hören Sie sich die Rede an und schreiben Sie ihren Inhalt auf.",
    "translate": "Listen to the speech and translate it into {language}.",
    "caption": "Please describe the audio.",
    "music": "Listen to this music clip and describe the music.",
    "story": "Based on the audio, write a story in detail. Your story should be highly related to the audio.",
    "emotion": "Describe the emotion of the speaker in one word.",
    "speaker_check": "Do you only hear the same person talking? Answer yes or no.",
    "speech_and_background": "Describe the speech and the background audio",
    "co_reasoning": (
        "Use your strong reasoning skills to answer the speaker's question in detail based on the background sound."
    ),
    "lyrics": "Listen to the song and write down its content.",
    "keywords": "Give me only three keywords of the text.",
    # from the original's training prompts (prompts/train_prompt.json), for tasks its test prompts lack
    "phonemes": "Write the sequence of phonemes corresponding to this speech.",
    "two_speakers": "There are two people talking in the audio, please write what they say in order.",
    "spoken_question": "There is a question in the speech. Please answer it in detail.",
}


def template_problem(template: str) -> str | None:
    """What is wrong with a chat template, or None: it needs exactly one `{}`, where the audio and instruction go."""
    if template.count("{}") != 1:
        return f"a prompt template needs exactly one '{{}}' for the instruction; got {template!r}"
    return None


def full_prompt(instruction: str, template: str = PROMPT_TEMPLATE) -> str:
    """The whole prompt text for an instruction as a user types it (surrounding whitespace stripped)."""
    return template.format(f"{AUDIO_SLOT} {instruction.strip()}")


@dataclass(frozen=True)
class PromptIds:
    """Token ids of the prompt text before and after the audio tokens."""

    before: tuple[int, ...]
    after: tuple[int, ...]


def prompt_ids(tokenizer: "Tokenizer", instruction: str, template: str = PROMPT_TEMPLATE) -> PromptIds:
    """Tokenise the two halves of the prompt separately, as the original does."""
    before, after = full_prompt(instruction, template).split(AUDIO_PLACEHOLDER)
    return PromptIds(tokenizer.encode(before), tokenizer.encode(after))


def target_ids(tokenizer: "Tokenizer", target_text: str, max_txt_len: int) -> tuple[int, ...]:
    """Training target: text + `</s>`, cut to `max_txt_len` tokens (the cut may drop the `</s>`, as in the original)."""
    return tokenizer.encode(target_text + END_SYMBOL)[:max_txt_len]


def embed_ids(table: "nn.Module", ids: tuple[int, ...], device: "torch.device") -> "torch.Tensor":
    """Token ids -> their embeddings from `table`: (1, n, D)."""
    import torch

    return table(torch.tensor([ids], dtype=torch.long, device=device))  # (1, n, D)


def assemble_inputs(table: "nn.Module", ids: PromptIds, audio_tokens: "torch.Tensor", bos_id: int) -> "torch.Tensor":
    """`[embed(bos), embed(before), audio tokens, embed(after)]`: (1, 1 + Nb + A + Na, D)."""
    import torch

    device = audio_tokens.device
    parts = [embed_ids(table, (bos_id,), device), embed_ids(table, ids.before, device)]
    parts += [audio_tokens.to(parts[0].dtype), embed_ids(table, ids.after, device)]
    return torch.cat(parts, dim=1)


def assemble_training(
    table: "nn.Module", ids: PromptIds, audio_tokens: "torch.Tensor", bos_id: int, targets: tuple[int, ...]
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Inputs with the target appended, and labels that mask everything before the target: (1, T, D), (1, T)."""
    import torch

    prompt = assemble_inputs(table, ids, audio_tokens, bos_id)  # (1, P, D)
    embeds = torch.cat([prompt, embed_ids(table, targets, prompt.device)], dim=1)
    labels = torch.full((1, embeds.shape[1]), IGNORE_INDEX, dtype=torch.long, device=prompt.device)
    labels[0, prompt.shape[1] :] = torch.tensor(targets, dtype=torch.long)
    return embeds, labels


# Transcription has a trained prompt per language; `auto` lets the model hear the language itself.
TRANSCRIBE_BY_LANGUAGE = {
    "en": TASK_INSTRUCTIONS["transcribe"],
    "auto": TASK_INSTRUCTIONS["transcribe"],
    "zh": TASK_INSTRUCTIONS["transcribe_zh"],
    "de": TASK_INSTRUCTIONS["transcribe_de"],
}
LANGUAGE_NAMES = {
    "ar": "Arabic", "de": "German", "en": "English", "es": "Spanish", "fr": "French", "hi": "Hindi",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pl": "Polish", "pt": "Portuguese",
    "ru": "Russian", "sv": "Swedish", "tr": "Turkish", "uk": "Ukrainian", "zh": "Chinese",
}  # fmt: skip


def transcribe_instruction(language: str) -> str:
    """The original's transcription prompt for `language` (en, zh, de or auto)."""
    key = language.strip().lower()
    if key not in TRANSCRIBE_BY_LANGUAGE:
        known = ", ".join(TRANSCRIBE_BY_LANGUAGE)
        raise UsageError(f"no transcription prompt for language {language!r}: use --lang {known}, or --instruction")
    return TRANSCRIBE_BY_LANGUAGE[key]


def translate_instruction(language: str) -> str:
    """The paper's translation prompt; `language` is a name ("German") or a two-letter code ("de")."""
    name = language.strip()
    if not name:
        raise UsageError("--to needs a language, e.g. --to German")
    name = LANGUAGE_NAMES.get(name.lower(), name[:1].upper() + name[1:])
    return TASK_INSTRUCTIONS["translate"].format(language=name)

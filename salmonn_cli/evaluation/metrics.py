"""Scores of answers against references, computed by the libraries the field reports with: jiwer for error
rates (after Whisper's text normalisers), sacrebleu for BLEU. Captions (METEOR, CIDEr-D, SPICE) are in
evaluation.captions. Every scorer returns corpus scores and one row of item scores per answer."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from ..errors import DependencyError, UsageError
from .tasks import CHARACTER_LANGUAGES

# SALMONN's answers may keep the LLM's sentence markers; they are never part of what was said.
_SENTENCE_MARKERS = re.compile(r"</?s>")
_YES_NO = ("yes", "no")


@dataclass(frozen=True)
class Score:
    """One corpus-level result, at the scale the paper reports it."""

    metric: str
    value: float | None  # None: not computed, and `note` says why
    count: int  # answers it is computed over
    unit: str  # "%", "BLEU", "x100" or "fraction"
    higher_is_better: bool
    signature: str | None = None  # the library's own description of what it computed (sacrebleu's signature)
    note: str | None = None


@dataclass(frozen=True)
class Scored:
    """What a scorer found: the corpus scores, and for each answer its own scores and normalised texts."""

    scores: tuple[Score, ...]
    items: tuple[dict, ...] = field(default_factory=tuple)


def clean_answer(text: str) -> str:
    """An answer without the LLM's `<s>` / `</s>` markers."""
    return _SENTENCE_MARKERS.sub(" ", text).strip()


@lru_cache(maxsize=None)
def _normalizers():
    try:
        from whisper_normalizer.basic import BasicTextNormalizer
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError:
        raise DependencyError(eval_extra_hint("Whisper's text normalisers (whisper-normalizer)")) from None
    return EnglishTextNormalizer(), BasicTextNormalizer()


def eval_extra_hint(what: str) -> str:
    return f"scoring needs {what}: pip install 'salmonn-cli[eval]' (from a checkout: pip install -e '.[eval]')"


def require_libraries(scoring: str) -> None:
    """Refuse, before any model loads, a scoring whose libraries are not installed (captions: see captions)."""
    if scoring in ("words", "label", "yes_no", "contains"):
        _normalizers()
    if scoring in ("words", "phones"):
        _jiwer()


def normalize_words(text: str, language: str) -> str:
    """Text as error rates compare it: Whisper's English normaliser for English (spelling, numbers,
    contractions, fillers), its basic one (case and punctuation) for other languages; characters without spaces
    for languages written without them."""
    english, basic = _normalizers()
    if language in CHARACTER_LANGUAGES:
        return "".join(basic(text).split())
    return english(text) if language == "en" else " ".join(basic(text).split())


def _jiwer():
    try:
        import jiwer
    except ImportError:
        raise DependencyError(eval_extra_hint("jiwer")) from None
    return jiwer


def error_rate(references: Sequence[str], hypotheses: Sequence[str], language: str) -> Scored:
    """Corpus WER (CER for languages written without spaces): all errors over all reference words, as jiwer
    counts them when given the lists, not a mean of per-answer rates."""
    jiwer = _jiwer()
    by_character = language in CHARACTER_LANGUAGES
    metric = "CER" if by_character else "WER"
    refs = [normalize_words(r, language) for r in references]
    hyps = [normalize_words(clean_answer(h), language) for h in hypotheses]
    measure = jiwer.cer if by_character else jiwer.wer
    items = tuple({"scores": {metric: _item_rate(measure, r, h)}, "normalized": {"reference": r, "hypothesis": h}}
                  for r, h in zip(refs, hyps, strict=True))  # fmt: skip
    normaliser = "Whisper BasicTextNormalizer" if language != "en" else "Whisper EnglishTextNormalizer"
    how = f"jiwer {jiwer_version()} {'cer' if by_character else 'wer'}, {normaliser}, language {language}"
    if not any(refs):
        return Scored((Score(metric, None, len(refs), "%", False, how, "every reference is empty"),), items)
    value = 100 * measure(refs, hyps)
    return Scored((Score(metric, round(value, 4), len(refs), "%", False, how),), items)


def phone_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> Scored:
    """PER: jiwer's WER over space-separated phones, compared in lower case without punctuation marks."""
    jiwer = _jiwer()
    refs = [_phones(r) for r in references]
    hyps = [_phones(clean_answer(h)) for h in hypotheses]
    items = tuple({"scores": {"PER": _item_rate(jiwer.wer, r, h)}, "normalized": {"reference": r, "hypothesis": h}}
                  for r, h in zip(refs, hyps, strict=True))  # fmt: skip
    how = f"jiwer {jiwer_version()} wer over phones"
    if not any(refs):
        return Scored((Score("PER", None, len(refs), "%", False, how, "every reference is empty"),), items)
    return Scored((Score("PER", round(100 * jiwer.wer(refs, hyps), 4), len(refs), "%", False, how),), items)


def _phones(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _item_rate(measure, reference: str, hypothesis: str) -> float | None:
    """One answer's rate in %, or None where its reference is empty (the rate is undefined; the corpus counts
    its insertions all the same)."""
    return round(100 * measure(reference, hypothesis), 4) if reference else None


def jiwer_version() -> str:
    from importlib.metadata import version

    return version("jiwer")


# sacrebleu's tokeniser by target language; the others use its default, 13a.
BLEU_TOKENIZERS = {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}


def bleu_tokenizer(target: str | None, chosen: str | None) -> str:
    """The tokeniser BLEU uses: the user's, or the one sacrebleu documents for the target language."""
    if chosen:
        return chosen
    return BLEU_TOKENIZERS.get((target or "").lower(), "13a")


def check_bleu_tokenizer(tokenize: str) -> None:
    """Refuse a tokeniser sacrebleu lacks, or one whose own libraries are missing, before any model loads."""
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        raise DependencyError(eval_extra_hint("sacrebleu")) from None
    if tokenize not in BLEU.TOKENIZERS:
        raise UsageError(f"unknown --bleu-tokenize {tokenize!r}: sacrebleu has {', '.join(BLEU.TOKENIZERS)}")
    try:
        BLEU(tokenize=tokenize)
    except (ImportError, RuntimeError) as exc:  # ja-mecab / ko-mecab without their dictionaries
        raise DependencyError(f"BLEU with sacrebleu's {tokenize} tokeniser needs its extra libraries "
                              f"(pip install 'sacrebleu[ja]' or 'sacrebleu[ko]'): {exc}") from None  # fmt: skip


def bleu(references: Sequence[Sequence[str]], hypotheses: Sequence[str], tokenize: str) -> Scored:
    """Corpus BLEU-4 with sacrebleu, and each answer's sentence BLEU (effective order, as sacrebleu advises)."""
    from sacrebleu.metrics import BLEU

    hyps = [clean_answer(h) for h in hypotheses]
    most = max(len(r) for r in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(most)]
    corpus = BLEU(tokenize=tokenize)
    value = corpus.corpus_score(hyps, streams).score
    sentence = BLEU(tokenize=tokenize, effective_order=True)
    items = tuple({"scores": {"BLEU-4": round(sentence.sentence_score(h, list(r)).score, 4)}}
                  for h, r in zip(hyps, references, strict=True))  # fmt: skip
    signature = str(corpus.get_signature())
    return Scored((Score("BLEU-4", round(value, 4), len(hyps), "BLEU", True, signature),), items)


def _closed(text: str) -> str:
    """A closed answer as compared: Whisper's basic normaliser (case, punctuation), words single-spaced."""
    _, basic = _normalizers()
    return " ".join(basic(clean_answer(text)).split())


def _found(phrase: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


def label_accuracy(references: Sequence[str], hypotheses: Sequence[str]) -> Scored:
    """Accuracy over a closed label set (the distinct references): an answer names a label when it is that label
    or names exactly one of them as a word; the following rate is the share of answers that name one."""
    refs = [_closed(r) for r in references]
    labels = sorted(set(refs))
    items = []
    for ref, hyp in zip(refs, (_closed(h) for h in hypotheses), strict=True):
        named = [label for label in labels if _found(label, hyp)]
        predicted = hyp if hyp in labels else (named[0] if len(named) == 1 else None)
        items.append({"scores": {"Accuracy": float(predicted == ref)}, "predicted": predicted,
                      "normalized": {"reference": ref, "hypothesis": hyp}})  # fmt: skip
    how = f"labels: {', '.join(labels)}"
    return Scored(_accuracy_scores(items, how), tuple(items))


def yes_no_accuracy(references: Sequence[str], hypotheses: Sequence[str]) -> Scored:
    """Accuracy of yes/no answers (references checked by `check_yes_no`): the answer's first "yes" or "no" word
    is its verdict."""
    items = []
    for ref, hyp in zip((_closed(r) for r in references), (_closed(h) for h in hypotheses), strict=True):
        predicted = next((word for word in hyp.split() if word in _YES_NO), None)
        items.append({"scores": {"Accuracy": float(predicted == ref)}, "predicted": predicted,
                      "normalized": {"reference": ref, "hypothesis": hyp}})  # fmt: skip
    return Scored(_accuracy_scores(items, "the first yes or no in the answer"), tuple(items))


def check_yes_no(references: Sequence[str]) -> None:
    bad = next((r for r in references if _closed(r) not in _YES_NO), None)
    if bad is not None:
        raise UsageError(f'--task sv needs each reference to be "yes" or "no"; got {bad!r}')


def contains_accuracy(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> Scored:
    """Accuracy of free answers: right when any reference answer appears in it (normalised, as whole words)."""
    items = []
    for refs, hyp in zip(references, (_closed(h) for h in hypotheses), strict=True):
        normalized = [_closed(r) for r in refs]
        right = any(r and _found(r, hyp) for r in normalized)
        items.append({"scores": {"Accuracy": float(right)},
                      "normalized": {"references": normalized, "hypothesis": hyp}})  # fmt: skip
    count = len(items)
    value = sum(i["scores"]["Accuracy"] for i in items) / count
    how = "a reference answer appears in the answer"
    return Scored((Score("Accuracy", round(value, 4), count, "fraction", True, how),), tuple(items))


def _accuracy_scores(items: list[dict], how: str) -> tuple[Score, ...]:
    count = len(items)
    right = sum(i["scores"]["Accuracy"] for i in items)
    following = sum(i["predicted"] is not None for i in items)
    return (
        Score("Accuracy", round(right / count, 4), count, "fraction", True, how),
        Score("Following rate", round(following / count, 4), count, "fraction", True,
              "answers that give one of the labels"),
    )  # fmt: skip

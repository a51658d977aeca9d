"""What `salmonn eval` can score: each task's instruction, how its answers are scored, and the paper's figures.

The figures are SALMONN-13B's in Tang et al. (ICLR 2024, Table 3). Only the LibriSpeech ASR ones were checked
against a second source of the table; the rest come from one secondary reading each, and say so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UsageError
from ..prompt import TASK_INSTRUCTIONS, transcribe_instruction, translate_instruction

# How a task's answers are scored (evaluation.metrics has one scorer per kind).
ScoringKind = Literal["words", "phones", "bleu", "captions", "music_captions", "label", "yes_no", "contains"]


@dataclass(frozen=True)
class EvalTask:
    """One task `salmonn eval --task` takes."""

    name: str
    what: str  # a line for --list
    command: str  # the task command whose long-audio handling it shares (cli.tasks.longform_settings)
    scoring: ScoringKind
    metrics: tuple[str, ...]  # what --list promises (the scorer says what it could compute)
    instruction: str | None = None  # None: made from each item's language (asr) or target (ast)
    whole: bool = False  # one answer about the whole clip, never one per segment (closed answers)

    def instruction_for(self, language: str, target: str | None) -> str:
        """The instruction the model gets for an item in `language`, translated to `target` (ast)."""
        if self.instruction is not None:
            return self.instruction
        if self.scoring == "bleu":
            if not target:
                raise UsageError('--task ast needs a target language: a "target" in each manifest line, or --to')
            return translate_instruction(target)
        return transcribe_instruction(language)


TASKS: dict[str, EvalTask] = {
    task.name: task
    for task in (
        EvalTask("asr", "speech recognition", "transcribe", "words", ("WER", "CER (zh, ja, ko, yue, th)")),
        EvalTask("osr", "overlapped speech recognition (two talkers)", "transcribe", "words", ("WER",),
                 TASK_INSTRUCTIONS["two_speakers"]),
        EvalTask("pr", "phone recognition", "transcribe", "phones", ("PER",), TASK_INSTRUCTIONS["phonemes"]),
        EvalTask("ast", "speech translation", "translate", "bleu", ("BLEU-4",)),
        EvalTask("aac", "audio captioning", "caption", "captions", ("METEOR", "CIDEr-D", "SPICE", "SPIDEr"),
                 TASK_INSTRUCTIONS["caption"]),
        EvalTask("music", "music captioning", "music", "music_captions", ("BLEU-4", "ROUGE-L"),
                 TASK_INSTRUCTIONS["music"]),
        EvalTask("er", "emotion recognition", "ask", "label", ("Accuracy", "Following rate"),
                 TASK_INSTRUCTIONS["emotion"], whole=True),
        EvalTask("sv", "speaker verification (one speaker or two?)", "ask", "yes_no", ("Accuracy", "Following rate"),
                 TASK_INSTRUCTIONS["speaker_check"], whole=True),
        EvalTask("sqqa", "spoken-query question answering", "ask", "contains", ("Accuracy",),
                 TASK_INSTRUCTIONS["spoken_question"], whole=True),
    )
}  # fmt: skip

# The languages scored by characters: their text has no spaces between words.
CHARACTER_LANGUAGES = frozenset({"zh", "ja", "ko", "yue", "th"})


@dataclass(frozen=True)
class PaperFigure:
    """One of SALMONN-13B's published results."""

    test_set: str  # what --paper takes
    task: str
    metric: str
    value: float  # at the paper's scale (WER in %, accuracy as a fraction)
    confirmed: bool  # seen in two independent readings of the paper's table
    note: str = ""


PAPER_FIGURES: tuple[PaperFigure, ...] = (
    PaperFigure("librispeech-test-clean", "asr", "WER", 2.1, True),
    PaperFigure("librispeech-test-other", "asr", "WER", 4.9, True),
    PaperFigure("gigaspeech-test", "asr", "WER", 10.0, False),
    PaperFigure("covost2-en-zh", "ast", "BLEU-4", 33.1, False),
    PaperFigure("covost2-en-de", "ast", "BLEU-4", 18.6, False),
    PaperFigure("covost2-en-ja", "ast", "BLEU-4", 22.7, False),
    PaperFigure("audiocaps-test", "aac", "METEOR", 24.0, False),
    PaperFigure("audiocaps-test", "aac", "SPIDEr", 40.3, False),
    PaperFigure("musiccaps", "music", "BLEU-4", 5.5, False),
    PaperFigure("musiccaps", "music", "ROUGE-L", 21.8, False),
    PaperFigure("librispeech-test-clean", "pr", "PER", 4.2, False, "another reading gives 17.6"),
    PaperFigure("librimix", "osr", "WER", 23.0, False, "another reading gives about 34"),
    PaperFigure("iemocap-session5", "er", "Accuracy", 0.69, False),
    PaperFigure("voxceleb1", "sv", "Accuracy", 0.94, False),
    PaperFigure("wikiqa-tts", "sqqa", "Accuracy", 0.41, False, "the paper's answers were judged, not matched"),
)


def eval_task(name: str) -> EvalTask:
    if name not in TASKS:
        raise UsageError(f"unknown --task {name!r}: use one of {', '.join(TASKS)} (salmonn eval --list)")
    return TASKS[name]


def paper_figures(task: EvalTask, test_set: str | None) -> tuple[PaperFigure, ...]:
    """The paper's figures for `task` on `test_set` (none when no test set is named); an unknown one is refused."""
    if test_set is None:
        return ()
    figures = tuple(f for f in PAPER_FIGURES if f.task == task.name and f.test_set == test_set)
    if not figures:
        known = sorted({f.test_set for f in PAPER_FIGURES if f.task == task.name})
        hint = f"for --task {task.name}: {', '.join(known)}" if known else f"the paper has none for {task.name}"
        raise UsageError(f"no paper figure for --paper {test_set!r} {hint}")
    return figures

"""Few-shot training data: a jsonl file, one example per line, validated whole before anything is loaded.

    {"audio": "clips/a.wav", "instruction": "Describe the audio in detail.", "response": "A dog barks ..."}
    {"audio": "clips/b.flac", "task": "story", "response": "Once upon a time ..."}

`audio` is relative to the jsonl file (or absolute); `task` names an instruction preset instead of spelling it
out. Every bad line is reported with its line number and reason, all at once, and nothing trains while any
line is bad. Imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import AudioError, UsageError
from ..prompt import END_SYMBOL, MAX_TARGET_TOKENS, TASK_INSTRUCTIONS

# Presets a data line may name: those whose instruction is complete (translate needs a language filled in).
TASK_PRESETS: dict[str, str] = {k: v for k, v in TASK_INSTRUCTIONS.items() if "{" not in v}


@dataclass(frozen=True)
class FewShotExample:
    """One training example: the audio file, the instruction the model is asked, the answer it should give."""

    audio: Path  # resolved: absolute, or relative to the working directory
    instruction: str
    response: str
    source: Path  # the jsonl file it came from
    line: int  # 1-based line number in `source`


@dataclass(frozen=True)
class BadLine:
    """Why one line of a data file cannot be used."""

    source: Path
    line: int
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else str(self.source)  # line 0: the file as a whole
        return f"{where}: {self.reason}"


class DataError(UsageError):
    """The training data has bad lines; all of them are listed. A UsageError (exit 2): like a bad option value,
    it is the user's input that is wrong, and the fix is to edit it, not to install or download anything."""

    def __init__(self, problems: Sequence[BadLine | str]) -> None:
        self.problems = tuple(problems)
        lines = [str(p) for p in self.problems]
        head = f"{len(lines)} problem(s) in the training data; nothing was trained:"
        super().__init__("\n".join([head, *(f"  {line}" for line in lines)]))


@dataclass(frozen=True)
class FewShotData:
    """Validated training (and validation) examples and the hashes that identify them."""

    train: tuple[FewShotExample, ...]
    val: tuple[FewShotExample, ...]
    train_sha256: str
    val_sha256: str | None


def check_line(text: str, source: Path, line: int, *, tokenizer=None, max_text_tokens: int = MAX_TARGET_TOKENS):
    """One jsonl line -> a FewShotExample, or a BadLine saying why not. `tokenizer` (a Tokenizer) checks length."""

    def bad(reason: str) -> BadLine:
        return BadLine(source, line, reason)

    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return bad(f"bad JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(record, dict):
        return bad(f"expected a JSON object, got {type(record).__name__}")
    for name in ("audio", "response"):
        if name not in record:
            return bad(f"missing field {name!r}")
        if not isinstance(record[name], str):
            return bad(f"field {name!r} must be a string")
    instruction, problem = _instruction(record)
    if problem:
        return bad(problem)
    response = record["response"].strip()
    if not response:
        return bad("empty response")
    audio = _audio_path(record["audio"], source)
    reason = _audio_problem(audio)
    if reason:
        return bad(reason)
    if tokenizer is not None:
        count = len(tokenizer.encode(response + END_SYMBOL))  # what the loss sees: the answer and its </s>
        if count > max_text_tokens:
            return bad(f"response is {count} tokens with </s>, over --max-text-tokens {max_text_tokens}")
    return FewShotExample(audio, instruction, response, source, line)


def _instruction(record: dict) -> tuple[str, str | None]:
    """(the record's instruction, None) or ("", why it has no usable one)."""
    has_instruction, has_task = "instruction" in record, "task" in record
    if has_instruction and has_task:
        return "", "give 'instruction' or 'task', not both"
    if not (has_instruction or has_task):
        return "", "missing field 'instruction' (or 'task')"
    name = "instruction" if has_instruction else "task"
    value = record[name]
    if not isinstance(value, str):
        return "", f"field {name!r} must be a string"
    if has_task:
        if value not in TASK_PRESETS:
            return "", f"unknown task {value!r}: use one of {', '.join(TASK_PRESETS)}, or 'instruction'"
        return TASK_PRESETS[value], None
    return (value.strip(), None) if value.strip() else ("", "empty instruction")


def _audio_path(value: str, source: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else source.parent / path


def _audio_problem(path: Path) -> str | None:
    """Why the audio cannot be used (missing, unreadable, empty, a pipe that training could read only once), or
    None. Decodes it, as training will."""
    from ..audio import load_audio
    from ..probe import probe_audio

    try:
        probe_audio(path)
        load_audio(path)
    except AudioError as exc:
        return str(exc)
    except UsageError as exc:  # e.g. a missing optional decoder: still this line's problem
        return str(exc)
    return None


def read_examples(
    path: str | Path, *, tokenizer=None, max_text_tokens: int = MAX_TARGET_TOKENS
) -> tuple[list[FewShotExample], list[BadLine]]:
    """All examples of a jsonl file and all its bad lines (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        return [], [BadLine(path, 0, "data file not found")]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [BadLine(path, 0, f"cannot read the data file ({exc.__class__.__name__}: {exc})")]
    examples: list[FewShotExample] = []
    problems: list[BadLine] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        checked = check_line(line, path, number, tokenizer=tokenizer, max_text_tokens=max_text_tokens)
        (problems if isinstance(checked, BadLine) else examples).append(checked)
    if not examples and not problems:
        problems.append(BadLine(path, 0, "no examples (the file is empty)"))
    return examples, problems


def data_sha256(examples: Sequence[FewShotExample]) -> str:
    """Identity of a data set: the audio bytes, instructions and responses, in order (not the jsonl layout)."""
    digest = hashlib.sha256()
    for ex in examples:
        audio = hashlib.sha256(ex.audio.read_bytes()).hexdigest()
        record = {"audio_sha256": audio, "instruction": ex.instruction, "response": ex.response}
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def split_validation(
    examples: Sequence[FewShotExample], fraction: float, seed: int
) -> tuple[tuple[FewShotExample, ...], tuple[FewShotExample, ...]]:
    """(train, val): a seeded random `fraction` of the examples held out (at least one), file order kept."""
    if fraction <= 0:
        return tuple(examples), ()
    if fraction >= 1:
        raise UsageError(f"--val-split must be below 1, got {fraction}")
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise UsageError(f"--val-split {fraction} leaves no training example out of {len(examples)}")
    held = set(random.Random(seed).sample(range(len(examples)), n_val))
    train = tuple(ex for i, ex in enumerate(examples) if i not in held)
    return train, tuple(ex for i, ex in enumerate(examples) if i in held)


def load_data(
    path: str | Path,
    *,
    tokenizer=None,
    max_text_tokens: int = MAX_TARGET_TOKENS,
    val_path: str | Path | None = None,
    val_split: float = 0.0,
    seed: int = 0,
) -> FewShotData:
    """Read and validate the training file (and the validation file); DataError listing every bad line."""
    if val_path is not None and val_split > 0:
        raise UsageError("use --val-split or --val, not both")
    examples, problems = read_examples(path, tokenizer=tokenizer, max_text_tokens=max_text_tokens)
    val: tuple[FewShotExample, ...] = ()
    if val_path is not None:
        val_examples, val_problems = read_examples(val_path, tokenizer=tokenizer, max_text_tokens=max_text_tokens)
        problems += val_problems
        val = tuple(val_examples)
    if problems:
        raise DataError(problems)
    train = tuple(examples)
    if val_path is None:
        train, val = split_validation(examples, val_split, seed)
    return FewShotData(train, val, data_sha256(train), data_sha256(val) if val else None)

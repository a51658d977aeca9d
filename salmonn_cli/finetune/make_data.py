"""The paper's way to make activation data: ask the model itself, at a lowered LoRA scale (about 2.0, where
story-telling and detailed answers wake up), for long answers about the user's audio; review them; train on
them at the full scale 4.0 so it answers that way by default.

Writes jsonl lines `{"audio": <path relative to the output file>, "instruction": ..., "response": ...}`,
which `data.read_examples` accepts as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text_atomically
from ..decode_options import DecodeOptions
from ..errors import UsageError
from ..model_file import WAKE_UP_LORA_SCALE


@dataclass(frozen=True)
class MadeExample:
    """One generated example, before it is written."""

    audio: Path
    instruction: str
    response: str

    def record(self, relative_to: Path) -> dict:
        """The jsonl object, its audio path relative to the folder of the file it is written to."""
        audio = Path(os.path.relpath(self.audio.resolve(), relative_to.resolve()))
        return {"audio": audio.as_posix(), "instruction": self.instruction, "response": self.response}


def plan_inputs(files: Sequence[Path], n: int | None, sampling: bool) -> list[Path]:
    """The audio file of each example: the files in turn, `n` in all (default one per file).

    Asking about a file twice only gives a second answer when decoding samples.
    """
    if not files:
        raise UsageError("make-data needs at least one audio file")
    n = len(files) if n is None else n
    if n < 1:
        raise UsageError(f"-n must be >= 1, got {n}")
    if n > len(files) and not sampling:
        raise UsageError(
            f"-n {n} asks for more examples than the {len(files)} audio file(s): deterministic decoding would"
            " repeat the same answers; give more files, or sample with --temperature 0.8 (and --seed)"
        )
    return [Path(files[i % len(files)]) for i in range(n)]


def make_examples(
    model,
    files: Sequence[Path],
    instruction: str,
    options: DecodeOptions,
    *,
    lora_scale: float = WAKE_UP_LORA_SCALE,
    generator=None,
    on_example: Callable[[int, MadeExample | None, Path], None] | None = None,
) -> list[MadeExample]:
    """Generate one answer per entry of `files` (see `plan_inputs`); empty answers are skipped (reported as None)."""
    from ..audio import load_audio

    made: list[MadeExample] = []
    for i, path in enumerate(files):
        result = model.generate(load_audio(path), instruction, options, lora_scale=lora_scale, generator=generator)
        text = result.text.strip()
        example = MadeExample(Path(path), instruction, text) if text else None
        if example is not None:
            made.append(example)
        if on_example is not None:
            on_example(i, example, Path(path))
    return made


def write_examples(path: Path, examples: Sequence[MadeExample]) -> None:
    """Write the examples as jsonl, atomically; audio paths relative to the file's folder."""
    path = Path(path)
    lines = [json.dumps(ex.record(path.parent), ensure_ascii=False) for ex in examples]
    write_text_atomically(path, "".join(line + "\n" for line in lines))

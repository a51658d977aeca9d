"""What a training run tells the user: a live line on a terminal, one plain line per step otherwise (logs, CI)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console


@dataclass(frozen=True)
class StepLog:
    """One optimizer step as it is reported."""

    step: int  # 1-based, completed steps so far
    total: int
    loss: float  # mean over the step's forward passes
    lr: float  # the learning rate the step used
    tokens_per_s: float  # LLM positions (prompt + audio + answer) per second, forward and backward
    seconds: float
    gpu_memory_bytes: int | None  # peak allocated on the GPU so far; None on CPU

    def line(self) -> str:
        memory = f"  gpu {self.gpu_memory_bytes / 1024**3:.2f} GiB" if self.gpu_memory_bytes is not None else ""
        return (
            f"step {self.step}/{self.total}  loss {self.loss:.4f}  lr {self.lr:.3g}"
            f"  {self.tokens_per_s:.0f} tok/s  {self.seconds:.2f} s{memory}"
        )


class Reporter:
    """Prints a run's progress on stderr. On a terminal, a rich progress bar carries the latest step; evaluations,
    saves and messages are printed as lines above it. Elsewhere every step is its own line."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self._progress = None
        self._task = None

    def start(self, total: int, done: int) -> None:
        if not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=self.console, transient=True,
        )  # fmt: skip
        self._task = self._progress.add_task("train", total=total, completed=done, info="")
        self._progress.start()

    def step(self, log: StepLog) -> None:
        if self._progress is None:
            self.console.print(log.line())
            return
        info = log.line().split("  ", 1)[1]
        self._progress.update(self._task, completed=log.step, info=info)

    def message(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

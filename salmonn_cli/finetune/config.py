"""`FinetuneConfig`: every hyperparameter of a few-shot activation-tuning run, with defaults for ~12 examples.

Imports nothing heavy: the CLI builds and prints it before torch is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from quantize.spec import MODES as QUANT_MODES

from ..errors import UsageError
from ..prompt import MAX_TARGET_TOKENS

TRAIN_BACKENDS = ("auto", "bitsandbytes", "quanto")  # what QLoRA trains over; torchao is for inference

# Fields that change the numbers a run computes. A resumed run must agree with the saved one on all of them;
# the others (how often to save / evaluate) may change between the two halves of a run.
_SCHEDULE_FREE = frozenset({"save_every", "eval_every"})


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of one run. Steps are optimizer steps (each `batch_size * grad_accum` examples)."""

    # The original instruction-tunes at 3e-5 for tens of thousands of steps. A dozen examples give ~30 steps
    # here, and Adam moves each weight by about `lr` per step: at 3e-5 the published LoRA matrices (entries
    # ~1e-2) would move ~1e-3 in total, barely at all; 1e-4 moves them ~3e-3 (a fifth of their size), enough
    # to shift the answers' style in minutes without erasing what the adapter knows.
    lr: float = 1e-4
    epochs: int = 10  # 12 examples / (1 x 4) per step x 10 epochs = 30 optimizer steps
    steps: int | None = None  # optimizer steps; overrides `epochs` when set
    batch_size: int = 1  # examples per forward pass (padded to the longest); answers are long, memory is short
    grad_accum: int = 4  # forward passes per optimizer step: an effective batch of 4 without its memory
    warmup_ratio: float = 0.1  # share of the steps with a linear warm-up from 0, then cosine decay to 0
    warmup: int | None = None  # warm-up steps; overrides `warmup_ratio` when set (a recipe's stages say steps)
    max_grad_norm: float = 1.0  # clipping: the first steps on long unseen answers have large gradients
    # No decay by default: decoupled weight decay pulls the published LoRA matrices towards zero, i.e. towards
    # the base Vicuna without the adapter, which a few activation steps should not do.
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 10  # optimizer steps between saved training states (and one at the end)
    eval_every: int = 10  # optimizer steps between validation losses (and one at the end)
    quant: str = "4bit"  # the LLM's base weights: 4bit NF4 = QLoRA; 8bit; none
    quant_backend: str = "auto"  # auto = bitsandbytes (NF4/int8, the QLoRA standard) on CUDA and CPU
    train_connector: bool = False  # also train the Q-Former, LayerNorms, query tokens and projection
    max_text_tokens: int = MAX_TARGET_TOKENS  # responses longer than this are refused
    lora_scale: float | None = None  # None: the model's trained scaling, which inference uses by default
    lora_dropout: float = 0.1  # the original's LoRA dropout, active only while training
    processes: int = 1  # ranks sharing each step under a launcher, each with its own batch_size x grad_accum

    def __post_init__(self) -> None:
        problems = []
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"--lr must be > 0, got {self.lr}")
        for name in ("epochs", "batch_size", "grad_accum", "save_every", "eval_every", "max_text_tokens", "processes"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup is not None and self.warmup < 0:
            problems.append(f"warm-up steps must be >= 0, got {self.warmup}")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps must be >= 1, got {self.steps}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm <= 0 or self.weight_decay < 0 or not 0 <= self.lora_dropout < 1:
            problems.append("max_grad_norm must be > 0, weight_decay >= 0 and lora_dropout in [0, 1)")
        if self.lora_scale is not None and not (math.isfinite(self.lora_scale) and self.lora_scale >= 0):
            problems.append(f"--lora-scale must be >= 0 (0 turns LoRA off), got {self.lora_scale}")
        if self.quant not in QUANT_MODES:
            problems.append(f"--quant must be one of {', '.join(QUANT_MODES)} for training, got {self.quant!r}")
        if self.quant_backend not in TRAIN_BACKENDS:
            problems.append(
                f"--quant-backend must be one of {', '.join(TRAIN_BACKENDS)} for training (torchao's kernels are"
                f" for inference), got {self.quant_backend!r}"
            )
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps of the run for `n_train` training examples."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_train / self.examples_per_step))

    def warmup_steps(self, total: int) -> int:
        return self.warmup if self.warmup is not None else int(self.warmup_ratio * total)

    def as_dict(self) -> dict:
        return asdict(self)

    def differences(self, saved: dict) -> list[str]:
        """Fields that change the run's numbers and differ from a saved run's config (for `--resume`)."""
        return [  # a field a saved run predates had its default then
            f"{f.name} {saved.get(f.name, f.default)!r} -> {getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name not in _SCHEDULE_FREE and saved.get(f.name, f.default) != getattr(self, f.name)
        ]

    def describe(self, n_train: int) -> list[str]:
        """One line per hyperparameter, printed at the start of a run."""
        total = self.total_steps(n_train)
        lines = [f"{f.name} = {getattr(self, f.name)!r}" for f in fields(self)]
        lines.append(
            f"=> {total} optimizer steps of {self.examples_per_step} examples on {n_train} training examples"
            f" ({total * self.examples_per_step / max(n_train, 1):.1f} epochs), {self.warmup_steps(total)} warm-up"
        )
        return lines

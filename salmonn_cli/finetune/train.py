"""The training loop of few-shot activation tuning: setup -> fit, resumable.

setup: the LLM's base weights frozen (4-bit NF4 by default: QLoRA), encoders frozen in eval mode, the LoRA A/B
matrices trained (and the connector with `train_connector`), LoRA dropout on, gradient checkpointing on the LLM.
fit: AdamW, linear warm-up then cosine decay, gradient clipping, gradient accumulation, a data order fixed by
the seed. The state is saved every `save_every` steps and at the end, atomically; a run resumed from it on CPU
ends with exactly the weights of an uninterrupted run. Ctrl-C finishes the current forward pass, saves the
state of the last completed step and stops (a second Ctrl-C stops at once, keeping the last periodic save).

Under a launcher (`config.processes` ranks, salmonn_cli.distributed), every rank holds a replica and takes its
own examples of each step: step s's examples are those one process with `processes` times the batch would take,
dealt out in turn. After the backward passes the gradients are summed over the ranks (all_reduce, as DDP's
reducer does) weighted by each rank's answer tokens, so the step is that of the one large batch; rank 0 saves.
Ranks agree to stop at a step boundary (one small all_reduce per step), never half-way through one.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..distributed import ALONE, Ranks, summed
from ..errors import UsageError
from ..stop import note_terminated
from .config import FinetuneConfig
from .progress import Reporter, StepLog
from .state import capture_rng, restore_rng, save_state, trainable_tensors
from .target import TrainingTarget


def training_quantization(mode: str, backend: str = "auto"):
    """The `quantize.QuantSpec` to load a model for training with. `auto` means bitsandbytes on CUDA AND on CPU:
    NF4 is what QLoRA is, and on CPU it computes in float32, where quanto int4 would force bfloat16 activations
    (and gradients) for speed that inference needs but a few training steps do not."""
    from quantize import QuantSpec

    return QuantSpec.parse(mode, backend="bitsandbytes" if backend == "auto" else backend)


@dataclass(frozen=True)
class FitResult:
    """What a run did. `losses[i]` is step i+1's training loss; `val_losses` holds (step, loss) pairs."""

    steps_done: int
    total_steps: int
    losses: tuple[float, ...]
    val_losses: tuple[tuple[int, float], ...]
    wall_s: float  # summed over the sessions of a resumed run
    interrupted: bool = False

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def val_loss(self) -> float | None:
        return self.val_losses[-1][1] if self.val_losses else None


@dataclass
class _Progress:
    """The mutable part of a run (what a saved state restores besides tensors)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    val_losses: list[list] = field(default_factory=list)
    wall_s: float = 0.0


class Trainer:
    """One training run of `target` (what is trained and how a batch's loss is computed: a `TrainingTarget`) on
    `train` (and `val`) under `config`; `identity` is stored in every state."""

    def __init__(self, target: TrainingTarget, config: FinetuneConfig, train, val=(), *,
                 identity: dict | None = None, ranks: Ranks = ALONE) -> None:  # fmt: skip
        if not train:
            raise UsageError("no training examples")
        if config.processes != ranks.world:
            raise UsageError(f"the config is for {config.processes} processes, the launcher started {ranks.world}")
        self.target, self.config, self.ranks = target, config, ranks
        self.train_set, self.val_set = tuple(train), tuple(val)
        self.identity = dict(identity or {})
        self.total = config.total_steps(len(self.train_set))
        self.progress = _Progress()
        _seed_everything(config.seed)  # before the target draws its dropout masks, or a new part its weights
        self.params = target.prepare()
        target.train_mode()
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # fp16 LLM math on CUDA needs loss scaling for its gradients; float32 (CPU) and bfloat16 do not
        self.scaler = torch.amp.GradScaler(target.device.type, enabled=target.float16)
        self._boundary_rng = capture_rng()  # RNG state at the end of the last completed step

    def release(self) -> None:
        """Hand the model back as it was given: eval mode, nothing requiring grad (the target's own rules)."""
        self.target.release()

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up to the full rate over the warm-up steps, then cosine decay to 0 at the last step."""
        warmup = self.config.warmup_steps(self.total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        span = max(1, self.total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    # -- data ----------------------------------------------------------------------------------------------
    def order(self, position: int) -> int:
        """Index of the training example at `position` of the run's example stream: each epoch a permutation
        drawn from (seed, epoch) alone, so any position is known without replaying the run."""
        n = len(self.train_set)
        epoch, offset = divmod(position, n)
        return int(np.random.default_rng([self.config.seed, epoch]).permutation(n)[offset])

    # -- one step, evaluation ---------------------------------------------------------------------------------
    def train_step(self, stop) -> StepLog | None:
        """One optimizer step over `grad_accum` forward passes; None when `stop()` asked to stop before it ended."""
        config, step, ranks = self.config, self.progress.step, self.ranks
        started, losses, tokens, answer_tokens = time.perf_counter(), [], 0, 0
        per_step, per_pass = config.examples_per_step, config.batch_size * ranks.world
        lr = self.scheduler.get_last_lr()[0]
        if ranks.distributed and summed(ranks, [float(stop())])[0]:  # every rank stops here, or none does
            return None
        for micro in range(config.grad_accum):
            if not ranks.distributed and stop():
                self.optimizer.zero_grad(set_to_none=True)
                return None
            first = step * per_step + micro * per_pass + ranks.rank * config.batch_size
            batch = [self.train_set[self.order(p)] for p in range(first, first + config.batch_size)]
            loss, count, answered = self.target.batch_loss(batch)
            # alone: the mean of the passes' means, as before; in a job: each pass weighted by its answer tokens
            self.scaler.scale(loss * answered if ranks.distributed else loss / config.grad_accum).backward()
            losses.append(float(loss.detach()))
            tokens += count
            answer_tokens += answered
        if ranks.distributed:
            losses = [self._average_gradients(answer_tokens, losses)]
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        self.progress.losses.append(sum(losses) / len(losses))
        self._boundary_rng = capture_rng()
        seconds = time.perf_counter() - started
        device = self.target.device
        memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return StepLog(self.progress.step, self.total, self.progress.losses[-1], lr, tokens / seconds, seconds, memory)

    def _average_gradients(self, answer_tokens: int, losses: list[float]) -> float:
        """Sum every rank's token-weighted gradients and divide by all ranks' answer tokens: the gradient of the
        mean loss over the whole step's answers. Returns that mean loss (for the log)."""
        import torch.distributed as dist

        mean_loss = sum(losses) / len(losses)
        totals = summed(self.ranks, [float(answer_tokens), mean_loss * answer_tokens])
        for param in self.params.values():
            dist.all_reduce(param.grad)
            param.grad.div_(totals[0])
        return totals[1] / totals[0]

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the validation examples, dropout off (each example weighs the same)."""
        self.target.eval_mode()
        try:
            losses = [float(self.target.batch_loss([ex])[0]) for ex in self.val_set]  # the same on every rank
        finally:
            self.target.train_mode()
        return sum(losses) / len(losses)

    # -- state ---------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything a resumed run needs to continue exactly where this one is (at a step boundary)."""
        p = self.progress
        return {
            "step": p.step,
            "data_position": p.step * self.config.examples_per_step,  # examples consumed from the stream
            "trainable": trainable_tensors(self.params),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self._boundary_rng,
            "losses": list(p.losses),
            "val_losses": [list(v) for v in p.val_losses],
            "wall_s": p.wall_s,
            "config": self.config.as_dict(),
            "identity": self.identity,
        }

    def load(self, state: dict) -> None:
        """Continue from a saved state; it must come from the same config, data and base model."""
        changed = self.config.differences(state["config"])
        changed += [f"{k} {v!r} -> {self.identity.get(k)!r}" for k, v in state["identity"].items()
                    if self.identity.get(k) != v]  # fmt: skip
        if changed:
            raise UsageError(f"cannot resume: the run was started with other settings ({'; '.join(changed)})")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self._boundary_rng = state["rng"]
        restore_rng(state["rng"])
        self.progress = _Progress(state["step"], list(state["losses"]), [list(v) for v in state["val_losses"]],
                                  float(state["wall_s"]))  # fmt: skip

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self, out_dir: Path, reporter: Reporter | None = None) -> FitResult:
        """Train to the last step, saving the state in `out_dir`; returns early (interrupted) on Ctrl-C."""
        reporter = reporter or Reporter()
        session_start, last_saved = time.perf_counter(), self.progress.step
        stop = _StopRequest()
        reporter.start(self.total, self.progress.step)
        try:
            with stop.on_sigint():
                self._maybe_evaluate(reporter, force=self.progress.step == 0)
                while self.progress.step < self.total:
                    log = self.train_step(stop)
                    if log is None:
                        break
                    reporter.step(log)
                    self._maybe_evaluate(reporter, force=log.step == self.total)
                    if log.step % self.config.save_every == 0 or log.step == self.total:
                        self._save(out_dir, session_start, reporter)
                        last_saved = log.step
        finally:
            reporter.close()
        if stop.requested:
            reporter.message(f"Ctrl-C: stopped after step {self.progress.step} (Ctrl-C twice stops without saving)")
            if last_saved != self.progress.step:
                self._save(out_dir, session_start, reporter)
        p = self.progress
        return FitResult(p.step, self.total, tuple(p.losses), tuple((int(s), float(v)) for s, v in p.val_losses),
                         p.wall_s + time.perf_counter() - session_start, interrupted=stop.requested)  # fmt: skip

    def _maybe_evaluate(self, reporter: Reporter, *, force: bool) -> None:
        step = self.progress.step
        if not self.val_set or not (force or step % self.config.eval_every == 0):
            return
        if any(int(s) == step for s, _ in self.progress.val_losses):
            return
        loss = self.evaluate()
        self.progress.val_losses.append([step, loss])
        reporter.message(f"eval  step {step}/{self.total}  val loss {loss:.4f} ({len(self.val_set)} examples)")

    def _save(self, out_dir: Path, session_start: float, reporter: Reporter) -> None:
        if not self.ranks.main:  # every rank holds the same weights: rank 0 writes them
            return
        state = self.state()
        state["wall_s"] = self.progress.wall_s + time.perf_counter() - session_start
        save_state(out_dir, state)
        reporter.message(f"saved state at step {self.progress.step}")


class _StopRequest:
    """Ctrl-C (or SIGTERM) asks the loop to stop before the next forward pass; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    @contextmanager
    def on_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame) -> None:  # prints nothing: the console may be half-way through a line
            if signum == signal.SIGTERM:
                note_terminated()  # the same stop, exit 143
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device

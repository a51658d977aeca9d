"""Recording the one-token decode step: on CUDA as a CUDA graph, replayed with no Python and no host sync.

A `Recorder` takes a step that reads only tensors (the engine's masked step: tokens from a static buffer, the
position, the KV cache and the LoRA scales all at fixed addresses) and returns its first result plus a replay. A
replay re-runs what was recorded on whatever those tensors hold then; any Python value the step read while it was
recorded is frozen into it. `RecordedStep` is one cache's recorded step with its static token buffer.

The CUDA recorder is the only one the product uses; the tests record with `make_fx` on the CPU, which has the same
semantics (tensors by address, Python values as constants), to prove what a graph would replay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

Step = Callable[[], torch.Tensor]


class Recorder(Protocol):
    """Records a step: `record(step)` -> (the logits of running it once, a replay returning the logits)."""

    def record(self, step: Step) -> tuple[torch.Tensor, Step]: ...


class CudaGraphRecorder:
    """CUDA graphs sharing one memory pool (a graph per cache, and so per row count)."""

    def __init__(self) -> None:
        self._pool = torch.cuda.graph_pool_handle()

    def record(self, step: Step) -> tuple[torch.Tensor, Step]:
        # one eager step gives this step's logits and warms up every kernel (on a side stream, as capture requires);
        # the recording that follows executes nothing, so the cache is written once
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # the same position written twice with the same values: idempotent
                first = step().clone()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return first, replay


class RecordedStep:
    """One cache's decode step, recorded on first use: a static token buffer in, the recorded logits out."""

    def __init__(self, cache, step: Callable[[torch.Tensor, object], torch.Tensor], recorder: Recorder) -> None:
        self.cache = cache
        self.tokens = torch.zeros(cache.rows, dtype=torch.long, device=cache.kv.device)
        self.step, self._recorder = step, recorder  # what is recorded: the compiled step or the plain one
        self._replay: Step | None = None

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        if self._replay is None:
            first, self._replay = self._recorder.record(lambda: self.step(self.tokens, self.cache))
            return first
        return self._replay()

"""Several processes on one job: the ranks that torchrun or `accelerate launch` started, one model copy each.

The launchers say who is who in the standard variables (WORLD_SIZE, RANK, LOCAL_RANK, and MASTER_ADDR/PORT
for the rendezvous); the ranks join with torch.distributed, nccl on CUDA and gloo on a CPU. SALMONN pads every
window to 30 s, so each input costs about the same and a static split (every world-th input of the inputs not
yet done) balances the work without a scheduler. Nothing large travels between ranks: each writes its own files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank `rank` of `world`, `local_rank` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's part of `items` (in the same order on every rank): every world-th item from its rank."""
        return list(items[self.rank :: self.world])


ALONE = Ranks()  # a process that no launcher started


def launched() -> Ranks:
    """The ranks a launcher set up in this process's environment; one rank of one without a launcher."""

    def number(name: str, default: int) -> int:
        text = os.environ.get(name, "")
        if not text:
            return default
        if not text.isdigit():
            raise UsageError(f"the launcher's {name}={text!r} is not a number")
        return int(text)

    world = number("WORLD_SIZE", 1)
    rank, local_rank = number("RANK", 0), number("LOCAL_RANK", 0)
    if world < 1 or rank >= world:
        raise UsageError(f"the launcher's RANK={rank} does not fit its WORLD_SIZE={world}")
    return Ranks(rank, world, local_rank)


def device_for(ranks: Ranks, requested: str) -> str:
    """Each rank's own GPU (cuda:LOCAL_RANK) where the user asked for auto or cuda; what they asked for otherwise."""
    if not ranks.distributed or requested not in ("auto", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        return requested
    return f"cuda:{ranks.local_rank}"


@contextlib.contextmanager
def process_group(ranks: Ranks, device: str) -> Iterator[None]:
    """Join the job's process group for the block (nothing without a launcher): nccl on CUDA, gloo otherwise."""
    if not ranks.distributed:
        yield
        return
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(int(device.partition(":")[2] or 0))
    dist.init_process_group(backend=backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(ranks: Ranks) -> Iterator[None]:
    """Rank 0 runs the block before the others do (a download into the shared cache: then the others find it
    there); alone, it just runs."""
    if not ranks.main:
        barrier(ranks)
    yield
    if ranks.main:
        barrier(ranks)


def barrier(ranks: Ranks) -> None:
    """Every rank waits here for the others (a no-op alone)."""
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def summed(ranks: Ranks, values: Sequence[float]) -> list[float]:
    """`values` added up over every rank (all ranks call it with as many values; alone: the values)."""
    if not ranks.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()

"""`--gpus 0,1,2,3` / `--gpus all`: the same command again, one process per GPU, through torch's elastic
launcher (what `torchrun --standalone --nproc_per_node N -m salmonn_cli ...` runs), so that a user with four GPUs
needs no launcher of their own. Each process then finds its rank in its environment (salmonn_cli.distributed)."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer

from ..errors import DependencyError, UsageError


def gpu_ids(spec: str, visible: int) -> list[int]:
    """The GPUs `spec` names ("all", or "0,2,3"), each checked against the `visible` count."""
    if spec.strip().lower() == "all":
        ids = list(range(visible))
    else:
        try:
            ids = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise UsageError(f"--gpus takes GPU numbers (0,1,2,3) or all, got {spec!r}") from None
    if not ids:
        raise UsageError("--gpus names no GPU")
    wrong = [i for i in ids if not 0 <= i < visible]
    if wrong or len(set(ids)) != len(ids):
        raise UsageError(f"--gpus {spec}: this machine has GPUs 0 to {visible - 1}, each named once")
    return ids


def without_gpus_option(argv: list[str]) -> list[str]:
    """The command line as given, less its --gpus option (the processes it starts run on one GPU each)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            kept.append(arg)
    return kept


def run_on_gpus(spec: str) -> NoReturn:
    import torch

    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UsageError("--gpus starts its own processes: leave it out under torchrun or accelerate launch")
    if not torch.cuda.is_available():
        raise DependencyError("--gpus needs CUDA GPUs and none is visible here; on CPUs, start several processes "
                              "with torchrun --nproc_per_node N -m salmonn_cli ...")  # fmt: skip
    ids = gpu_ids(spec, torch.cuda.device_count())
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ids)  # rank r sees its GPU as cuda:r
    try:
        torchrun(["--standalone", f"--nproc_per_node={len(ids)}", "-m", "salmonn_cli",
                  *without_gpus_option(sys.argv[1:])])  # fmt: skip
    except ChildFailedError as failed:  # torch's launcher has printed which process failed and how
        codes = [f.exitcode for f in failed.failures.values()]
        raise typer.Exit(next((c for c in codes if c > 0), 1)) from None
    raise typer.Exit(0)

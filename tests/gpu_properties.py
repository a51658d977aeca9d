"""CPU stand-ins for what a GPU would tell: a recorder with a CUDA graph's semantics, a host-sync guard and a
kernel counter. They let the normal suite prove the properties a recorded or compiled step needs on a GPU.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode


class MakeFxRecorder:
    """Records a step as `make_fx` traces it: every op on tensors (read at their addresses on each replay, as a
    CUDA graph reads them), every Python value it looked at frozen into the trace (as a graph freezes it)."""

    def __init__(self) -> None:
        self.recorded = 0

    def record(self, step: Callable[[], torch.Tensor]):
        self.recorded += 1
        first = step().clone()  # as the CUDA recorder: one real run gives this step's logits
        traced = make_fx(lambda: step())()
        return first, traced


class RefusingRecorder:
    """A recorder that fails as a refused CUDA graph capture does."""

    def __init__(self) -> None:
        self.tries = 0

    def record(self, step):
        self.tries += 1
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")


HOST_READS = ("__bool__", "item", "tolist", "cpu", "numpy", "nonzero", "__int__", "__float__")
DATA_DEPENDENT = ("argwhere", "unique", "masked_select", "nonzero")


class HostSync(AssertionError):
    """A step read a device value back to the host (what a CUDA graph capture refuses)."""


@contextlib.contextmanager
def no_host_sync(allowed_in: tuple[str, ...] = ()) -> Iterator[None]:
    """Inside: reading a tensor's value on the host, or an op whose output shape depends on the data, raises;
    except when the caller's file path contains one of `allowed_in` (a CPU kernel a GPU never runs)."""

    def refuse(name: str, original):
        def refused(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if any(part in caller for part in allowed_in):
                return original(*args, **kwargs)
            raise HostSync(f"{name} reads a device value on the host")

        return refused

    saved = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in HOST_READS]
    saved += [(torch, name, getattr(torch, name)) for name in DATA_DEPENDENT]
    try:
        for owner, name, original in saved:
            setattr(owner, name, refuse(name, original))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


# ops that launch no kernel: views, metadata, and the allocation of an output a kernel then writes
_FREE = {"detach", "view", "_unsafe_view", "alias", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
         "slice", "select", "as_strided", "reshape", "empty", "empty_like", "empty_strided", "split", "unbind",
         "lift_fresh", "_reshape_alias", "unflatten", "flatten", "contiguous"}  # fmt: skip


class KernelCounter(TorchDispatchMode):
    """Counts the aten ops that launch a kernel, by name; within `inside()` only when given a module to watch."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.active = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        # an op whose result is its input's memory launched nothing (`to` with nothing to convert, dropout in eval),
        # unless it wrote there (in place)
        if self.active and name not in _FREE and (name.endswith("_") or not _aliases(out, args)):
            self.counts[name] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _aliases(out, args) -> bool:
    """Whether `out` shares memory with the op's first argument."""
    first = args[0] if args else None
    if not (isinstance(out, torch.Tensor) and isinstance(first, torch.Tensor)):
        return False
    return out.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()


@contextlib.contextmanager
def kernels_in(module: torch.nn.Module) -> Iterator[KernelCounter]:
    """Count the kernels launched inside `module`'s forward calls (hooks switch the counting on and off)."""
    counter = KernelCounter()
    counter.active = False
    hooks = [
        module.register_forward_pre_hook(lambda *_: setattr(counter, "active", True)),
        module.register_forward_hook(lambda *_: setattr(counter, "active", False)),
    ]
    try:
        with counter:
            yield counter
    finally:
        for hook in hooks:
            hook.remove()

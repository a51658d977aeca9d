"""`salmonn download`, `salmonn models`, `salmonn doctor`: getting the weights and knowing what fits here."""

from __future__ import annotations

import json
import platform

import typer
from rich.console import Console
from rich.table import Table

from quantize.memory import GIB
from quantize.spec import MODES

from ..errors import UsageError
from ..model_file import BUILTIN_DEFAULT, ROLES
from .options import FormatOpt, ModelOpt, OfflineOpt
from .runner import stderr


def _estimates(spec, device_type: str = "cuda") -> dict[str, float]:
    """GiB each quantisation needs for this model on `device_type`, as `--quant auto` would run it there (on a GPU:
    LLM and encoders in float16; on a CPU: see quantize.memory), cache and overhead included."""
    from quantize.memory import estimate_for, placements

    sizes = spec.sizes
    return {p.mode: round(estimate_for(sizes.llm_params, sizes.encoder_params, p).total_gib, 2)
            for p in placements(device_type)}  # fmt: skip


def fits_here(budget_bytes: int, device_type: str) -> dict[str, dict[str, bool]]:
    """For each built-in model, which modes fit in `budget_bytes` on `device_type` (what doctor prints; the same
    comparison, unrounded, as the refusal of an explicit mode)."""
    from quantize.memory import estimate_for, placements

    from ..model_file import builtin_models, load_model_spec

    fits = {}
    for name in builtin_models():
        sizes = load_model_spec(name).sizes
        fits[name] = {p.mode: estimate_for(sizes.llm_params, sizes.encoder_params, p).total_bytes <= budget_bytes
                      for p in placements(device_type)}  # fmt: skip
    return fits


def download(model: ModelOpt = BUILTIN_DEFAULT, offline: OfflineOpt = False) -> None:
    """Fetch every component of a model into the Hugging Face cache (resumable; verified by size and sha256)."""
    from ..hub import download as fetch
    from ..hub import is_offline
    from ..model_file import load_model_spec

    if is_offline(offline):
        raise UsageError("download needs the network, but offline mode is on (--offline or HF_HUB_OFFLINE=1)")
    spec = load_model_spec(model)
    paths = fetch(spec, progress=lambda line: stderr.print(f"[dim]{line}[/]"))
    for name in ROLES:
        print(f"{name}\t{getattr(paths, name)}")


def models(fmt: FormatOpt = "text") -> None:
    """List the known models: which are downloaded, their size on disk, and the memory each mode needs (GiB)."""
    from ..hub import cache_status
    from ..model_file import builtin_models, load_model_spec

    rows = []
    for name in builtin_models():
        spec = load_model_spec(name)
        status = cache_status(spec)
        rows.append({
            "name": name,
            "description": spec.description,
            "cached_components": sum(s.cached for s in status),
            "components": len(status),
            "size_on_disk_bytes": sum(s.size_bytes for s in status),
            "gpu_memory_gib": _estimates(spec, "cuda"),
            "host_memory_gib": _estimates(spec, "cpu"),  # a CPU run, --dtype auto
        })  # fmt: skip
    if fmt == "json":
        print(json.dumps(rows))
        return
    table = Table(title="SALMONN models (memory: LLM + encoders + KV cache, as --dtype auto runs)")
    for column in ("model", "downloaded", "on disk", f"GPU GiB {'/'.join(MODES)}", f"CPU GiB {'/'.join(MODES)}"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            f"{row['cached_components']}/{row['components']}",
            f"{row['size_on_disk_bytes'] / GIB:.1f} GiB",
            *(" / ".join(f"{row[key][m]:.1f}" for m in MODES) for key in ("gpu_memory_gib", "host_memory_gib")),
        )
    Console().print(table)


def _gpus() -> list[dict]:
    import torch

    gpus = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(
            {"index": index, "name": torch.cuda.get_device_name(index), "free_bytes": free, "total_bytes": total}
        )
    return gpus


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _portaudio() -> str | None:
    import ctypes.util

    return ctypes.util.find_library("portaudio")


def doctor(fmt: FormatOpt = "text") -> None:
    """Report what this machine has for SALMONN: Python, torch, CUDA, quantisation libraries, audio, cache, fit."""
    import torch
    from huggingface_hub import constants

    from ..hub import is_offline
    from .quant import memory_budget

    gpus = _gpus()
    device_type = "cuda" if gpus else "cpu"
    budget = memory_budget(device_type)
    report = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": gpus,
        "bitsandbytes": _version("bitsandbytes"),
        "bitsandbytes_4bit_8bit": ("CUDA" if gpus else "CPU only (slow)")
        if _version("bitsandbytes")
        else "not installed",
        "optimum_quanto": _version("optimum-quanto"),
        "portaudio": _portaudio(),
        "hf_cache": str(constants.HF_HUB_CACHE),
        "offline": is_offline(False),
        "memory_budget_bytes": budget.bytes,
        "memory_budget_source": budget.source,
        "fits": fits_here(budget.bytes, device_type),
    }
    if fmt == "json":
        print(json.dumps(report))
        return
    _print_doctor(report)


def _print_doctor(report: dict) -> None:
    table = Table(show_header=False, title="salmonn doctor")
    table.add_column(style="bold")
    table.add_column()
    gpus = (
        ", ".join(
            f"{g['name']} ({g['free_bytes'] / GIB:.1f} of {g['total_bytes'] / GIB:.1f} GiB free)"
            for g in report["gpus"]
        )
        or "none (CPU only: slow)"
    )
    missing = "[yellow]not installed[/]"
    for key, value in (
        ("Python", report["python"]), ("torch", report["torch"]), ("CUDA", report["cuda"] or "not available"),
        ("GPUs", gpus), ("bitsandbytes", report["bitsandbytes"] or missing),
        ("4/8-bit with bitsandbytes", report["bitsandbytes_4bit_8bit"]),
        ("optimum-quanto (CPU 4/8-bit)", report["optimum_quanto"] or missing),
        ("PortAudio (live mode)", report["portaudio"] or "[yellow]not found: apt-get install libportaudio2[/]"),
        ("Hugging Face cache", report["hf_cache"]), ("offline mode", "on" if report["offline"] else "off"),
    ):  # fmt: skip
        table.add_row(key, str(value))
    budget = f"{report['memory_budget_bytes'] / GIB:.1f} GiB {report['memory_budget_source']}"
    for name, fits in report["fits"].items():
        ok = [m for m in MODES if fits[m]]
        table.add_row(f"{name} fits ({budget})", ", ".join(ok) if ok else "[red]no mode fits[/]")
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("download")(download)
    app.command("models")(models)
    app.command("doctor")(doctor)

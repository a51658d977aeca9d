"""One benchmark configuration, run in a fresh process so its memory peaks are its own.

`python -m benchmarks.child REQUEST.json OUT.json` (from the checkout): the request names the model (shape or paths),
the quantisation, backend and device, and the measurement options; the run's results go to OUT.json.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from .measure import MEASUREMENTS, Bench
from .memory import GpuPeak, module_bytes, peak_rss_bytes, rss_bytes
from .report import jsonable
from .results import BenchOptions


def make_model(request: dict, device) -> tuple[Any, str]:
    """(model, its name): a random-weight shape built layer by layer, or real components via `load_model`."""
    import torch

    from quantize import QuantSpec

    spec = QuantSpec.parse(request["quant"], backend=request["backend"])
    if request.get("shape"):
        from .build import build_model
        from .shapes import SHAPES

        llm_dtype = None if request["llm_dtype"] == "auto" else getattr(torch, request["llm_dtype"])
        dtype = None if request.get("dtype", "auto") == "auto" else getattr(torch, request["dtype"])
        return build_model(SHAPES[request["shape"]], spec, device, llm_dtype=llm_dtype, dtype=dtype), request["shape"]
    from salmonn_cli.hub import resolve_components
    from salmonn_cli.loading import load_model
    from salmonn_cli.model_file import ROLES, load_model_spec, with_local_components

    paths, settings, name = request["paths"], None, "components"
    if request.get("model_file"):
        model_spec = with_local_components(load_model_spec(request["model_file"]), **paths)
        paths, settings, name = asdict(resolve_components(model_spec)), model_spec.settings, model_spec.name
    model = load_model(*(paths[role] for role in ROLES), device=device, quantization=spec, settings=settings)
    return model, name


def run(request: dict, save: Callable[[dict], None] = lambda report: None) -> dict:
    """Load (timed, with its memory peaks), then every measurement not skipped, each with its GPU peak.

    `save` gets the report so far after the load and after each measurement: a run stopped at its time limit
    still leaves what it measured.
    """
    from salmonn_cli.engine import plan_compile
    from salmonn_cli.loading import resolve_device
    from salmonn_cli.step_compile import compile_plan

    device = resolve_device(request["device"])
    options = BenchOptions(**request["options"])
    _import_libraries(request)
    before = rss_bytes()  # torch and friends are imported: what the model adds is measured from here
    GpuPeak.reset(device)
    start = time.perf_counter()
    model, name = make_model(request, device)
    load_s = time.perf_counter() - start
    plan_compile(model.llm, compile_plan(options.compile, long_lived=True, device_type=device.type))
    _progress(request, f"loaded in {load_s:.1f} s")
    load_peak, load_gpu = peak_rss_bytes(), GpuPeak.read(device)
    size = module_bytes(model)
    report: dict[str, Any] = {
        "config": request["config"],
        "model": name,
        "device": str(model.device),
        "dtype": str(model.encoder_dtype).removeprefix("torch."),
        "llm_dtype": str(next(model.llm.parameters()).dtype).removeprefix("torch."),
        "device_name": _device_name(device),
        "load_s": load_s,
    }
    bench, gpu = Bench(model, options), {}
    save(report)
    for key, measure in MEASUREMENTS.items():
        if key not in request["skip"]:
            GpuPeak.reset(device)
            started = time.perf_counter()
            report[key] = measure(bench)
            gpu[key] = GpuPeak.read(device)
            report["gpu_peak_by_measurement"] = {k: asdict(peak) for k, peak in gpu.items() if peak is not None}
            save(report)
            _progress(request, f"{key} in {time.perf_counter() - started:.1f} s")
    del report["gpu_peak_by_measurement"]  # the finished report keeps it under "memory"
    peaks = [peak for peak in gpu.values() if peak is not None]
    report["memory"] = {
        "rss_before_load_bytes": before,
        "load_peak_rss_bytes": load_peak,
        "load_rss_increase_bytes": load_peak - before,
        "model_bytes": size,
        "llm_bytes": module_bytes(model.llm),
        "load_rss_over_model": (load_peak - before) / size,
        "peak_rss_bytes": peak_rss_bytes(),
        "gpu_load_peak": asdict(load_gpu) if load_gpu else None,
        "gpu_peak": {
            "allocated": max(p.allocated for p in peaks),
            "reserved": max(p.reserved for p in peaks),
        }
        if peaks
        else None,
        "gpu_peak_by_measurement": {key: asdict(peak) for key, peak in gpu.items() if peak is not None},
    }
    return report


def _progress(request: dict, text: str) -> None:
    """A line on stderr per step: a large shape on a CPU takes minutes per measurement."""
    print(f"[bench {request['config']['label']}] {text}", file=sys.stderr, flush=True)


def _import_libraries(request: dict) -> None:
    """Import what loading needs before the load is timed: the load figures are the model's, not the imports'."""
    from quantize import quiet_bitsandbytes

    quiet_bitsandbytes()  # as load_model does, before peft imports bitsandbytes and it logs
    import peft  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401
    from transformers.models.whisper import modeling_whisper  # noqa: F401

    from salmonn_cli.model import beats, qformer, salmonn  # noqa: F401

    if request["quant"] != "none":
        from quantize import QuantSpec, resolve_backend

        backend = resolve_backend(
            QuantSpec.parse(request["quant"], request["backend"]), request["device"].split(":")[0]
        )
        __import__({"bitsandbytes": "bitsandbytes", "quanto": "optimum.quanto", "torchao": "torchao"}[backend])


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        return f"{names[0]} x {torch.get_num_threads()} threads" if names else "cpu"
    except OSError:
        return "cpu"


def run_peer(request: dict) -> dict:
    """The peer model (benchmarks/peer.py) on the request's device and quantisation."""
    import torch

    from salmonn_cli.loading import resolve_device

    from . import peer

    device = resolve_device(request["device"])
    if request["quant"] == "4bit" and device.type == "cuda":
        from quantize import quiet_bitsandbytes

        quiet_bitsandbytes()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    GpuPeak.reset(device)
    report = peer.run(request, device, sync)
    peak = GpuPeak.read(device)
    report["gpu_peak"] = asdict(peak) if peak else None
    return report


def main(argv: list[str] | None = None) -> int:
    request_path, out_path = (argv if argv is not None else sys.argv[1:])[:2]
    request = json.loads(Path(request_path).read_text())

    def save(report: dict) -> None:
        Path(out_path).write_text(json.dumps(jsonable(report), indent=2) + "\n")

    save(run_peer(request) if request.get("peer") else run(request, save))
    return 0


if __name__ == "__main__":
    sys.exit(main())

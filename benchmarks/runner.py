"""Benchmark SALMONN: load, per-stage times for a 30 s clip, time to first token, decode speed, long-audio speed.

    python scripts/bench.py --shape tiny --device cpu --json OUT.json
    python scripts/bench.py --shape salmonn-13b --device cuda --quant 4bit,8bit --new-tokens 32 --markdown
    python scripts/bench.py --model my-model.toml --device cuda --quant 4bit
    python scripts/bench.py --whisper W --beats B.pt --llm L --checkpoint C.pth

A shape is built with random weights, layer by layer (no download); `--model` or the four component paths
load real checkpoints through `load_model`. Each (quantisation, backend, device) runs in a fresh process, so
its host RSS peak while loading is its own. Every measurement runs `--warmup` untimed times, then `--repeat`
timed times (median, min, max); load is timed once. To add a measurement, see benchmarks/measure.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path

from quantize.memory import available_host_bytes
from quantize.spec import BACKENDS, MODES
from salmonn_cli.model_file import ROLES
from salmonn_cli.step_compile import COMPILE_MODES

from .memory import GB
from .report import STEP_WAYS, jsonable, markdown, print_tables
from .results import LIVE_WINDOW_S, MEASUREMENT_NAMES, BenchOptions, Stat
from .shapes import SHAPES

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the checkout: benchmarks, salmonn_cli and quantize
SKIPPABLE = (*MEASUREMENT_NAMES, "help")


@dataclass(frozen=True)
class BenchConfig:
    """One configuration to measure: quantisation mode, the backend that applies it, device."""

    quant: str
    backend: str  # "none" at full precision
    device: str

    @property
    def label(self) -> str:
        return f"{self.quant}/{self.backend}/{self.device}"


def configurations(quants: list[str], backends: list[str], devices: list[str]) -> list[BenchConfig]:
    """Every requested combination, each once; backend `auto` resolves per device (QuantSpec.backend_for)."""
    from quantize import QuantSpec

    found: dict[BenchConfig, None] = {}
    for device in devices:
        device_type = device.split(":")[0]
        for quant in quants:
            for backend in backends:
                spec = QuantSpec.parse(quant, backend=backend)
                resolved = spec.backend_for(device_type) if spec.enabled else "none"
                found[BenchConfig(spec.mode, resolved, device)] = None
    return list(found)


def host_estimate_bytes(args: argparse.Namespace, config: BenchConfig) -> int | None:
    """Host memory a CPU run needs (quantize.memory's one estimate, with the dtypes load_model runs in and the
    LLM in --llm-dtype when given), or None when unknown (a GPU run keeps weights there)."""
    from quantize.memory import Placement, estimate_for, resolve_dtype

    if not config.device.startswith("cpu") or not args.shape or args.model:
        return None
    shape = SHAPES[args.shape]
    params = shape.params()  # counted on the meta device
    placement = Placement("cpu", resolve_dtype(args.dtype, "cpu"), config.quant,
                          config.backend if config.quant != "none" else "none",
                          llm=None if args.llm_dtype == "auto" else args.llm_dtype)  # fmt: skip
    return estimate_for(
        params["llm"],
        params["whisper"] + params["beats"] + params["connector"],
        placement,
        hidden=shape.llm.hidden,
        layers=shape.llm.layers,
        vocab=shape.llm.vocab,  # the CLI's default context (2048 positions), so its verdicts are the CLI's
    ).total_bytes


def run_config(args: argparse.Namespace, config: BenchConfig, workdir: Path) -> dict:
    """One configuration in a child process; a failure is recorded, not raised, so the others still run."""
    budget = args.max_host_gb * GB if args.max_host_gb else available_host_bytes()
    needed = host_estimate_bytes(args, config)
    if needed is not None and needed > budget:
        return {
            "config": _config(config),
            "skipped": f"needs ~{needed / GB:.1f} GB of host memory, {budget / GB:.1f} GB allowed",
        }
    request = {
        "config": _config(config),
        "shape": None if (args.model or any(getattr(args, r) for r in ROLES)) else args.shape,
        "model_file": args.model,
        "paths": {role: getattr(args, role) for role in ROLES},
        "llm_dtype": args.llm_dtype,
        "dtype": args.dtype,
        "quant": config.quant,
        "backend": "auto" if config.backend == "none" else config.backend,
        "device": config.device,
        "options": asdict(options_of(args)),
        "skip": sorted(args.skip),
    }
    stem = config.label.replace("/", "-").replace(":", "")
    request_path, out_path = workdir / f"{stem}.request.json", workdir / f"{stem}.json"
    request_path.write_text(json.dumps(request))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "benchmarks.child", str(request_path), str(out_path)]
    code, lines = _run_echoing(command, env, args.timeout)
    if code != 0:
        if code in (-9, 137):
            why = "killed (out of memory or --timeout?)"
        elif code < 0:
            why = f"crashed (signal {-code}) after: {(lines or ['no output'])[-1]}"
        else:
            why = (lines or ["no output"])[-1]
        if out_path.exists():  # what it measured before it stopped
            return {**json.loads(out_path.read_text()), "incomplete": f"exit {code}: {why}"}
        return {"config": _config(config), "error": f"exit {code}: {why}"}
    return json.loads(out_path.read_text())


def run_peer(args: argparse.Namespace, device: str, quant: str, workdir: Path) -> dict:
    """The peer model (benchmarks/peer.py) in a child process, at the shape matching `--shape`."""
    config = {"quant": quant, "backend": "bitsandbytes" if quant == "4bit" and device.startswith("cuda") else "none",
              "device": device}  # fmt: skip
    config["label"] = f"{args.peer}/{config['quant']}/{config['backend']}/{device}"
    request = {
        "peer": args.peer,
        "peer_shape": "tiny" if args.shape == "tiny" and not args.model else "7b",
        "config": config,
        "quant": quant,
        "device": device,
        "options": asdict(options_of(args)),
    }
    stem = config["label"].replace("/", "-").replace(":", "")
    request_path, out_path = workdir / f"{stem}.request.json", workdir / f"{stem}.json"
    request_path.write_text(json.dumps(request))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    code, lines = _run_echoing([sys.executable, "-m", "benchmarks.child", str(request_path), str(out_path)], env,
                               args.timeout)  # fmt: skip
    if code != 0:
        return {"config": config, "error": f"exit {code}: {(lines or ['no output'])[-1]}"}
    return json.loads(out_path.read_text())


def _run_echoing(command: list[str], env: dict, timeout: float) -> tuple[int, list[str]]:
    """Run `command`, passing its stderr (progress lines) on as it comes; (exit code, its last stderr lines)."""
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as child:
        timer = threading.Timer(timeout, child.kill)  # a stuck configuration must not stop the others
        timer.start()
        try:
            for line in child.stderr:
                sys.stderr.write(line)
                if line.strip():
                    tail.append(line.rstrip())
            return child.wait(), list(tail)
        finally:
            timer.cancel()


def _config(config: BenchConfig) -> dict:
    return {**asdict(config), "label": config.label}


def options_of(args: argparse.Namespace) -> BenchOptions:
    values = {f.name: getattr(args, f.name) for f in fields(BenchOptions)}
    return BenchOptions(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})


def time_cli_help(args: argparse.Namespace) -> Stat:
    """Wall time of `salmonn --help` in a fresh interpreter (what a user waits for before anything loads)."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    command = [sys.executable, "-m", "salmonn_cli.cli.app", "--help"]
    runs = []
    for i in range(args.warmup + args.repeat):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True)
        if i >= args.warmup:
            runs.append(time.perf_counter() - start)
    return Stat.of(runs)


def machine() -> dict:
    """What the numbers were measured on (no torch import here: the parent stays light)."""
    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "optimum-quanto"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cores = os.cpu_count()
    return {
        "description": f"{platform.machine()} {cores} cores",
        "cpu_count": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "host_memory_available_bytes": available_host_bytes(),
        "versions": versions,
    }


def _csv(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [item.strip().replace("-", "_") for item in text.split(",") if item.strip()]  # long-audio too
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return items

    return parse


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    """The bench's options (shared by scripts/bench.py and `salmonn bench`)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=tuple(SHAPES), default="tiny", help="random-weight shape to build")
    ap.add_argument("--model", help="a model file (.toml) or built-in model name: load real checkpoints instead")
    for role in ROLES:
        ap.add_argument(f"--{role}", help=f"local {role} component (overrides the model file's)")
    ap.add_argument("--device", type=lambda t: t.split(","), default=["cpu"], help="cpu, cuda, cuda:N (comma list)")
    ap.add_argument("--quant", type=_csv(MODES), default=["none"], help="e.g. none,8bit,4bit")
    ap.add_argument(
        "--backend",
        type=_csv(BACKENDS),
        default=["auto"],
        help="auto = torchao on CUDA 8.0+ where installed, else bitsandbytes; optimum-quanto on CPU; a comma"
        " list runs each",
    )
    ap.add_argument(
        "--llm-dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="a shape's LLM dtype; auto = what load_model uses (quantize.llm_dtype)",
    )
    ap.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="the encoders' dtype (and an unquantised LLM's, unless --llm-dtype); auto = load_model's",
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--markdown", action="store_true", help="also print the summary as a markdown table")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    ap.add_argument(
        "--new-tokens",
        "--max-new-tokens",
        dest="new_tokens",
        type=int,
        default=32,
        help="tokens per answer (decode speed, ask, long audio)",
    )
    ap.add_argument("--num-beams", type=int, default=4, help="beams of ask, beam decoding and long audio")
    ap.add_argument("--long-seconds", type=float, default=180.0, help="length of the synthetic long file")
    ap.add_argument("--batch-size", type=int, default=4, help="segments per batch for the batched long-audio run")
    ap.add_argument("--live-seconds", type=float, default=20.0, help="audio fed to `live` at real-time pace")
    ap.add_argument("--skip", type=_csv(SKIPPABLE), default=[], help=f"leave out some of {', '.join(SKIPPABLE)}")
    ap.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                    help="the decode step of every measurement but decode speed's (which times each way), as a"
                         " long-lived `salmonn` run takes --compile")  # fmt: skip
    ap.add_argument("--step-ways", type=_csv(STEP_WAYS), default=list(STEP_WAYS),
                    help="the ways decode speed times a step, where the device has them: compiled (and recorded),"
                         " graph (recorded), eager")  # fmt: skip
    ap.add_argument(
        "--peer",
        choices=("none", "qwen2-audio"),
        default="none",
        help="also measure Qwen2-Audio-7B (random weights, transformers' generate) per device and quantisation",
    )
    ap.add_argument("--max-host-gb", type=float, help="skip CPU runs estimated above this (default: MemAvailable)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one configuration may take")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0 or args.batch_size < 1 or args.long_seconds < 1 or args.new_tokens < 2:
        ap.error("need --repeat >= 1, --warmup >= 0, --batch-size >= 1, --long-seconds >= 1, --new-tokens >= 2")
    if args.live_seconds < LIVE_WINDOW_S:
        ap.error(f"need --live-seconds >= {LIVE_WINDOW_S}")
    if any(getattr(args, role) for role in ROLES) and not args.model and not all(getattr(args, r) for r in ROLES):
        ap.error("without --model, give all four of --whisper, --beats, --llm and --checkpoint")
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run every configuration, print the tables, write the JSON; exit 1 when a configuration failed."""
    args = parse_args(argv, prog)
    loads_real = bool(args.model or args.whisper)
    report: dict = {
        "bench": 1,  # the layout of this JSON
        "target": args.model or ("components" if loads_real else args.shape),
        "machine": machine(),
        "options": asdict(options_of(args)),
        "options_text": f"repeat {args.repeat}, warm-up {args.warmup}, {args.new_tokens} new tokens"
        + ("" if args.dtype == "auto" else f", --dtype {args.dtype}")
        + ("" if args.llm_dtype == "auto" else f", LLM in {args.llm_dtype}"),
        "skip": sorted(args.skip),
        "cli_help_s": None if "help" in args.skip else time_cli_help(args),
        "runs": [],
        "peers": [],
    }
    configs = configurations(args.quant, args.backend, args.device)
    with tempfile.TemporaryDirectory(prefix="salmonn-bench-") as workdir:
        for config in configs:
            report["runs"].append(run_config(args, config, Path(workdir)))
        if args.peer != "none":
            for device, quant in dict.fromkeys((c.device, c.quant) for c in configs):
                report["peers"].append(run_peer(args, device, quant, Path(workdir)))
    report["runs"] = [_with_stats(run) for run in report["runs"]]
    print_tables(report)
    if args.markdown:
        print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(jsonable(report), indent=2) + "\n")
    failed = [run for run in report["runs"] + report["peers"] if "error" in run or "incomplete" in run]
    return 1 if failed else 0


def _with_stats(value):
    """JSON from a child back into Stats, so the tables read one kind of value."""
    if isinstance(value, dict):
        if set(value) == {"median", "min", "max", "runs"}:
            return Stat(value["median"], value["min"], value["max"], tuple(value["runs"]))
        return {key: _with_stats(item) for key, item in value.items()}
    return value

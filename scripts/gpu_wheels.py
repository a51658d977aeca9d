#!/usr/bin/env python3
"""Fetch the wheels `scripts/gpu_check.sh` installs on a GPU machine with no network, into the ignored `.whl/`.

That machine (Python 3.12, torch 2.11 + CUDA 13, transformers, peft, accelerate) lacks bitsandbytes, torchao,
soundfile, soxr and silero-vad. A checkout travels there with its wheels under 64 MiB in all, so two wheels are
repacked without files that machine never loads: bitsandbytes keeps its CUDA 13 and CPU libraries (43 MB -> ~8 MB;
the others are builds for CUDA 11.8-12.8 and ROCm), silero-vad keeps the TorchScript model `vad.py` loads
(11 MB -> ~2 MB; the others are ONNX and safetensors variants). Their RECORD files drop the same lines.

    python scripts/gpu_wheels.py            # then: bash scripts/gpu_check.sh on the GPU machine
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
PINS = ("bitsandbytes==0.50.2", "torchao==0.18.0", "soundfile==0.14.0", "soxr==1.1.0", "silero-vad==6.2.3")
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")  # fmt: skip
# per wheel-name prefix: members to drop (shell patterns), and members that must stay whatever the patterns say
TRIM = {
    "bitsandbytes-": (["bitsandbytes/libbitsandbytes_*.so"], ["*_cuda13*.so", "*_cpu.so"]),
    "silero_vad-": (["silero_vad/data/*.onnx", "silero_vad/data/*.safetensors"], []),
}


def download() -> None:
    WHEELS.mkdir(exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for pin in PINS:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
             "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS), pin],
            check=True,
        )  # fmt: skip


def trim(wheel: Path, drop: list[str], keep: list[str]) -> None:
    def dropped(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in drop) and not any(fnmatch.fnmatch(name, p) for p in keep)

    with zipfile.ZipFile(wheel) as source:
        members = [(info, source.read(info)) for info in source.infolist() if not dropped(info.filename)]
    if len(members) == len(zipfile.ZipFile(wheel).infolist()):
        return  # already trimmed
    repacked = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(repacked, "w", zipfile.ZIP_DEFLATED) as out:
        for info, data in members:
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if not dropped(line.split(",")[0])) + "\n").encode()
            out.writestr(info, data)
    repacked.replace(wheel)


def main() -> int:
    download()
    for wheel in sorted(WHEELS.glob("*.whl")):
        for prefix, (drop, keep) in TRIM.items():
            if wheel.name.startswith(prefix):
                trim(wheel, drop, keep)
    total = sum(w.stat().st_size for w in WHEELS.glob("*.whl"))
    print(f"{WHEELS}: {len(list(WHEELS.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

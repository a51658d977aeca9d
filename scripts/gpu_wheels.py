#!/usr/bin/env python3
"""Fetch the wheels `scripts/gpu_check.sh` installs on a GPU machine with no network, into the ignored `.whl/`.

That machine (Python 3.12, torch 2.11 + CUDA 13, transformers, peft, accelerate: the packages listed in
scripts/gpu_image_packages.txt) lacks bitsandbytes, torchao, soundfile, soxr and silero-vad, and soundfile's own
cffi (with pycparser). Every pin's requirements, as its wheel states them (REQUIRES, checked against each download),
are met there or by another pin: tests/test_gpu_wheels.py proves it. A checkout travels there with its wheels
under 64 MiB in all, so two wheels are
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
PINS = ("bitsandbytes==0.50.2", "torchao==0.18.0", "soundfile==0.14.0", "soxr==1.1.0", "silero-vad==6.2.3",
        "cffi==2.1.1", "pycparser==3.12")  # fmt: skip
# each pin's Requires-Dist lines outside any extra, as its wheel's METADATA has them (verified on every download)
REQUIRES = {
    "bitsandbytes": ("torch<3,>=2.4", "numpy>=1.17", "packaging>=20.9"),
    "torchao": (),
    "soundfile": ("cffi >=1.0", "numpy", "typing-extensions"),
    "soxr": ("numpy",),
    "silero-vad": ("packaging", "torch>=1.12.0"),
    "cffi": ('pycparser; implementation_name != "PyPy"',),
    "pycparser": (),
}
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


def wheel_requirements(wheel: Path) -> tuple[str, ...]:
    """The Requires-Dist lines of `wheel` that no extra guards (what installing it needs)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(name).decode().splitlines()
    found = (line.partition(":")[2].strip() for line in lines if line.startswith("Requires-Dist:"))
    return tuple(r for r in found if "extra ==" not in r)


IMAGE_PACKAGES = ROOT / "scripts" / "gpu_image_packages.txt"
# the GPU machine's interpreter, for requirement markers
GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
              "platform_machine": "x86_64", "os_name": "posix", "extra": ""}  # fmt: skip


def image_packages(path: Path = IMAGE_PACKAGES) -> dict[str, str | None]:
    """The GPU image's packages: canonical name -> version (None where the list gives none)."""
    from packaging.utils import canonicalize_name

    packages = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            packages[canonicalize_name(name)] = version or None
    return packages


def unmet_requirements(pins=PINS, requires=REQUIRES, image: dict[str, str | None] | None = None) -> list[str]:
    """Each requirement of a pinned wheel that neither the GPU image nor another pin meets, as a sentence."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    available = dict(image_packages() if image is None else image)
    available.update({canonicalize_name(p.split("==")[0]): p.split("==")[1] for p in pins})
    unmet = []
    for pin in pins:
        for line in requires[pin.split("==")[0]]:
            needed = Requirement(line)
            if needed.marker is not None and not needed.marker.evaluate(GPU_PYTHON):
                continue
            have = available.get(canonicalize_name(needed.name), "missing")
            if have == "missing" or (have is not None and not needed.specifier.contains(have, prereleases=True)):
                unmet.append(f"{pin} needs {line}, and the GPU machine has {have}")
    return unmet


def check_requirements() -> None:
    """Each downloaded pin requires what REQUIRES says (so the closure test reads the truth), or this stops."""
    for pin in PINS:
        project = pin.split("==")[0]
        stem = project.replace("-", "_") + "-" + pin.split("==")[1] + "-"
        (wheel,) = [w for w in WHEELS.glob("*.whl") if w.name.lower().startswith(stem.lower())]
        if wheel_requirements(wheel) != REQUIRES[project]:
            sys.exit(f"{wheel.name} requires {wheel_requirements(wheel)}, REQUIRES says {REQUIRES[project]}: update it")


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
    check_requirements()
    for wheel in sorted(WHEELS.glob("*.whl")):
        for prefix, (drop, keep) in TRIM.items():
            if wheel.name.startswith(prefix):
                trim(wheel, drop, keep)
    total = sum(w.stat().st_size for w in WHEELS.glob("*.whl"))
    print(f"{WHEELS}: {len(list(WHEELS.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/gpu_wheels.py: the wheels it brings to the GPU machine (which has no network) need nothing it lacks.

soundfile 0.14 imports cffi's `_cffi_backend`; the GPU image has no cffi, so without the cffi and pycparser wheels
every test that reads audio failed there at import. This is the check that would have said so on the CPU.
"""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT


def _gpu_wheels():
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "scripts" / "gpu_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_wheel_needs_only_what_the_gpu_image_has_or_another_wheel_brings():
    wheels = _gpu_wheels()
    assert set(wheels.REQUIRES) == {pin.split("==")[0] for pin in wheels.PINS}
    assert wheels.unmet_requirements() == []


def test_without_the_cffi_wheels_soundfile_would_not_import_there():
    wheels = _gpu_wheels()
    image = wheels.image_packages()
    assert "torch" in image and "cffi" not in image and image["torch"] == "2.11.0"
    pins = tuple(p for p in wheels.PINS if not p.startswith(("cffi", "pycparser")))
    assert wheels.unmet_requirements(pins) == ["soundfile==0.14.0 needs cffi >=1.0, and the GPU machine has missing"]
    # a version the image has but a pin refuses counts too (bitsandbytes needs torch >= 2.4)
    old_torch = {**image, "torch": "2.3.0"}
    assert wheels.unmet_requirements(image=old_torch) == [
        "bitsandbytes==0.50.2 needs torch<3,>=2.4, and the GPU machine has 2.3.0"
    ]

"""salmonn_cli: local, offline audio understanding with SALMONN.

Importing this package imports no torch: the public functions load their heavy parts on first use.

    >>> import salmonn_cli
    >>> model = salmonn_cli.load_model(whisper=..., beats=..., llm=..., checkpoint=...)
    >>> model.generate(salmonn_cli.load_audio("clip.wav"), "What is happening?").text
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load_model",
    "load_audio",
    "SalmonnModel",
    "GenerationResult",
    "DecodeOptions",
    "ModelSettings",
]

# name -> module that defines it; resolved on first attribute access (PEP 562)
_LAZY = {
    "load_model": "salmonn_cli.loading",
    "load_audio": "salmonn_cli.audio",
    "SalmonnModel": "salmonn_cli.model.salmonn",
    "GenerationResult": "salmonn_cli.generate",
    "DecodeOptions": "salmonn_cli.decode_options",
    "ModelSettings": "salmonn_cli.model_file",
}

if TYPE_CHECKING:  # pragma: no cover
    from .audio import load_audio
    from .decode_options import DecodeOptions
    from .generate import GenerationResult
    from .loading import load_model
    from .model.salmonn import SalmonnModel
    from .model_file import ModelSettings


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'salmonn_cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value

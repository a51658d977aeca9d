"""Composing commands: each command declares only its own arguments; the model, decoding and output options
that every task shares are added to its signature here, once, so typer shows them on every command."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import fields

from .options import (
    BatchSizeOpt,
    BeamsOpt,
    BeatsOpt,
    CheckpointOpt,
    DecodeChoice,
    DeviceOpt,
    ForceOpt,
    FormatOpt,
    GlobOpt,
    InstructionOpt,
    LlmOpt,
    LoraScaleOpt,
    ManifestOpt,
    MaxTokensOpt,
    ModelChoice,
    ModelOpt,
    OfflineOpt,
    OutputDirOpt,
    OverwriteOpt,
    QuantBackendOpt,
    QuantOpt,
    RecursiveOpt,
    SeedOpt,
    TemperatureOpt,
    TopPOpt,
    VadOpt,
    WhisperOpt,
    WholeOpt,
)

MODEL_OPTIONS: dict[str, tuple[object, object]] = {
    "model": (ModelOpt, "salmonn-13b"),
    "whisper": (WhisperOpt, None),
    "beats": (BeatsOpt, None),
    "llm": (LlmOpt, None),
    "checkpoint": (CheckpointOpt, None),
    "quant": (QuantOpt, "auto"),
    "quant_backend": (QuantBackendOpt, "auto"),
    "device": (DeviceOpt, "auto"),
    "offline": (OfflineOpt, False),
}
DECODE_OPTIONS: dict[str, tuple[object, object]] = {
    "lora_scale": (LoraScaleOpt, None),
    "beams": (BeamsOpt, 4),
    "max_new_tokens": (MaxTokensOpt, 200),
    "temperature": (TemperatureOpt, 0.0),
    "top_p": (TopPOpt, 0.9),
    "seed": (SeedOpt, None),
}
TASK_OPTIONS: dict[str, tuple[object, object]] = {
    "instruction": (InstructionOpt, None),
    "force": (ForceOpt, False),
    "format": (FormatOpt, "text"),
    "output_dir": (OutputDirOpt, None),
    "overwrite": (OverwriteOpt, False),
    "recursive": (RecursiveOpt, False),
    "glob": (GlobOpt, None),
    "manifest": (ManifestOpt, None),
    "vad": (VadOpt, True),
    "batch_size": (BatchSizeOpt, 1),
}
WHOLE_OPTION: dict[str, tuple[object, object]] = {"whole": (WholeOpt, False)}


def with_options(*groups: dict[str, tuple[object, object]]) -> Callable[[Callable], Callable]:
    """Decorator: the wrapped function receives its own arguments plus one `options` dict of the groups'."""

    def decorate(func: Callable) -> Callable:
        hints = {k: v for k, v in typing.get_type_hints(func, include_extras=True).items() if k != "options"}
        # resolved annotations, not the strings `from __future__ import annotations` leaves in the signature
        own = [p.replace(annotation=hints[n]) for n, p in inspect.signature(func).parameters.items() if n != "options"]
        shared = {name: spec for group in groups for name, spec in group.items()}

        def command(**kwargs):
            options = {name: kwargs.pop(name) for name in shared}
            return func(options=options, **kwargs)

        extra = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
            for n, (a, d) in shared.items()
        ]
        command.__signature__ = inspect.Signature([*own, *extra])
        command.__annotations__ = {**hints, **{name: annotation for name, (annotation, _) in shared.items()}}
        command.__name__, command.__doc__ = func.__name__, func.__doc__
        return command

    return decorate


def model_choice(options: dict) -> ModelChoice:
    return ModelChoice(**{f.name: options[f.name] for f in fields(ModelChoice)})


def decode_choice(options: dict) -> DecodeChoice:
    return DecodeChoice(**{f.name: options[f.name] for f in fields(DecodeChoice)})

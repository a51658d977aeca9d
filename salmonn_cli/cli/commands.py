"""Composing commands: each command declares only its own arguments; the model, decoding and output options
that every task shares are added to its signature here, once, so typer shows them on every command."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import fields

from ..decode_options import DecodeOptions
from ..longform import LongformSettings
from .options import (
    BatchSizeOpt,
    BeamsOpt,
    BeatsOpt,
    CheckpointOpt,
    CompileOpt,
    DecodeChoice,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    FormatOpt,
    GlobOpt,
    GpusOpt,
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

_MODEL = ModelChoice()
MODEL_OPTIONS: dict[str, tuple[object, object]] = {
    "model": (ModelOpt, _MODEL.model),
    "whisper": (WhisperOpt, _MODEL.whisper),
    "beats": (BeatsOpt, _MODEL.beats),
    "llm": (LlmOpt, _MODEL.llm),
    "checkpoint": (CheckpointOpt, _MODEL.checkpoint),
    "quant": (QuantOpt, _MODEL.quant),
    "quant_backend": (QuantBackendOpt, _MODEL.quant_backend),
    "device": (DeviceOpt, _MODEL.device),
    "dtype": (DtypeOpt, _MODEL.dtype),
    "offline": (OfflineOpt, _MODEL.offline),
    "compile": (CompileOpt, _MODEL.compile),
}
_DECODE = DecodeOptions()
NO_SAMPLING = 0.0  # --temperature 0: the original's deterministic decoding
DECODE_OPTIONS: dict[str, tuple[object, object]] = {
    "lora_scale": (LoraScaleOpt, None),
    "beams": (BeamsOpt, _DECODE.num_beams),
    "max_new_tokens": (MaxTokensOpt, _DECODE.max_new_tokens),
    "temperature": (TemperatureOpt, NO_SAMPLING),
    "top_p": (TopPOpt, _DECODE.top_p),
    "seed": (SeedOpt, None),
}
_LONGFORM = LongformSettings()
TASK_OPTIONS: dict[str, tuple[object, object]] = {
    "instruction": (InstructionOpt, None),
    "force": (ForceOpt, _LONGFORM.force),
    "format": (FormatOpt, "text"),
    "output_dir": (OutputDirOpt, None),
    "overwrite": (OverwriteOpt, False),
    "recursive": (RecursiveOpt, False),
    "glob": (GlobOpt, None),
    "manifest": (ManifestOpt, None),
    "vad": (VadOpt, _LONGFORM.vad),
    "batch_size": (BatchSizeOpt, _LONGFORM.batch_size),
    "gpus": (GpusOpt, None),
}
WHOLE_OPTION: dict[str, tuple[object, object]] = {"whole": (WholeOpt, _LONGFORM.whole)}


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
    """The model options a command took (one that takes fewer, as finetune, gets the defaults of the rest)."""
    return ModelChoice(**{f.name: options[f.name] for f in fields(ModelChoice) if f.name in options})


def sampling_fields(temperature: float) -> dict[str, object]:
    """`DecodeOptions` fields for a temperature as users give it: 0 is no sampling, above 0 samples at it."""
    sampling = temperature > NO_SAMPLING
    return {"do_sample": sampling, "temperature": temperature if sampling else _DECODE.temperature}


def decode_choice(options: dict) -> DecodeChoice:
    """The decoding options as one `DecodeOptions` (`--temperature` as `sampling_fields` reads it)."""
    decode = DecodeOptions(
        max_new_tokens=options["max_new_tokens"],
        num_beams=options["beams"],
        top_p=options["top_p"],
        **sampling_fields(options["temperature"]),
    )
    return DecodeChoice(decode, seed=options["seed"], lora_scale=options["lora_scale"])

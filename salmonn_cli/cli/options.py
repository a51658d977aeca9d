"""Option types shared by the commands (typer `Annotated` aliases) and the settings they add up to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..decode_options import DecodeOptions
from ..model_file import BUILTIN_DEFAULT

MODEL_PANEL = "Model"
DECODE_PANEL = "Decoding"
OUTPUT_PANEL = "Output"

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="salmonn-13b, salmonn-7b, or a model .toml file.", rich_help_panel=MODEL_PANEL),
]
WhisperOpt = Annotated[
    Optional[Path], typer.Option(help="Whisper folder (overrides the model's).", rich_help_panel=MODEL_PANEL)
]
BeatsOpt = Annotated[
    Optional[Path], typer.Option(help="BEATs .pt file (overrides the model's).", rich_help_panel=MODEL_PANEL)
]
LlmOpt = Annotated[
    Optional[Path], typer.Option(help="LLaMA/Vicuna folder (overrides the model's).", rich_help_panel=MODEL_PANEL)
]
CheckpointOpt = Annotated[
    Optional[Path], typer.Option(help="SALMONN .pth checkpoint (overrides the model's).", rich_help_panel=MODEL_PANEL)
]
QuantOpt = Annotated[
    str,
    typer.Option(
        "--quant",
        "-q",
        help="LLM weights: auto, 4bit, 8bit or none (the encoders are never quantised).",
        rich_help_panel=MODEL_PANEL,
    ),
]
QuantBackendOpt = Annotated[
    str,
    typer.Option(
        help="auto (CUDA: torchao int4/int8 where installed on compute capability 8.0+, else bitsandbytes;"
        " CPU/MPS: optimum-quanto), bitsandbytes, quanto or torchao.",
        rich_help_panel=MODEL_PANEL,
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", "-d", help="auto, cpu, cuda or cuda:N.", rich_help_panel=MODEL_PANEL)
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto, float32, bfloat16 or float16: the encoders and an unquantised LLM (auto: float16 on CUDA, float32"
        " on CPU, the reference-parity dtype; quantised LLMs on CPU run in bfloat16).",
        rich_help_panel=MODEL_PANEL,
    ),
]
CompileOpt = Annotated[
    str,
    typer.Option(
        "--compile",
        help="Compile the decode step (torch.compile): auto (on a GPU, for servers, live, many files and long audio,"
        " and for one clip when this machine compiled it before), on or off.",
        rich_help_panel=MODEL_PANEL,
    ),
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Never touch the network; use only the cache (also HF_HUB_OFFLINE=1).",
        rich_help_panel=MODEL_PANEL,
    ),
]
LoraScaleOpt = Annotated[
    Optional[float],
    typer.Option(
        min=0.0,  # the paper's knob runs from 0 (LoRA off) up; a negative scale subtracts the adapter: refused
        help="LoRA scaling for this run, >= 0 (trained: 4.0; ~2.0 wakes story-telling, QA and translation; 0 = off).",
        rich_help_panel=DECODE_PANEL,
    ),
]
BeamsOpt = Annotated[int, typer.Option("--beams", min=1, help="Beam width.", rich_help_panel=DECODE_PANEL)]
MaxTokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", min=1, help="Longest answer, in tokens.", rich_help_panel=DECODE_PANEL)
]
TemperatureOpt = Annotated[
    float,
    typer.Option(
        min=0.0,
        help="0 = deterministic (the original's); > 0 samples at this temperature.",
        rich_help_panel=DECODE_PANEL,
    ),
]
TopPOpt = Annotated[
    float,
    typer.Option(
        min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature > 0).", rich_help_panel=DECODE_PANEL
    ),
]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed (for sampling).", rich_help_panel=DECODE_PANEL)]
FormatOpt = Annotated[
    str,
    typer.Option("--format", "-f", help="text, or json (one object per input per line).", rich_help_panel=OUTPUT_PANEL),
]
InstructionOpt = Annotated[
    Optional[str], typer.Option(help="Use this instruction instead of the task's own.", rich_help_panel=DECODE_PANEL)
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Run the model even on silent audio.", rich_help_panel=DECODE_PANEL)
]
INPUT_PANEL = "Inputs and long audio"
OutputDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--output-dir",
        "-o",
        help="One output file per input here, plus results.jsonl; re-runs skip inputs already done.",
        rich_help_panel=OUTPUT_PANEL,
        readable=False,
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Redo inputs whose output already exists.", rich_help_panel=OUTPUT_PANEL)
]
RecursiveOpt = Annotated[
    bool, typer.Option("--recursive", "-r", help="Look for audio in sub-folders too.", rich_help_panel=INPUT_PANEL)
]
GlobOpt = Annotated[
    Optional[str], typer.Option(help="File pattern inside folders, e.g. '*.flac'.", rich_help_panel=INPUT_PANEL)
]
ManifestOpt = Annotated[
    Optional[Path],
    typer.Option(
        help='A file listing inputs: one path per line, or jsonl with "audio" and "instruction".',
        rich_help_panel=INPUT_PANEL,
        readable=False,
    ),
]
VadOpt = Annotated[
    bool,
    typer.Option(
        "--vad/--no-vad", help="Cut long audio at pauses (silero-vad) or every 30 s.", rich_help_panel=INPUT_PANEL
    ),
]
BatchSizeOpt = Annotated[
    int, typer.Option(min=1, help="Segments decoded together (faster on a GPU).", rich_help_panel=INPUT_PANEL)
]
GpusOpt = Annotated[
    Optional[str],
    typer.Option(
        "--gpus",
        help="Run on several GPUs: a list (0,1,2,3) or all; one process and model copy per GPU, the inputs "
        "shared among them (needs -o). The same as torchrun --nproc_per_node N -m salmonn_cli ...",
        rich_help_panel=INPUT_PANEL,
    ),
]
WholeOpt = Annotated[
    bool,
    typer.Option(
        "--whole",
        help="Long audio: one answer about all segments together (within the LLM's "
        "context) instead of one per segment.",
        rich_help_panel=INPUT_PANEL,
    ),
]
# readable=False on input and output paths: click's own check is a usage error of three lines (exit 2); ours,
# in probe.py and OutputPlan, is one line with the input's or the output's exit code, before the model loads
FilesArg = Annotated[
    list[Path], typer.Argument(help="Audio files (wav, flac, ogg, mp3, ...).", show_default=False, readable=False)
]
FileArg = Annotated[Path, typer.Argument(help="Audio file.", show_default=False, readable=False)]
OptionalFilesArg = Annotated[
    Optional[list[Path]],
    typer.Argument(help="Audio files or folders (or use --manifest).", show_default=False, readable=False),
]


@dataclass(frozen=True)
class ModelChoice:
    """Which model to load and how."""

    model: str = BUILTIN_DEFAULT
    whisper: Path | None = None
    beats: Path | None = None
    llm: Path | None = None
    checkpoint: Path | None = None
    quant: str = "auto"
    quant_backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    offline: bool = False
    compile: str = "auto"  # the decode step: step_compile.COMPILE_MODES


@dataclass(frozen=True)
class DecodeChoice:
    """How to decode, as the user asked: the decoding settings, the seed of sampling and the LoRA scale."""

    options: DecodeOptions = DecodeOptions()
    seed: int | None = None
    lora_scale: float | None = None  # None: the task's own, else the model's trained scaling

    def scale_for(self, task_scale: float | None) -> float | None:
        """The LoRA scale a task runs at: the user's, else the task's (None: the model's trained scaling)."""
        return self.lora_scale if self.lora_scale is not None else task_scale

"""How far each CPU precision is from float32, on the reference cases' tiny components (`tests/data/reference`).

For every case: the audio tokens with the encoders in bfloat16 against float32 (the largest difference, relative to
the largest float32 value, and the lowest per-token cosine), and the first-step logits of every `--dtype` /
`--quant` placement against float32's (cosine). Speed at real sizes is the benchmark's (`scripts/bench.py`);
this is the other half of the CPU default's rule: how much precision each mode gives up.

    python -m benchmarks.precision [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACEMENTS = (("float32", "none"), ("bfloat16", "none"), ("float32", "8bit"), ("float32", "4bit"))  # (dtype, quant)


@dataclass(frozen=True)
class CaseResult:
    case: str
    audio_tokens_bf16_max_rel: float  # max |bf16 - fp32| / max |fp32| over the audio tokens
    audio_tokens_bf16_min_cosine: float  # the lowest cosine of one audio token to its float32 self
    first_logits_cosine: dict[str, float]  # "dtype/quant" -> cosine of the first-step logits to float32's


def _load(case, dtype: str, quant: str):
    import torch

    import salmonn_cli

    opts, c = case.meta["model_options"], case.components
    return salmonn_cli.load_model(
        c / "whisper", c / "beats.pt", c / "llm", c / "salmonn.pth", dtype=getattr(torch, dtype), quantization=quant,
        second_per_window=opts["second_per_window"], second_stride=opts["second_stride"],
        qformer_heads=opts["qformer"]["num_attention_heads"], lora_scale=opts["lora_alpha"] / opts["lora_rank"],
    )  # fmt: skip


def measure_case(case) -> CaseResult:
    import torch

    import salmonn_cli

    waveform = salmonn_cli.load_audio(case.audio_path)
    tokens, logits = {}, {}
    for dtype, quant in PLACEMENTS:
        model = _load(case, dtype, quant)
        with torch.inference_mode():
            audio = model.audio_tokens(waveform)
            tokens[dtype, quant] = audio.float()
            logits[dtype, quant] = model.next_token_logits(model.inputs_embeds(audio, case.meta["prompt"])).float()
    fp32, bf16 = tokens["float32", "none"], tokens["bfloat16", "none"]
    per_token = torch.nn.functional.cosine_similarity(bf16.flatten(0, -2), fp32.flatten(0, -2), dim=-1)
    reference = logits["float32", "none"].flatten()
    return CaseResult(
        case=case.name,
        audio_tokens_bf16_max_rel=float((bf16 - fp32).abs().max() / fp32.abs().max()),
        audio_tokens_bf16_min_cosine=float(per_token.min()),
        first_logits_cosine={
            f"{dtype}/{quant}": float(torch.nn.functional.cosine_similarity(value.flatten(), reference, dim=0))
            for (dtype, quant), value in logits.items()
        },
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.reference import case_paths, load_case

    results = [measure_case(load_case(path)) for path in case_paths()]
    print("| case | audio tokens bf16: max rel. diff | min token cosine | "
          + " | ".join(f"logits cosine {d}/{q}" for d, q in PLACEMENTS[1:]) + " |")  # fmt: skip
    print("|---" * (3 + len(PLACEMENTS) - 1) + "|")
    for r in results:
        cosines = " | ".join(f"{r.first_logits_cosine[f'{d}/{q}']:.6f}" for d, q in PLACEMENTS[1:])
        print(f"| {r.case} | {r.audio_tokens_bf16_max_rel:.2e} | {r.audio_tokens_bf16_min_cosine:.6f} | {cosines} |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`salmonn train` on tiny components: tiny WavLM + tiny LLaMA and tiny WavLM + tiny T5 through SpeechVerse's
conv connector, tiny Whisper + BEATs + LLaMA through SALMONN's Q-Former; espeak speech with known text.

The tiny LLMs are first trained on the sentences' text (scripts/make_tiny_train_parts.py --corpus): a random LLM
hardly depends on its input, so only a language model can be taught to listen.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import jiwer
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, make_tiny
from tests.speech import SENTENCES, espeak
from tests.test_finetune import run_cli, salmonn_command

CLIPS = SENTENCES[:4]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    tiny = make_tiny(root / "tiny")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    script = ROOT / "scripts" / "make_tiny_train_parts.py"
    subprocess.run([sys.executable, str(script), str(tiny), "--corpus", str(corpus)], check=True, capture_output=True)
    data = root / "data"
    data.mkdir()
    lines = []
    for i, text in enumerate(CLIPS):
        sf.write(data / f"s{i}.wav", espeak(text), 16000)
        lines.append(json.dumps({"audio": f"s{i}.wav", "task": "transcribe", "response": text.lower()}))
    (data / "asr.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_recipe(root: Path, kind: str, *, save_every: int = 100) -> Path:
    """A two-stage recipe (one for the SALMONN kind): stage 1 the connector alone, stage 2 with LoRA."""
    tiny = root / "tiny"
    if kind == "salmonn":
        head = f"""
[[encoders]]
kind = "whisper"
path = "{tiny / 'whisper'}"
[[encoders]]
kind = "beats"
path = "{tiny / 'beats.pt'}"
[connector]
kind = "qformer"
qformer_hidden = 64
qformer_layers = 1
[llm]
path = "{tiny / 'llm_text'}"
"""
        first = '["connector"]'
    else:
        llm = tiny / ("t5" if kind == "t5" else "llm_text")
        head = f"""
[[encoders]]
kind = "wavlm"
path = "{tiny / 'wavlm'}"
[connector]
kind = "conv"
layers = "weighted"
strides = [2, 2]
[llm]
path = "{llm}"
"""
        first = '["connector", "layer_weights"]'
    second = '["connector", "lora"]' if kind == "salmonn" else '["connector", "layer_weights", "lora"]'
    stage = """
[[stages]]
name = "{name}"
train = {train}
data = "data/asr.jsonl"
lr = {lr}
steps = 60
batch_size = 4
save_every = {save_every}
"""
    text = f'name = "tiny-{kind}"\nseed = 0\n{head}\n[lora]\nrank = 4\nalpha = 8\ndropout = 0.0\n'
    text += stage.format(name="align", train=first, lr=1e-2, save_every=save_every)
    text += stage.format(name="all", train=second, lr=5e-3 if kind == "salmonn" else 1e-2, save_every=save_every)
    path = root / f"{kind}-{save_every}.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(parts) -> dict:
    """Each kind trained once, uninterrupted, through the command: {kind: (out folder, completed process)}."""
    done = {}
    for kind in ("llama", "t5", "salmonn"):
        out = parts / f"out-{kind}"
        done[kind] = (out, run_cli("train", write_recipe(parts, kind), "-o", out, "--device", "cpu", timeout=600))
    return done


def transcripts(model_file: Path, root: Path) -> list[str]:
    clips = [root / "data" / f"s{i}.wav" for i in range(len(CLIPS))]
    done = run_cli("transcribe", *clips, "--model", model_file, "--device", "cpu", "--beams", "1",
                   "--max-new-tokens", "24", "-f", "json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [json.loads(line)["text"] for line in done.stdout.splitlines()]


def cer(hypotheses: list[str]) -> float:
    return jiwer.cer([t.lower() for t in CLIPS], [h or "-" for h in hypotheses])


@pytest.mark.parametrize("kind", ["llama", "t5", "salmonn"])
def test_each_stage_halves_its_loss_and_the_result_answers_through_the_cli(runs, parts, kind):
    out, done = runs[kind]
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "train.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["align", "all"]
    for stage in record["stages"]:
        assert stage["final_loss"] < stage["first_loss"] / 2, (stage["stage"], stage["losses"])
    answers = transcripts(out / "model.toml", parts)  # every kind answers through the CLI
    assert len(answers) == len(CLIPS) and all(answers), answers


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_stage_one_trains_only_its_parts_and_moves_the_transcripts_towards_the_truth(runs, parts, kind):
    from salmonn_cli.train.composed_file import load_composed, read_composed_file, trained_tensors

    out, done = runs[kind]
    assert done.returncode == 0, done.stderr
    spec = read_composed_file(out / "stages" / "align" / "model.toml")
    paths = {"encoder_path": spec.encoder.component.path, "llm_path": spec.llm.path}
    from dataclasses import replace

    fresh, _ = load_composed(replace(spec, weights=None), device="cpu", dtype=torch.float32, **paths)
    before = trained_tensors(fresh)
    aligned = load_file(str(out / "stages" / "align" / "weights.safetensors"))
    final = load_file(str(out / "stages" / "all" / "weights.safetensors"))
    for key, tensor in before.items():
        if key.startswith("llm."):  # LoRA is not a stage-1 part: bit-identical to the fresh adapter
            assert torch.equal(aligned[key], tensor), key
        else:
            assert not torch.equal(aligned[key], tensor), key
    assert any(not torch.equal(final[k], aligned[k]) for k in aligned if ".lora_B." in k)  # stage 2 trains LoRA
    untrained = [fresh.generate(_wave(parts, i), "Recognize the speech and give me the transcription.",
                                num_beams=1, max_new_tokens=24).text for i in range(len(CLIPS))]  # fmt: skip
    aligned_model, _ = load_composed(spec, device="cpu", dtype=torch.float32, **paths)
    trained = [aligned_model.generate(_wave(parts, i), "Recognize the speech and give me the transcription.",
                                      num_beams=1, max_new_tokens=24).text for i in range(len(CLIPS))]  # fmt: skip
    print(f"{kind}: stage-1 CER {cer(untrained):.3f} -> {cer(trained):.3f}")  # for the record (pytest -s)
    assert cer(trained) < cer(untrained) - 0.1, (untrained, trained)


def _wave(root: Path, i: int):
    from salmonn_cli.audio import load_audio

    return load_audio(root / "data" / f"s{i}.wav")


def test_a_salmonn_recipe_result_is_a_published_format_checkpoint(runs):
    from salmonn_cli.checkpoint import read_salmonn_checkpoint
    from salmonn_cli.model_file import load_model_spec

    out, done = runs["salmonn"]
    assert done.returncode == 0, done.stderr
    spec = load_model_spec(str(out / "model.toml"))
    assert spec.checkpoint.path == out / "stages" / "all" / "salmonn.pth"
    ckpt = read_salmonn_checkpoint(spec.checkpoint.path)  # original key names, every one accounted for
    assert ckpt.lora and ckpt.connector_shape.llm_hidden == 64
    first = read_salmonn_checkpoint(out / "stages" / "align" / "salmonn.pth")
    fresh = read_salmonn_checkpoint(out / "init" / "salmonn.pth")
    assert all(torch.equal(first.lora[k], fresh.lora[k]) for k in fresh.lora)  # stage 1 left LoRA as it was
    assert not torch.equal(first.connector["proj.weight"], fresh.connector["proj.weight"])


def test_sigkill_at_a_random_step_then_resume_ends_with_the_uninterrupted_weights(runs, parts):
    straight, done = runs["llama"]
    assert done.returncode == 0, done.stderr
    recipe = write_recipe(parts, "llama", save_every=1)
    kill_after = random.SystemRandom().randint(1, 119)  # a save in stage 1 (steps 1-60) or stage 2 (61-120)
    out = parts / "killed"
    proc = subprocess.Popen(salmonn_command("train", recipe, "-o", out, "--device", "cpu"), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    saves = 0
    for line in proc.stderr:
        saves += line.startswith("saved state at step")
        if saves == kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before save {kill_after}"
    resumed = run_cli("train", recipe, "-o", out, "--device", "cpu", "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    for stage in ("align", "all"):
        want = load_file(str(straight / "stages" / stage / "weights.safetensors"))
        got = load_file(str(out / "stages" / stage / "weights.safetensors"))
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), f"killed after save {kill_after}: {stage} differs"


def test_recipes_print_and_bad_input_is_one_line_before_anything_loads(parts, tmp_path):
    from salmonn_cli.train.recipe import builtin_recipe_text, builtin_recipes, load_recipe

    for name in builtin_recipes():
        printed = run_cli("train", "--recipe", name, "--print")
        assert printed.returncode == 0 and printed.stdout == builtin_recipe_text(name)
        (tmp_path / f"{name}.toml").write_text(printed.stdout)
        assert len(load_recipe(tmp_path / f"{name}.toml").stages) == 3
    recipe = write_recipe(parts, "llama").read_text()
    bad_part = tmp_path / "bad_part.toml"
    bad_part.write_text(recipe.replace('["connector", "layer_weights"]', '["connector", "ears"]'))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "asr.jsonl").write_text('{"audio": "nowhere.wav", "task": "transcribe", "response": "x"}\n')
    bad_data = tmp_path / "bad_data.toml"
    bad_data.write_text(recipe)
    for path, expected in ((bad_part, "key 'stages[0].train'"), (bad_data, "asr.jsonl:1")):
        done = run_cli("train", path, "-o", tmp_path / f"out-{path.stem}", "--device", "cpu")
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not (tmp_path / f"out-{path.stem}" / "stages").exists()

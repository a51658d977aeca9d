#!/usr/bin/env bash
# The GPU check: one prepared run that finishes within 8 minutes on one H200 (any CUDA GPU with ~40 GB free).
#
#   python scripts/gpu_wheels.py          # once, on a machine with network: the wheels the GPU machine lacks
#   bash scripts/gpu_check.sh [OUT_DIR]   # on the GPU machine (no network needed); OUT_DIR default $OUT or /tmp/...
#
# For a machine with torch, transformers, peft and accelerate but not bitsandbytes, torchao, soundfile, soxr or
# silero-vad: it installs those from .whl/ into /tmp/site, runs the checkout without installing it (PYTHONPATH,
# and a `salmonn` shim on PATH), then:
#   1. `pytest -m gpu` (tests/test_gpu.py), JUnit XML in OUT_DIR;
#   2. the bench on random-weight SALMONN-7B, drawn on the GPU (no 27 GB files): bitsandbytes NF4 and torchao int4,
#      each with captured and eager decode, 10 minutes of audio through batched transcription, `live` at real-time
#      pace, and Qwen2-Audio-7B (NF4, transformers' generate) in the same run;
#   3. the same on SALMONN-13B without live and the peer.
# Time limits (seconds): wheels ~15, tests 100, 7B 225 (each of its three runs 70), 13B 120 (each run 55): 460 in
# all. Each part has its own time limit (a configuration stops at the bench's --timeout and keeps what it measured), so
# one slow part cannot eat the rest. The last thing printed is one markdown table (benchmarks/gpu_report.py).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/salmonn-gpu-check}}
mkdir -p "$out"
began=$(date +%s)
elapsed() { echo $(( $(date +%s) - began )); }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the wheels in .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check: no wheels in .whl/ (python scripts/gpu_wheels.py): using what is installed" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p /tmp/salmonn-bin
printf '#!/bin/sh\nexec python3 -m salmonn_cli.cli.app "$@"\n' > /tmp/salmonn-bin/salmonn
chmod +x /tmp/salmonn-bin/salmonn
export PATH="/tmp/salmonn-bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" \
  | tee -a "$out/gpu.txt"

echo "== [$(elapsed) s] pytest -m gpu"
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py --junitxml "$out/gpu-tests.xml" \
  > "$out/gpu-tests.log" 2>&1
echo "pytest exit $?"; tail -n 25 "$out/gpu-tests.log"

# the bench's options shared by both shapes: few repeats (the medians of 2 runs after a warm-up), 32 new tokens,
# 600 s of audio in batches of 16
common=(--device cuda --quant 4bit --backend bitsandbytes,torchao --repeat 2 --warmup 1 --new-tokens 32
        --long-seconds 600 --batch-size 16 --skip help --markdown)

echo "== [$(elapsed) s] bench salmonn-7b"
timeout 225 python3 scripts/bench.py --shape salmonn-7b "${common[@]}" --live-seconds 15 --peer qwen2-audio \
  --timeout 70 --json "$out/bench-salmonn-7b.json" > "$out/bench-salmonn-7b.log" 2>&1
echo "bench exit $?"

echo "== [$(elapsed) s] bench salmonn-13b"
timeout 120 python3 scripts/bench.py --shape salmonn-13b "${common[@]}" --skip help,live \
  --timeout 55 --json "$out/bench-salmonn-13b.json" > "$out/bench-salmonn-13b.log" 2>&1
echo "bench exit $?"

echo "== [$(elapsed) s] done; logs and JSON in $out"
python3 -m benchmarks.gpu_report "$out" salmonn-7b salmonn-13b | tee "$out/table.md"

#!/usr/bin/env bash
# The GPU check: one prepared run that finishes within 8 minutes on one H100 (80 GB) or H200 (any CUDA GPU with
# ~40 GB free).
#
#   python scripts/gpu_wheels.py          # once, on a machine with network: the wheels the GPU machine lacks
#   bash scripts/gpu_check.sh [OUT_DIR]   # on the GPU machine (no network needed); OUT_DIR default $OUT or /tmp/...
#
# For a machine with torch, transformers, peft and accelerate but not bitsandbytes, torchao, soundfile (and its cffi),
# soxr or silero-vad: it installs those from .whl/ into /tmp/site, runs the checkout without installing it
# (PYTHONPATH, and a `salmonn` shim on PATH), then:
#   1. `pytest -m gpu` (tests/test_gpu.py: parity through the recorded and the compiled step, one eager masked step
#      per backend under torch.cuda.set_sync_debug_mode("error"), ...), JUnit XML in OUT_DIR;
#   2. the bench on random-weight SALMONN-13B (4-bit weights drawn on the GPU, no 26 GB files), torchao int4 then
#      bitsandbytes NF4, each decode speed timed compiled (and recorded), recorded, and eager, with the compile's start
#      cost; TTFT, and an hour's worth of batched transcription rate from 10 minutes of audio (recorded, uncompiled:
#      each new batch shape would be another compile);
#   3. SALMONN-7B with both backends, recorded and eager only, `live` at real-time pace, and Qwen2-Audio-7B (NF4,
#      transformers' generate) in the same run.
# Time limits (seconds): wheels ~15, tests 100, 13B torchao 170, 13B bitsandbytes 110, 7B 80: 475 in all. Each part
# has its own limit (a configuration stops at the bench's --timeout and keeps what it measured, decode speed first),
# so one slow part cannot eat the rest. OUT_DIR gets 8 files (what the device tool brings back): gpu.txt, the tests'
# XML and log, the three bench JSONs, their one log and the table. The last thing printed is one markdown table
# (benchmarks/gpu_report.py).
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
# compiled steps are kept in $out's sibling for the run (a fresh machine has none: every start cost is the first)
export PATH="/tmp/salmonn-bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  SALMONN_COMPILE_CACHE=/tmp/salmonn-compile
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" \
  | tee -a "$out/gpu.txt"

echo "== [$(elapsed) s] pytest -m gpu"
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py --junitxml "$out/gpu-tests.xml" \
  > "$out/gpu-tests.log" 2>&1
echo "pytest exit $?"; tail -n 25 "$out/gpu-tests.log"

# the bench's options shared by every part: few repeats (the medians of 2 runs after a warm-up), 32 new tokens,
# 600 s of audio in batches of 16; measurements other than decode speed run recorded, uncompiled
common=(--device cuda --quant 4bit --repeat 2 --warmup 1 --new-tokens 32 --long-seconds 600 --batch-size 16
        --compile off --markdown)

echo "== [$(elapsed) s] bench salmonn-13b torchao"
timeout 170 python3 scripts/bench.py --shape salmonn-13b --backend torchao "${common[@]}" --skip help,stages,ask,live \
  --timeout 160 --json "$out/bench-salmonn-13b-torchao.json" >> "$out/bench.log" 2>&1
echo "bench exit $?"

echo "== [$(elapsed) s] bench salmonn-13b bitsandbytes"
timeout 110 python3 scripts/bench.py --shape salmonn-13b --backend bitsandbytes "${common[@]}" \
  --skip help,stages,live,long_audio,ask --timeout 100 --json "$out/bench-salmonn-13b-bitsandbytes.json" \
  >> "$out/bench.log" 2>&1
echo "bench exit $?"

echo "== [$(elapsed) s] bench salmonn-7b"
timeout 80 python3 scripts/bench.py --shape salmonn-7b --backend bitsandbytes,torchao "${common[@]}" \
  --step-ways graph,eager --skip help,stages,ask,long_audio --live-seconds 15 --peer qwen2-audio --timeout 25 \
  --json "$out/bench-salmonn-7b.json" >> "$out/bench.log" 2>&1
echo "bench exit $?"

echo "== [$(elapsed) s] done; logs and JSON in $out"
python3 -m benchmarks.gpu_report "$out" salmonn-13b-torchao salmonn-13b-bitsandbytes salmonn-7b | tee "$out/table.md"

#!/usr/bin/env bash
# The prepared device check of the GPU path (issue 5), for a session that is lent a GPU:
#   device run: bash benchmarks/gpu_check.sh            (about 5-8 minutes on one H200)
# 1. the static-step and draft-tree tests, including the CUDA-graph tests (block and tree steps)
#    that are skipped on CPUs;
# 2. the synthetic bench on a random Qwen3-8B-shaped target in bf16, CUDA graphs on and off
#    (A/B in one session: tau, tokens/s, speedup over plain decoding, efficiency, verify cost).
# Everything lands under $OUT (the device tool's folder) or results/gpu-check.
# Runs from the source tree (no install: the device machine cannot reach PyPI; its image has
# torch, transformers, safetensors, tqdm, pytest). versions.txt records what ran.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" SPECFLASH_HOME="${TMPDIR:-/tmp}/specflash-home"
OUT="${OUT:-results/gpu-check}"
mkdir -p "$OUT"
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())
PY
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_static_steps.py tests/test_lean_forward.py \
    tests/test_tree_verify.py tests/test_tree_decode.py 2>&1 \
    | tail -n 40 | tee "$OUT/tests.log"
for mode in on off; do
    timeout 300 python3 -m specflash.cli bench --synthetic qwen3-8b --device cuda --static-steps "$mode" \
        --accept 0.8,0.95 --synthetic-blocks 16,auto --num-prompts 2 --max-new-tokens 128 \
        --out "$OUT/synthetic-$mode" 2>&1 | tail -n 25 | tee "$OUT/synthetic-$mode.log"
done

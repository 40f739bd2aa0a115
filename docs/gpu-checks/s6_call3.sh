#!/bin/bash
# Session 6, device call 3: refill on and off on caption-natural (issue 17), video (1B), the 8B shape on
# caption-7tile in bf16 (no slower than before), and batchvl serve against batchvl run (issue 18).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=.:/tmp/site || exit 1
export PYTHONUNBUFFERED=1
B="python3 -m batchvl bench -q --workdir /tmp"
timeout 130 $B --shape internvl2-1b --workload caption-natural --rows 512 --batch 128 --warmup-rows 128 \
  --variant refill:refill=true 2>&1 | grep -v Warning | tee "$OUT/natural.log"
timeout 90 $B --shape internvl2-1b --workload video --rows 512 --batch 128 --warmup-rows 128 2>&1 \
  | grep -v Warning | tee "$OUT/video.log"
timeout 170 python3 docs/gpu-checks/serve_bench.py 512 128 2>&1 | grep -v Warning | tee "$OUT/serve.log"
timeout 180 $B --shape internvl3-8b --workload caption-7tile --rows 512 --batch 64 --warmup-rows 64 2>&1 \
  | grep -v Warning | tee "$OUT/8b.log"

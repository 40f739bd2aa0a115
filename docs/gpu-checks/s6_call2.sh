#!/bin/bash
# Session 6, device call 2 (issue 17): the vision tower as the engine now runs it, exact and fused GELU, against
# float32; then the 1B pipeline on caption-7tile (default, fused GELU) and mixed (threads, 14 processes).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=.:/tmp/site || exit 1
export PYTHONUNBUFFERED=1
git log --oneline -1 2>/dev/null
timeout 150 python3 docs/gpu-checks/vision_probe2.py 6b 2>&1 | grep -v Warning | tee "$OUT/vision2.log"
B="python3 -m batchvl bench -q --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workdir /tmp"
timeout 200 $B --workload caption-7tile --variant fg:fused_vision_gelu=true 2>&1 | grep -v Warning | tee "$OUT/1b-7tile.log"
timeout 200 $B --workload mixed --variant p14:media.prepare_processes=14 2>&1 | grep -v Warning | tee "$OUT/1b-mixed.log"

#!/bin/bash
# Session 7, device call 3 (issue 17): the 1B engine alone, quiet and beside 14 busy Python threads (where the
# pipeline's time goes); the 8B shape on caption-7tile in bf16 against transformers in the same run; refill on
# caption-natural after one-pass admission.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=.:/tmp/site || exit 1
export PYTHONUNBUFFERED=1
timeout 140 python3 docs/gpu-checks/engine_probe.py 4 2>&1 | grep -v Warning | tee "$OUT/engine.log"
B="python3 -m batchvl bench -q --workdir /tmp"
timeout 290 $B --shape internvl3-8b --workload caption-7tile --rows 512 --batch 64 --warmup-rows 64 --no-save \
  --baseline transformers --baseline-rows 64 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/8b.log"
timeout 150 $B --shape internvl2-1b --workload caption-natural --rows 512 --batch 128 --warmup-rows 128 \
  --variant refill:refill=true 2>&1 | grep -v Warning | tee "$OUT/natural.log"

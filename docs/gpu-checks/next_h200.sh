#!/bin/bash
# What the next H200 session measures for issues 16 and 17, one call per mode (each well inside 10 minutes).
# Keep the machine between calls: once given back, a new one may not be lent in the same session.
#   big     internvl2-76b in fp8, steady state, LM only and LM + vision (issue 16's 2 images/s target)
#   mid     internvl2-26b and -40b in bf16, random weights built on the GPU, against transformers on its own
#           random weights (both sides --no-save: speeds compare, texts do not)
#   8b-refill  internvl3-8b: bf16 batch 64 against fp8 at batch 128, with and without fp8 in the vision tower
#           (issue 16's 21 images/s target); then internvl2-1b with refill on and off on caption-natural and
#           mixed (issue 17)
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git log --oneline -1 2>/dev/null
bench() { python3 -m batchvl bench -q "$@" 2>&1 | grep -v Warning; }
case "$1" in
  big)
    bench --shape internvl2-76b --no-save --set quantization=fp8 --workload caption-7tile --rows 192 --batch 64 \
      --warmup-rows 64 --variant fp8v:quantize_vision=true | tee "$OUT/big.log" ;;
  mid)
    bench --shape internvl2-26b --no-save --workload caption-7tile --rows 128 --batch 64 --warmup-rows 64 \
      --baseline transformers --baseline-rows 32 --baseline-batch 32 | tee "$OUT/26b.log"
    bench --shape internvl2-40b --no-save --workload caption-7tile --rows 128 --batch 64 --warmup-rows 64 \
      --baseline transformers --baseline-rows 32 --baseline-batch 32 | tee "$OUT/40b.log" ;;
  8b-refill)
    bench --shape internvl3-8b --workload caption-7tile --rows 512 --batch 64 --warmup-rows 64 \
      --variant fp8b128:quantization=fp8,max_batch_size=128 \
      --variant fp8v128:quantization=fp8,quantize_vision=true,max_batch_size=128 | tee "$OUT/8b.log"
    for w in caption-natural mixed; do
      bench --shape internvl2-1b --workload $w --rows 512 --batch 128 --warmup-rows 128 \
        --variant static:refill=false | tee "$OUT/refill-$w.log"
    done ;;
  *) echo "usage: $0 big|mid|8b-refill"; exit 2 ;;
esac

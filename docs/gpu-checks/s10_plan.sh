#!/bin/bash
# Session 10's device calls, one verb a call, in the order they ran (BENCHMARKS.md, "Session 10"); run one per
# `run`, carrying .whl (calls made back to back, within 30 s, find the machine warm). The bench times the rows after
# its warm-up in the same run on the same engine (ecee4c3).
#   first   the LM head with and without aligned rows (lm_head.py); the tower's products, cuBLAS's heuristic against
#           TunableOp (vit_gemms.py); its attention in eight forms (vit_attention.py); the 1B caption-7tile
#           target with a whole batch's KV budget as a variant and transformers
#   second  attention with the CLS token last; one block in both token orders (vit_block.py); mixed, static and
#           refill
#   pinned  refill's media wait on mixed: a page-locked block's cost with the device busy, and refill with tiles in
#           page-locked memory against ordinary memory (pinned_probe.py)
#   finala  after the byte budget in row order and prefill by length: caption-7tile with transformers, mixed
#           static and refill
#   finalb  the 8B with transformers, then video
# Call 6 was `$B --shape internvl2-1b --rows 512 --batch 128 --warmup-rows 128 --workload caption-natural --variant
# refill:refill=true`.
[[ "$1" =~ ^(first|second|pinned|finala|finalb)$ ]] || { echo "usage: $0 first|second|pinned|finala|finalb"; exit 2; }
source docs/gpu-checks/device_env.sh

mixed() {  # $1: the log's name; the 1B on mixed, static and refill
  timeout 300 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload mixed \
    --variant refill:refill=true 2>&1 | grep -v Warning | tee "$OUT/$1"
}

case "$1" in
  first)
    nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv | tee "$OUT/gpu.log"
    timeout 60 python3 docs/gpu-checks/lm_head.py 2>&1 | tee "$OUT/lm_head.log"
    timeout 150 python3 docs/gpu-checks/vit_gemms.py 2>&1 | grep -v Warning | tee "$OUT/gemms.log"
    timeout 120 python3 docs/gpu-checks/vit_attention.py 2>&1 | grep -v Warning | tee "$OUT/attention.log"
    timeout 300 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --variant pt:max_batch_tokens=262144 \
      --baseline transformers --baseline-rows 128 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/7tile.log" ;;
  second)
    timeout 120 python3 docs/gpu-checks/vit_attention.py 2>&1 | grep "^|\|split\|^\[" | tee "$OUT/attention.log"
    timeout 150 python3 docs/gpu-checks/vit_block.py 2>&1 | grep -v Warning | tee "$OUT/block.log"
    mixed mixed.log ;;
  pinned)
    timeout 60 python3 docs/gpu-checks/pinned_probe.py alloc 2>&1 | tee "$OUT/alloc.log"
    timeout 420 python3 docs/gpu-checks/pinned_probe.py bench -q --workdir /tmp --shape internvl2-1b --rows 1024 \
      --batch 128 --warmup-rows 128 --workload mixed --set refill=true --set media.prepare_processes=14 \
      --variant nopin:refill=true 2>&1 | grep -v Warning | tee "$OUT/mixed-refill.log" ;;
  finala)
    timeout 200 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --baseline transformers --baseline-rows 128 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/7tile.log"
    mixed mixed.log ;;
  finalb)
    timeout 300 $B --shape internvl3-8b --workload caption-7tile --rows 512 --batch 64 --warmup-rows 64 --no-save \
      --baseline transformers --baseline-rows 64 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/8b.log"
    timeout 220 $B --shape internvl2-1b --rows 256 --batch 128 --warmup-rows 64 --workload video 2>&1 \
      | grep -v Warning | tee "$OUT/video.log" ;;
esac

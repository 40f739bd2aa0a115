#!/bin/bash
# The next device session's calls, prepared in session 9 (run one per `run`, carrying .whl; calls made back to
# back, within 30 s, find the machine warm). The bench now times the rows after its warm-up in the same run on the
# same engine (ecee4c3), so these are the first steady-state figures of issue 17's targets:
#   bash docs/gpu-checks/s10_plan.sh caption7   (about 4 minutes) the LM head with and without aligned rows
#                                               (lm_head.py; pad_head is on since session 9), then the 1B
#                                               caption-7tile target (65 images/s) with the defaults, a whole batch
#                                               in one prefill chunk and the step graph, and transformers in the
#                                               same run
#   bash docs/gpu-checks/s10_plan.sh mixed      (about 3 minutes) the 1B mixed target (45), static and refill (a
#                                               last vision chunk of one tile no longer recompiles: 2da1317)
#   bash docs/gpu-checks/s10_plan.sh eightb     (about 3 minutes) the 8B shape against transformers
#   bash docs/gpu-checks/s10_plan.sh vision     (about 6 minutes) the 1B with the vision tower's linear layers in
#                                               fp8 (lossy: its text against bf16's is printed), the tower being
#                                               power-capped in bf16 (session 9); the video workload; and the
#                                               tower's attention at 1,025 tokens against 1,024 and a split form
#                                               (vit_attention.py: what its ragged last tiles cost); its four
#                                               products with cuBLAS's heuristic and with TunableOp (vit_gemms.py:
#                                               the short-K products ran at two thirds of fc2's rate)
#   bash docs/gpu-checks/s10_plan.sh first      (session 10's first call, about 8 minutes) caption7 without the step
#                                               graph's variant, then the tower's products and attention forms
#   bash docs/gpu-checks/s10_plan.sh second     (about 6 minutes) attention with the CLS token last, one block in
#                                               both token orders (vit_block.py), then mixed
#   bash docs/gpu-checks/s10_plan.sh pinned     (about 5 minutes) refill's media wait on mixed: a page-locked
#                                               block's cost with the device busy, and refill with tiles in
#                                               page-locked memory against ordinary memory (pinned_probe.py)
#   bash docs/gpu-checks/s10_plan.sh finala     (about 5 minutes) after the byte budget in row order and prefill
#                                               by length: caption-7tile with transformers, mixed static and refill
#   bash docs/gpu-checks/s10_plan.sh finalb     (about 5 minutes) the 8B with transformers, then video
[[ "$1" =~ ^(caption7|mixed|eightb|vision|first|second|pinned|finala|finalb)$ ]] || { echo "usage: $0 caption7|mixed|eightb|vision|first|second|pinned|finala|finalb"; exit 2; }
source docs/gpu-checks/device_env.sh
case "$1" in
  caption7)
    timeout 60 python3 docs/gpu-checks/lm_head.py 2>&1 | tee "$OUT/lm_head.log"
    timeout 420 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --variant pt:max_batch_tokens=262144 --variant sg:step_graph=true \
      --baseline transformers --baseline-rows 128 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/7tile.log" ;;
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
    timeout 300 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload mixed \
      --variant refill:refill=true 2>&1 | grep -v Warning | tee "$OUT/mixed.log" ;;
  pinned)
    timeout 60 python3 docs/gpu-checks/pinned_probe.py alloc 2>&1 | tee "$OUT/alloc.log"
    timeout 420 python3 docs/gpu-checks/pinned_probe.py bench -q --workdir /tmp --shape internvl2-1b --rows 1024 \
      --batch 128 --warmup-rows 128 --workload mixed --set refill=true --set media.prepare_processes=14 \
      --variant nopin:refill=true 2>&1 | grep -v Warning | tee "$OUT/mixed-refill.log" ;;
  finala)
    timeout 200 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --baseline transformers --baseline-rows 128 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/7tile.log"
    timeout 280 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload mixed \
      --variant refill:refill=true 2>&1 | grep -v Warning | tee "$OUT/mixed.log" ;;
  finalb)
    timeout 300 $B --shape internvl3-8b --workload caption-7tile --rows 512 --batch 64 --warmup-rows 64 --no-save \
      --baseline transformers --baseline-rows 64 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/8b.log"
    timeout 220 $B --shape internvl2-1b --rows 256 --batch 128 --warmup-rows 64 --workload video 2>&1 \
      | grep -v Warning | tee "$OUT/video.log" ;;
  mixed)
    timeout 300 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload mixed \
      --variant refill:refill=true 2>&1 | grep -v Warning | tee "$OUT/mixed.log" ;;
  eightb)
    timeout 300 $B --shape internvl3-8b --workload caption-7tile --rows 512 --batch 64 --warmup-rows 64 --no-save \
      --baseline transformers --baseline-rows 64 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/8b.log" ;;
  vision)
    timeout 240 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --variant fp8v:quantization=fp8,quantize_vision=true 2>&1 | grep -v Warning | tee "$OUT/fp8v.log"
    timeout 200 $B --shape internvl2-1b --rows 256 --batch 64 --warmup-rows 64 --workload video 2>&1 \
      | grep -v Warning | tee "$OUT/video.log"
    timeout 120 python3 docs/gpu-checks/vit_attention.py 2>&1 | grep -v Warning | tee "$OUT/attention.log"
    timeout 180 python3 docs/gpu-checks/vit_gemms.py 2>&1 | grep -v Warning | tee "$OUT/gemms.log" ;;
esac

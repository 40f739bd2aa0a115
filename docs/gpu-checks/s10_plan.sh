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
[[ "$1" =~ ^(caption7|mixed|eightb|vision)$ ]] || { echo "usage: $0 caption7|mixed|eightb|vision"; exit 2; }
source docs/gpu-checks/device_env.sh
case "$1" in
  caption7)
    timeout 60 python3 docs/gpu-checks/lm_head.py 2>&1 | tee "$OUT/lm_head.log"
    timeout 420 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --variant pt:max_batch_tokens=262144 --variant sg:step_graph=true \
      --baseline transformers --baseline-rows 128 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/7tile.log" ;;
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

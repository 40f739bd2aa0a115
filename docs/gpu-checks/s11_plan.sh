#!/bin/bash
# The next device session's calls, prepared in session 10 (run one per `run`, carrying .whl; calls made back to
# back, within 30 s, find the machine warm):
#   bash docs/gpu-checks/s11_plan.sh refill   (about 7 minutes) refill against static batches on caption-natural
#                                             (with engine.refill_at 0.125 too) and mixed, with a one-row prefill
#                                             chunk run as two rows (5c316d2: no recompiling for a batch of one) and
#                                             the bench's engine-calls column (1fc5f7d: how many rows each refill
#                                             call ran before draining)
#   bash docs/gpu-checks/s11_plan.sh pipeline (about 5 minutes) the 1B caption-7tile target again, with
#                                             transformers, and the whole batch in one prefill chunk first and
#                                             second (its +4 to +6% came as the second side both times), and fp8
#                                             linear layers in both models (lossy; its same-text count is printed:
#                                             whether fp8 would reach 65 images/s where bf16 does not)
#   bash docs/gpu-checks/s11_plan.sh trace    (about 3 minutes) if refill's prefill is still slow: each admission's
#                                             stages and the slowest prefill entries (stage_trace.py)
#   bash docs/gpu-checks/s11_plan.sh first    (session 11's first call, about 9 minutes) refill's caption-natural
#                                             part, then the trace
#   bash docs/gpu-checks/s11_plan.sh second   (about 6 minutes) whether refill pays on the other workloads:
#                                             caption-7tile with transformers, and mixed, each static and refill
#   bash docs/gpu-checks/s11_plan.sh third    (about 7 minutes) the defaults with engine.refill auto (static on
#                                             caption-7tile, whose rows run to one length; refill on
#                                             caption-natural) against refill off, and the bench's new columns
#   bash docs/gpu-checks/s11_plan.sh fourth   (about 5 minutes) the 8B shape on caption-natural, the default (refill)
#                                             against refill off
#   bash docs/gpu-checks/s11_plan.sh fifth    (about 4 minutes) the decode attention's launch settings (decode_tune.py)
#   bash docs/gpu-checks/s11_plan.sh sixth    (about 5 minutes) the defaults after the decode attention's new settings:
#                                             caption-7tile and mixed
#   bash docs/gpu-checks/s11_plan.sh tune-mixed (about 3 minutes; not run in session 11) the decode attention's
#                                             settings at mixed lengths, then mixed with chunk 1024 and 3 stages
#                                             against the defaults would decide them
[[ "$1" =~ ^(refill|pipeline|trace|first|second|third|fourth|fifth|sixth|tune-mixed)$ ]] || { echo "usage: $0 refill|pipeline|trace|first|second|third|fourth|fifth|sixth|tune-mixed"; exit 2; }
source docs/gpu-checks/device_env.sh
case "$1" in
  refill)
    timeout 260 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-natural \
      --variant refill:refill=true --variant r8:refill=true,refill_at=0.125 2>&1 | grep -v Warning \
      | tee "$OUT/natural.log"
    timeout 280 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload mixed \
      --variant refill:refill=true 2>&1 | grep -v Warning | tee "$OUT/mixed.log" ;;
  pipeline)
    timeout 120 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --set max_batch_tokens=262144 --variant defaults:max_batch_tokens=0 2>&1 | grep -v Warning \
      | tee "$OUT/7tile-pt-first.log"
    timeout 200 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --variant pt:max_batch_tokens=262144 --variant fp8v:quantization=fp8,quantize_vision=true \
      --baseline transformers --baseline-rows 128 --baseline-batch 64 2>&1 \
      | grep -v Warning | tee "$OUT/7tile.log" ;;
  first)
    timeout 250 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-natural \
      --variant refill:refill=true --variant r8:refill=true,refill_at=0.125 2>&1 | grep -v Warning \
      | tee "$OUT/natural.log"
    timeout 300 python3 docs/gpu-checks/stage_trace.py internvl2-1b caption-natural 640 128 refill=true 2>&1 \
      | grep -v Warning | tee "$OUT/trace-refill.log" ;;
  second)
    timeout 250 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --variant refill:refill=true --baseline transformers --baseline-rows 128 --baseline-batch 64 2>&1 \
      | grep -v Warning | tee "$OUT/7tile.log"
    timeout 280 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload mixed \
      --variant refill:refill=true 2>&1 | grep -v Warning | tee "$OUT/mixed.log" ;;
  third)
    timeout 230 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --baseline transformers --baseline-rows 128 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/7tile.log"
    timeout 250 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-natural \
      --variant static:refill=false 2>&1 | grep -v Warning | tee "$OUT/natural.log" ;;
  fourth)
    timeout 330 $B --shape internvl3-8b --rows 384 --batch 64 --warmup-rows 64 --workload caption-natural --no-save \
      --variant static:refill=false 2>&1 | grep -v Warning | tee "$OUT/8b-natural.log" ;;
  fifth)
    timeout 400 python3 docs/gpu-checks/decode_tune.py 2>&1 | grep -v Warning | tee "$OUT/decode_tune.log" ;;
  sixth)
    timeout 150 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile 2>&1 \
      | grep -v Warning | tee "$OUT/7tile.log"
    timeout 170 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload mixed 2>&1 \
      | grep -v Warning | tee "$OUT/mixed.log" ;;
  tune-mixed)
    timeout 400 python3 docs/gpu-checks/decode_tune.py mixed 2>&1 | grep -v Warning | tee "$OUT/decode_tune_mixed.log" ;;
  trace)
    timeout 300 python3 docs/gpu-checks/stage_trace.py internvl2-1b caption-natural 640 128 refill=true 2>&1 \
      | grep -v Warning | tee "$OUT/trace-refill.log" ;;
esac

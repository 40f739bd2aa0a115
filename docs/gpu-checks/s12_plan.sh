#!/bin/bash
# The next device session's calls, prepared in session 11 (run one per `run`, carrying .whl; calls made back to
# back, within 30 s, find the machine warm):
#   bash docs/gpu-checks/s12_plan.sh first   (about 6 minutes) the decode attention's settings at mixed lengths
#                                            (decode_tune.py mixed: whether chunk 1024 and 3 stages, 1.19x and 1.12x
#                                            at caption lengths, hold where rows are short), then the 1B target with
#                                            transformers, with the media wait no longer synchronising the device
#   bash docs/gpu-checks/s12_plan.sh second  (about 5 minutes) fp8 linear layers in both models (lossy) against the
#                                            defaults on caption-7tile, with the same-text count: whether fp8 reaches
#                                            65 images/s where bf16 does not; then mixed's defaults again
[[ "$1" =~ ^(first|second)$ ]] || { echo "usage: $0 first|second"; exit 2; }
source docs/gpu-checks/device_env.sh
case "$1" in
  first)
    timeout 300 python3 docs/gpu-checks/decode_tune.py mixed 2>&1 | grep -v Warning | tee "$OUT/decode_tune_mixed.log"
    timeout 230 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --baseline transformers --baseline-rows 128 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/7tile.log" ;;
  second)
    timeout 200 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --variant fp8v:quantization=fp8,quantize_vision=true 2>&1 | grep -v Warning | tee "$OUT/7tile-fp8.log"
    timeout 150 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload mixed 2>&1 \
      | grep -v Warning | tee "$OUT/mixed.log" ;;
esac

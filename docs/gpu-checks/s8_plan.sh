#!/bin/bash
# The next device session's calls, prepared in session 7 (each about 9 minutes; run one per `run`):
#   bash docs/gpu-checks/s8_plan.sh step       issue 17: engine.step_graph against the decode graph alone
#   bash docs/gpu-checks/s8_plan.sh determ     issue 21: the kernels on CUDA, then text across batch sizes with the
#                                              mode on, and its cost
#   bash docs/gpu-checks/s8_plan.sh models     issue 20: InternVL3.5 (Qwen3-8B) in bf16 against transformers
#   bash docs/gpu-checks/s8_plan.sh resume     issue 21: the mode's text at batch 128, killed at 64 and resumed at
#                                              16, at batch 1, and the mode off (deterministic_resume.py)
# internvl-chat-v1-2 (InternViT-6B + Yi-34B, 80 GB in bf16) does not fit the device's 64 GB disk as a saved
# checkpoint, which check-parity writes; it needs a check that builds both sides' weights on the GPU.
set -o pipefail
[[ "$1" =~ ^(step|determ|models|resume)$ ]] || { echo "usage: $0 step|determ|models|resume"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=.:/tmp/site || exit 1
export PYTHONUNBUFFERED=1
B="python3 -m batchvl bench -q --workdir /tmp"
case "$1" in
  step)
    bash docs/gpu-checks/step_graph.sh ;;
  determ)
    timeout 150 python3 docs/gpu-checks/deterministic_check.py 2>&1 | grep -v Warning | tee "$OUT/kernels.log"
    timeout 250 $B --shape internvl2-1b --workload caption-7tile --rows 512 --batch 128 --warmup-rows 128 \
      --set deterministic=true --variant b64:max_batch_size=64 --variant b16:max_batch_size=16 \
      --variant refill:refill=true --variant off:deterministic=false 2>&1 | grep -v Warning | tee "$OUT/1b.log"
    timeout 180 $B --shape internvl3-8b --workload caption-7tile --rows 256 --batch 64 --warmup-rows 64 --no-save \
      --set deterministic=true --variant b16:max_batch_size=16 --variant off:deterministic=false 2>&1 \
      | grep -v Warning | tee "$OUT/8b.log" ;;
  models)
    timeout 300 python3 -m batchvl check-parity -q --shape internvl3_5-8b --tokens 32 2>&1 | tail -12 \
      | tee "$OUT/parity.log"
    timeout 250 $B --shape internvl3_5-8b --workload caption-7tile --rows 512 --batch 64 --warmup-rows 64 --no-save \
      --baseline transformers --baseline-rows 64 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/bench.log" ;;
  resume)
    timeout 560 python3 docs/gpu-checks/deterministic_resume.py internvl2-1b 512 2>&1 | grep -v Warning \
      | tee "$OUT/resume.log" ;;
  *) echo "usage: $0 step|determ|models|resume"; exit 2 ;;
esac

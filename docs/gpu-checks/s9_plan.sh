#!/bin/bash
# The next device session's calls, prepared in session 8 (run one per `run`, carrying .whl; calls made back to
# back, within 30 s, find the machine warm). In order of what they close:
#   bash docs/gpu-checks/s9_plan.sh resume8b    issue 21 (about 7 minutes): the deterministic mode across runs on
#                                                the 8B shape, 512 rows (batch 128; batch 64 killed at its 3rd batch
#                                                and resumed at 16; batch 1 on 64 rows; the mode off)
#   bash docs/gpu-checks/s9_plan.sh v12         issue 20 (about 4 minutes): InternVL-Chat-V1-2's widths (InternViT-6B +
#                                                Yi-34B, 16 layers of each: about 24 GB in bf16) against transformers;
#                                                first, the vision pass's one-call tile copy against the staging copy
#   bash docs/gpu-checks/s9_plan.sh pipeline    issue 17 (about 6 minutes): the 1B pipeline with the defaults (media
#                                                in processes) over 1,024 rows, against the step graph (now captured
#                                                once per batch size), a whole batch in one prefill chunk, and
#                                                transformers warm in the same run
#   bash docs/gpu-checks/s9_plan.sh profile     issue 17 (about 6 minutes): where one 1B pipeline batch leaves the GPU
#                                                idle, stage by stage, and what the host did meanwhile
#                                                (pipeline_profile.py; the trace comes back as trace.json.gz); then
#                                                `mixed` with the defaults
#   bash docs/gpu-checks/s9_plan.sh eightb      issue 17 (about 4 minutes): the 8B shape over 512 rows, with and
#                                                without the step graph
#   bash docs/gpu-checks/s9_plan.sh refill      issue 17, if time is left (about 3 minutes): refill on caption-natural
#                                                now that media runs in processes (it lost to static batches when
#                                                the engine's thread waited for the GIL at each admission)
[[ "$1" =~ ^(v12|resume8b|pipeline|profile|eightb|refill)$ ]] || \
  { echo "usage: $0 resume8b|v12|pipeline|profile|eightb|refill"; exit 2; }
source docs/gpu-checks/device_env.sh
case "$1" in
  v12)
    timeout 60 python3 docs/gpu-checks/tile_copy_check.py 2>&1 | tail -3 | tee "$OUT/tile_copy.log"
    timeout 480 python3 -m batchvl check-parity -q --shape internvl-chat-v1-2 --layers 16 --tokens 32 2>&1 \
      | tail -8 | tee "$OUT/v12.log" ;;
  resume8b)
    timeout 570 python3 docs/gpu-checks/deterministic_resume.py internvl3-8b 512 2>&1 | grep -v Warning \
      | tee "$OUT/resume8b.log" ;;
  profile)
    timeout 300 python3 docs/gpu-checks/pipeline_profile.py internvl2-1b caption-7tile 512 128 2 2>&1 \
      | grep -v Warning | tee "$OUT/profile.log"
    timeout 200 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload mixed 2>&1 \
      | grep -v Warning | tee "$OUT/mixed.log" ;;
  pipeline)
    timeout 400 $B --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128 --workload caption-7tile \
      --variant sg:step_graph=true --variant pt:max_batch_tokens=262144 \
      --baseline transformers --baseline-rows 64 --baseline-batch 64 2>&1 | grep -v Warning | tee "$OUT/7tile.log" ;;
  eightb)
    timeout 300 $B --shape internvl3-8b --workload caption-7tile --rows 512 --batch 64 --warmup-rows 64 --no-save \
      --variant sg:step_graph=true 2>&1 | grep -v Warning | tee "$OUT/8b.log" ;;
  refill)
    timeout 240 $B --shape internvl2-1b --workload caption-natural --rows 512 --batch 128 --warmup-rows 128 \
      --variant refill:refill=true 2>&1 | grep -v Warning | tee "$OUT/refill.log" ;;
esac

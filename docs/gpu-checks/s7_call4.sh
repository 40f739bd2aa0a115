#!/bin/bash
# Session 7, device call 4 (issue 17): the engine in a process of its own (engine.separate_process, auto: on with
# CUDA) against the engine in the run's process, 1B caption-7tile and mixed.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=.:/tmp/site || exit 1
export PYTHONUNBUFFERED=1
B="python3 -m batchvl bench -q --workdir /tmp --shape internvl2-1b --rows 512 --batch 128 --warmup-rows 128"
timeout 120 $B --workload caption-7tile --variant inproc:separate_process=false 2>&1 | grep -v Warning \
  | tee "$OUT/7tile.log"
timeout 95 $B --workload mixed --variant inproc:separate_process=false 2>&1 | grep -v Warning | tee "$OUT/mixed.log"
# Outcome (BENCHMARKS.md, session 7): caption-7tile 20.1 images/s with the engine in its own process against 32.1 in
# the run's process (decode 6.3 s against 3.6, and 7 s outside the stages); the budget ended before `mixed`.
# engine.separate_process was taken out again (its code is in commit ee26875).

#!/bin/bash
# Session 8, call 1 (issue 17): the 1B pipeline with the tiles' one-call copy and the host-counted image tokens
# (the default side), against the whole decode step as one CUDA graph (sg), and that with media in 14 processes
# (sgp); then `mixed`, and the 8B shape with the step graph. Texts must match the default side's.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=.:/tmp/site || exit 1
export PYTHONUNBUFFERED=1
B="python3 -m batchvl bench -q --workdir /tmp --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128"
P="sgp:step_graph=true,media.prepare_processes=14,media.prepare_threads=2"
timeout 250 $B --workload caption-7tile --variant sg:step_graph=true --variant $P 2>&1 | grep -v Warning \
  | tee "$OUT/7tile.log"
timeout 180 $B --workload mixed --variant $P 2>&1 | grep -v Warning | tee "$OUT/mixed.log"
timeout 150 python3 -m batchvl bench -q --workdir /tmp --shape internvl3-8b --workload caption-7tile --rows 256 \
  --batch 64 --warmup-rows 64 --no-save --variant sg:step_graph=true 2>&1 | grep -v Warning | tee "$OUT/8b.log"

#!/bin/bash
# For the next device session (issue 17): each batch's whole decode step as one CUDA graph (engine.step_graph, off
# by default until this has run) against the decode graph alone, 1B caption-7tile / mixed and 8B; the texts must
# match (bench compares each variant's text with the first side's), and decode's stage time should fall.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=.:/tmp/site || exit 1
export PYTHONUNBUFFERED=1
B="python3 -m batchvl bench -q --workdir /tmp --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128"
timeout 200 $B --workload caption-7tile --variant sg:step_graph=true 2>&1 | grep -v Warning | tee "$OUT/7tile.log"
timeout 200 $B --workload mixed --variant sg:step_graph=true 2>&1 | grep -v Warning | tee "$OUT/mixed.log"
timeout 180 python3 -m batchvl bench -q --workdir /tmp --shape internvl3-8b --workload caption-7tile --rows 512 \
  --batch 64 --warmup-rows 64 --no-save --variant sg:step_graph=true 2>&1 | grep -v Warning | tee "$OUT/8b.log"

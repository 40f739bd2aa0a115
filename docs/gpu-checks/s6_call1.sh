#!/bin/bash
# Session 6, device call 1 (issue 17): the vision tower's variants and pieces (vision_probe.py), media
# preparation's scaling with threads and processes on the 16-core host, and the 1B pipeline as it stands.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=.:/tmp/site || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
timeout 260 python3 docs/gpu-checks/vision_probe.py 64 2>&1 | grep -v Warning | tee "$OUT/vision.log"
timeout 120 python3 -m batchvl bench-media -q --workload 7tile --images 480 --naive-images 40 \
  --threads 4,8,16 --processes 4,8,16 2>&1 | tee "$OUT/media.log"
timeout 200 python3 -m batchvl bench -q --shape internvl2-1b --workload caption-7tile --rows 1024 --batch 128 \
  --warmup-rows 128 --workdir /tmp --variant p14:media.prepare_processes=14 2>&1 | grep -v Warning | tee "$OUT/1b.log"

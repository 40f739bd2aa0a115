#!/bin/bash
# Session 7, device call 2 (issue 17): why the vision tower runs at ~490 tiles/s in the 1B pipeline against ~685
# alone (call 1): the media threads' share of the engine process (fewer threads, media in processes), and Python's
# GIL switch interval (5 ms by default; 0.5 ms here). Then video (1B), reported.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=.:/tmp/site || exit 1
export PYTHONUNBUFFERED=1
ARGS="bench -q --workdir /tmp --shape internvl2-1b --rows 1024 --batch 128 --warmup-rows 128"
timeout 250 python3 -m batchvl $ARGS --workload caption-7tile \
  --variant p14t2:media.prepare_processes=14,media.prepare_threads=2 \
  --variant p14t6:media.prepare_processes=14,media.prepare_threads=6 2>&1 | grep -v Warning | tee "$OUT/7tile.log"
timeout 110 python3 -c "import runpy, sys; sys.setswitchinterval(0.0005); sys.argv = ['batchvl'] + sys.argv[1:]; \
runpy.run_module('batchvl', run_name='__main__')" $ARGS --workload caption-7tile 2>&1 | grep -v Warning \
  | tee "$OUT/7tile-switch.log"
timeout 200 python3 -m batchvl bench -q --workdir /tmp --shape internvl2-1b --rows 256 --batch 128 --warmup-rows 64 \
  --workload video 2>&1 | grep -v Warning | tee "$OUT/video.log"

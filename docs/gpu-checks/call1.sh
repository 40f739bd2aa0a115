#!/usr/bin/env bash
# Device call 1: the old tree (53b2a26) on both shapes (texts + speed), and the new layout on the 1B shape.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
R=$PWD
B1="bench -q --shape internvl2-1b --workload caption-7tile --rows 1024 --batch 128 --warmup-rows 128 --workdir /tmp"
B8="bench -q --shape internvl3-8b --workload caption-7tile --rows 512 --batch 64 --warmup-rows 64 --workdir /tmp"
(cd .device/old && PYTHONPATH=. python3 $R/.device/old_bench.py $OUT/old-1b.json $B1 2>&1 | tee $OUT/old-1b.log | grep -v Warning)
(PYTHONPATH=. python3 -m batchvl $B1 --texts $OUT/new-1b.json 2>&1 | tee $OUT/new-1b.log | grep -v Warning)
python3 .device/compare.py $OUT/old-1b.json $OUT/new-1b.json 1b
(cd .device/old && PYTHONPATH=. python3 $R/.device/old_bench.py $OUT/old-8b.json $B8 2>&1 | tee $OUT/old-8b.log | grep -v Warning)

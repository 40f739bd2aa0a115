#!/usr/bin/env bash
# Device call 4 (final): the new tree's smoke check, internvl2-1b with its transformers baseline, the
# decode-loop probe, and internvl3-8b; token ids saved for comparison with calls 2 and 3 (old tree).
set -u
export PYTHONUNBUFFERED=1
echo "new tree: $(cat .device/REV)"
timeout 120 env PYTHONPATH=. python3 .device/smoke.py 2>&1 | tee $OUT/smoke.log | grep -E "^smoke|Error"
B1="bench -q --shape internvl2-1b --workload caption-7tile --rows 1024 --batch 128 --warmup-rows 128 --workdir /tmp"
timeout 200 env PYTHONPATH=. python3 .device/tokens_bench.py $OUT/new-1b.json $B1 --baseline transformers --baseline-rows 64 --baseline-batch 64 2>&1 | tee $OUT/new-1b.log | grep -vi warn
timeout 100 env PYTHONPATH=. python3 .device/probe.py new 2>&1 | grep -E "^probe|Error"
B8="bench -q --shape internvl3-8b --workload caption-7tile --rows 512 --batch 64 --warmup-rows 64 --workdir /tmp"
timeout 170 env PYTHONPATH=. python3 .device/tokens_bench.py $OUT/new-8b.json $B8 2>&1 | tee $OUT/new-8b.log | grep -vi warn

#!/usr/bin/env bash
# Device call 2: the GPU smoke check of the new engine, then internvl2-1b old (53b2a26) vs new, token ids compared.
set -u
export PYTHONUNBUFFERED=1
R=$PWD
git_rev=$(cat .device/REV 2>/dev/null)
echo "new tree: $git_rev"
(PYTHONPATH=. python3 .device/smoke.py 2>&1 | tee $OUT/smoke.log | grep -E "^smoke|Error|error" )
B1="bench -q --shape internvl2-1b --workload caption-7tile --rows 1024 --batch 128 --warmup-rows 128 --workdir /tmp"
(cd .device/old && PYTHONPATH=. python3 $R/.device/tokens_bench.py $OUT/old-1b.json $B1 2>&1 | tee $OUT/old-1b.log | grep -E "^\| native|^bench|Error")
(PYTHONPATH=. python3 .device/tokens_bench.py $OUT/new-1b.json $B1 --baseline transformers --baseline-rows 64 --baseline-batch 64 2>&1 | tee $OUT/new-1b.log | grep -vi warn)
python3 .device/compare.py $OUT/old-1b.json $OUT/new-1b.json internvl2-1b

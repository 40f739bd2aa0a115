#!/usr/bin/env bash
# Device call 3: the decode-loop probe (old vs new), then internvl3-8b old (53b2a26) vs new, token ids compared.
set -u
export PYTHONUNBUFFERED=1
R=$PWD
echo "new tree: $(cat .device/REV)"
(cd .device/old && PYTHONPATH=. python3 $R/.device/probe.py old 2>&1 | grep -E "^probe|Error")
(PYTHONPATH=. python3 .device/probe.py new 2>&1 | grep -E "^probe|Error")
B8="bench -q --shape internvl3-8b --workload caption-7tile --rows 512 --batch 64 --warmup-rows 64 --workdir /tmp"
(cd .device/old && PYTHONPATH=. python3 $R/.device/tokens_bench.py $OUT/old-8b.json $B8 2>&1 | tee $OUT/old-8b.log | grep -E "^\| native|^bench|Error")
(PYTHONPATH=. python3 .device/tokens_bench.py $OUT/new-8b.json $B8 --baseline transformers --baseline-rows 64 --baseline-batch 64 2>&1 | tee $OUT/new-8b.log | grep -vi warn)
python3 .device/compare.py $OUT/old-8b.json $OUT/new-8b.json internvl3-8b

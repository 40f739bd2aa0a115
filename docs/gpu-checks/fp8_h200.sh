#!/bin/bash
# Issue 16 on one H200. `fp8_h200.sh checks`: the fp8 layer and loading checks, the kernels against their
# references, and check-parity (native vs transformers on the same random weights) in bf16 and fp8.
# `fp8_h200.sh bench`: the 8B shape's whole pipeline, bf16 against fp8 (and fp8 in the vision tower too).
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
if [ "$1" = checks ]; then
  python3 docs/gpu-checks/fp8_layers.py 2>&1 | tee "$OUT/layers.log" | grep -v Warning
  python3 -m batchvl bench-kernels -q --kernel fp8-quant --kernel rmsnorm-fp8-quant 2>&1 | tee "$OUT/kernels.log" | tail -40
  for e in "" "--engine quantization=fp8" "--engine quantization=fp8 --engine quantize_vision=true"; do
    echo "== check-parity internvl2-1b $e"
    python3 -m batchvl check-parity -q --shape internvl2-1b --tokens 32 $e 2>&1 | tail -12
  done
  echo "== check-parity internvl3-8b bf16 and fp8"
  python3 -m batchvl check-parity -q --shape internvl3-8b --tokens 32 2>&1 | tail -8
  python3 -m batchvl check-parity -q --shape internvl3-8b --tokens 32 --engine quantization=fp8 2>&1 | tail -8
else
  python3 -m batchvl bench -q --shape internvl3-8b --workload caption-7tile --rows 512 --batch 64 --warmup-rows 128 \
      --variant fp8:quantization=fp8 --variant fp8v:quantization=fp8,quantize_vision=true 2>&1 | tee "$OUT/bench.log" | tail -30
fi

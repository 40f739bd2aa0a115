#!/bin/bash
# Issue 15, item 11: a real CUDA out-of-memory on the H200, and the batch split recovering from it.
# The native engine sizes its batches from free memory (engine.max_batch_tokens: 0); a token budget far past
# what fits (8M tokens, batch 1024 of the 8B shape with 7-tile images) makes it try a batch that does not fit.
# (Batch 512 fits: 93.9 GiB peak, prefill is chunked; 2026-12-01, first try of this script.)
# The run must end with every row written and none failed (bench raises on a failed row), the log must show
# the split, and the text is compared with a batch-64 run that fits (bf16 is not batch-invariant: see
# BENCHMARKS.md for what two fitting batch sizes differ by).
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
python3 -m batchvl bench --shape internvl3-8b --workload caption-7tile --rows 1024 --batch 1024 \
    --set max_batch_tokens=8000000 -v 2>&1 \
    | tee "$OUT/oom.log" | grep -E "out of memory|retrying|KV cache|^\||differ|rows|Error|error" | head -60

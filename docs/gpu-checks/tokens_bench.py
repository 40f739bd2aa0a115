"""Run `batchvl bench` (any tree: run with PYTHONPATH at it) and save the native side's generated token ids and
text by row id. Every native engine hands each row's tokens to `decode_result`; the timed side runs after the
warm-up, so its rows overwrite the warm-up's. Usage: tokens_bench.py OUT.json bench ARGS..."""
import json
import sys

import batchvl.engine.native as native
from batchvl.cli import main

rows = {}
real = native.decode_result


def decode_result(request, tokens, params, tokenizer):
    result = real(request, tokens, params, tokenizer)
    rows[request.id] = [list(tokens), result.text]
    return result


native.decode_result = decode_result
rc = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(rows, f)
sys.exit(rc)

"""Run the old tree's `batchvl bench` (which has no --texts) and save each native side's text by row id."""
import json
import sys

import batchvl.bench as b

from batchvl.cli import main

texts = {}
orig = b.run_side


def run_side(name, root, *args, **kwargs):
    side = orig(name, root, *args, **kwargs)
    if not name.endswith("-warmup") and name != "transformers":
        texts[name] = b.texts_of(root / f"out-{name}")
    return side


b.run_side = run_side
rc = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(texts, f, ensure_ascii=False, sort_keys=True)
sys.exit(rc)

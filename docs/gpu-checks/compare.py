"""Compare two tokens_bench.py files: rows with identical token ids, and with identical text."""
import json
import sys

old, new = (json.load(open(p)) for p in sys.argv[1:3])
tokens = sum(old[i][0] == new.get(i, [None])[0] for i in old)
text = sum(old[i][1] == new.get(i, [None, None])[1] for i in old)
distinct = len({tuple(v[0]) for v in old.values()})
print(f"{sys.argv[3]}: {tokens}/{len(old)} rows have identical token ids, {text}/{len(old)} identical text "
      f"({distinct} distinct token sequences among the old rows)")

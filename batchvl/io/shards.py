"""`--shard I/N`: a deterministic share of the input for job arrays (Slurm, Kubernetes indexed jobs).

A row belongs to shard `blake2b(id) mod N`, so N independent processes with I = 0 .. N-1 cover the input
exactly once between them, whatever order they run in, and each can be rerun (resumed) on its own. They
write into one output folder: part files have unique names, and each shard keeps its own summary file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from batchvl.errors import JobError


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        index, sep, count = text.partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise JobError(f"--shard: expected I/N, like 0/8, got {text!r}")
        shard = cls(int(index), int(count))
        if shard.count < 1 or not 0 <= shard.index < shard.count:
            raise JobError(f"--shard: I must be in 0..N-1 and N >= 1, got {text!r}")
        return shard

    def owns(self, row_id: str) -> bool:
        digest = hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def summary_name(self) -> str:
        return f"_summary-shard-{self.index}-of-{self.count}.json"


def shard_status(out_dir: Path) -> list[dict]:
    """Every summary file of an output folder (the unsharded one and one per shard), sorted by shard."""
    found = []
    for path in sorted(out_dir.glob("_summary*.json")):
        try:
            found.append(dict(json.loads(path.read_text(encoding="utf-8")), file=path.name))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda s: (s.get("shard") is not None, str(s.get("shard"))))

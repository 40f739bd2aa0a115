"""`batchvl export OUT/ -o FILE`: an output folder's rows as one file, the way OpenAI's Batch API hands back its
results: the rows that ran in one output file, the failed ones in an error file (`--errors`; without it they go
into the same file, in part order like the others).

Each output row is a line, a sample of generation.n > 1 too (its `sample` with it), with batchvl's own columns
(io.columns) as the folder has them. It reads the folder's committed part files whatever their output.format
(Parquet, JSONL, OpenAI batch lines) one at a time, so memory holds one part, and writes FILE under a temporary
name renamed into place when it is whole. A run still writing the folder is not waited for: its rows not yet
committed are not in the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from batchvl.errors import JobError
from batchvl.io.columns import own_columns
from batchvl.io.jsonl_parts import encode_line
from batchvl.io.openai_batch import result_line
from batchvl.io.writer import BASE_SCHEMA, part_files, part_results
from batchvl.run.fingerprint import read_fingerprint, recorded_model, recorded_value

EXPORT_FORMATS = ("openai-batch", "jsonl")


def export(out_dir: Path, dest: Path, fmt: str = "openai-batch", errors: Path | None = None,
           model: str | None = None) -> tuple[int, int]:
    """Write the folder's rows to `dest` (and the failed ones to `errors`, when given). Returns (rows without
    error, failed rows). `model`: the name OpenAI batch results give (default: the job's `model`)."""
    if fmt not in EXPORT_FORMATS:
        raise JobError(f"export: --format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    recorded = read_fingerprint(out_dir)
    if not out_dir.is_dir() or recorded is None and not part_files(out_dir):
        raise JobError(f"export: {out_dir} is not an output folder of batchvl")
    if dest.is_dir() or (errors is not None and errors.is_dir()):
        raise JobError("export: -o and --errors name files, not folders")
    recorded = recorded or {}
    if model is None:
        model = recorded_model(out_dir) or Path(str(recorded.get("model.path", ""))).name
    own = own_columns(recorded_value(recorded, "generation.n"), recorded_value(recorded, "output.include_prompt"))
    temps = [dest.with_name(f".{dest.name}.tmp")] + ([errors.with_name(f".{errors.name}.tmp")] if errors else [])
    ok = failed = 0
    files = [open(t, "wb") for t in temps]
    try:
        good, bad = files[0], files[-1]
        for part in part_files(out_dir):
            created = int(part.stat().st_mtime)
            for r in part_results(part):
                if fmt == "openai-batch":
                    line = {**result_line(r, model, created=created),
                            **{c: r.keep.get(c) for c in own}}
                else:
                    line = {**{f: getattr(r, f) for f in BASE_SCHEMA.names}, **r.keep}
                ok, failed = (ok + 1, failed) if r.error is None else (ok, failed + 1)
                (good if r.error is None else bad).write(encode_line(line))
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        os.replace(temps[0], dest)
        if errors:
            os.replace(temps[-1], errors)
    finally:
        for f, tmp in zip(files, temps, strict=True):
            f.close()
            tmp.unlink(missing_ok=True)
    return ok, failed

"""batchvl's two stages as Ray Data callable classes; users import them as `batchvl.ray.Prepare` and
`batchvl.ray.Engine` (see `batchvl.ray` for a pipeline), and `batchvl run --ray` maps them (`ray_runner`).

`Prepare` turns input rows into model-ready columns (PREPARED_SCHEMA): prompt token ids, uint8 tiles
[T, S, S, 3] as bytes, per-row settings. A row whose record or media fails becomes an error row there and
rides through `Engine` unchanged; no row is dropped. `Engine` loads the model once per actor and returns
one output row per input row, with the schema of a local run (`batchvl.io.writer.output_schema`).

Neither class needs Ray itself (they map Arrow tables), so this module imports without it; `require_ray`
gives the install hint where Ray is needed.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from batchvl.config import Job, JobError, job_from_mapping, load_job
from batchvl.core import Request, Result, Row
from batchvl.io.ids import id_text
from batchvl.io.writer import output_schema, results_table
from batchvl.run.loop import build_engine, make_prefetcher, make_preparer, run_batch
from batchvl.run.output import keep_types
from batchvl.run.plan import plan_model

INSTALL_HINT = "pip install 'batchvl[ray]'"

# Columns of the rows `batchvl run --ray` reads (batchvl.run.ray_runner): the output id, the input position, the
# input file and the record itself, pickled, so that a row reaches Prepare exactly as a local run reads it.
ROW_ID = "__batchvl_id"
ROW_SOURCE = "__batchvl_source"
ROW_FILE = "__batchvl_file"
ROW_RECORD = "__batchvl_record"
ROW_ERROR = "__batchvl_error"

PREPARED_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("error", pa.string()),  # set: the row failed before the engine, and the other columns are null
    ("prompt_ids", pa.list_(pa.int32())),
    ("tiles", pa.large_binary()),  # uint8 [T, S, S, 3] in C order, S the checkpoint's tile size; null: no media
    ("tiles_per_image", pa.list_(pa.int32())),
    ("max_new_tokens", pa.int32()),  # this row's own limit, null: the job's
    ("keep", pa.binary()),  # the keep-column values, pickled (their types vary by input)
])


def require_ray() -> Any:
    """The `ray` module, or a RuntimeError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the data extra: ray[data]
    except ImportError as e:
        raise RuntimeError(f"Ray Data is not installed ({e}); install it with: {INSTALL_HINT}") from None
    return ray


def load_job_like(job: Job | str | os.PathLike | dict, overrides: Sequence[str] = ()) -> Job:
    """A Job from a Job, a job file's path, or the mapping a job file holds (relative paths against the
    current directory). Paths are read where this runs: on a Ray worker, pass a Job or absolute paths."""
    if isinstance(job, Job):
        if overrides:
            raise TypeError("overrides apply to a job file or mapping; change a Job with dataclasses.replace")
    elif isinstance(job, dict):
        job = job_from_mapping(job, Path.cwd(), list(overrides))
    else:
        job = load_job(job, list(overrides))
    check_ray_settings(job)
    return job


def check_ray_settings(job: Job) -> None:
    """Refuse, naming the key, the settings that only a local run honours: PREPARED_SCHEMA carries one request
    per row, without its rendered prompt or tile grids. Raises JobError."""
    if job.generation.n > 1:
        raise JobError(f"generation.n: {job.generation.n} samples per row run locally, not on Ray (yet); run the "
                       "job without --ray")
    if job.output.include_prompt:
        raise JobError("output.include_prompt: runs locally, not on Ray (yet); run the job without --ray")


def _rows_of(batch: Any) -> list[dict[str, Any]]:
    """A Ray Data batch (pyarrow, pandas or numpy format) as a list of row dicts of plain Python values."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return pa.Table.from_pandas(batch, preserve_index=False).to_pylist()
    columns = {k: v.tolist() if isinstance(v, np.ndarray) else list(v) for k, v in batch.items()}
    n = len(next(iter(columns.values()), []))
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


class Prepare:
    """Ray Data CPU stage: input rows to model-ready columns (PREPARED_SCHEMA), one row out per row in.

    `job`: a Job, a job file's path or a job mapping; `overrides`: `--set` strings. It reads rows either as
    `batchvl run --ray` hands them over, or as a user's dataset holds them: one column per input column, the
    id from `input.id_column` (required then), media paths relative to `input.media_root` (default: the folder
    of the job's first input file). Media is fetched and prepared by batchvl's prefetcher, on
    `media.prepare_threads` threads per actor (`media.prepare_processes` does not apply: actors are processes).
    """

    def __init__(self, job: Job | str | os.PathLike | dict, overrides: Sequence[str] = ()):
        self.job = load_job_like(job, overrides)
        plan = plan_model(self.job)
        plan.files = self.job.input.files
        self.preparer = make_preparer(self.job, plan)
        self.default_file = plan.files[0]

    def __call__(self, batch: Any) -> pa.Table:
        rows = _rows_of(batch)
        if rows and ROW_RECORD in rows[0]:
            pending = [_job_row(r) for r in rows]
        else:
            pending = [(self.default_file, self._user_row(r, i)) for i, r in enumerate(rows)]
        # No worker processes: Ray scales preparation by actors, each a process of its own, and a prefetcher
        # lives for one batch, which would start them for every batch.
        prefetcher = make_prefetcher(self.job, pending, self.preparer, processes=False)
        try:
            items = list(prefetcher)  # input order
        finally:
            prefetcher.close()
        return prepared_table(items)

    def _user_row(self, data: dict[str, Any], index: int) -> Row:
        column = self.job.input.id_column
        if column is None:
            raise ValueError("batchvl.ray.Prepare: a user's dataset needs input.id_column in the job, to name "
                             "each output row")
        value = data.get(column)
        if value is None:
            return Row(id=f"<no id>#{index}", source=f"batch row {index}", data=None,
                       error=f"input: the row has no value in id column {column!r}")
        try:
            row_id = id_text(value)
        except ValueError as e:
            return Row(id=f"<bad id>#{index}", source=f"batch row {index}", data=None,
                       error=f"input: the row's {column!r} value cannot be an id: {e}")
        return Row(id=row_id, source=row_id, data=data)


def _job_row(r: dict[str, Any]) -> tuple[Path, Row]:
    record = r[ROW_RECORD]
    data = None if record is None else pickle.loads(record)
    return Path(r[ROW_FILE]), Row(id=r[ROW_ID], source=r[ROW_SOURCE], data=data, error=r[ROW_ERROR])


def prepared_table(items: list[Request | Result]) -> pa.Table:
    """Prepared requests and error results as a PREPARED_SCHEMA table, in order."""
    columns: dict[str, list[Any]] = {name: [] for name in PREPARED_SCHEMA.names}
    for item in items:
        columns["id"].append(item.id)
        columns["keep"].append(pickle.dumps(item.keep, protocol=pickle.HIGHEST_PROTOCOL))
        if isinstance(item, Result):
            for name in ("prompt_ids", "tiles", "tiles_per_image", "max_new_tokens"):
                columns[name].append(None)
            columns["error"].append(item.error)
            continue
        columns["error"].append(None)
        columns["prompt_ids"].append(item.prompt_ids)
        columns["tiles"].append(None if item.tiles is None else item.tiles.contiguous().numpy().tobytes())
        columns["tiles_per_image"].append(item.tiles_per_image)
        columns["max_new_tokens"].append(item.max_new_tokens)
    return pa.Table.from_pydict(columns, schema=PREPARED_SCHEMA)


def prepared_items(rows: list[dict[str, Any]], tile_size: int) -> list[Request | Result]:
    """The reverse of `prepared_table`, from its rows: Requests, and error Results for failed rows."""
    items: list[Request | Result] = []
    for r in rows:
        keep = pickle.loads(r["keep"]) if r.get("keep") is not None else {}
        if r.get("error") is not None:
            items.append(Result.failed(r["id"], r["error"], keep))
            continue
        tiles = None
        if r.get("tiles") is not None:
            # [T, S, S, 3] uint8; bytearray: a writable copy torch can own
            tiles = torch.frombuffer(bytearray(r["tiles"]), dtype=torch.uint8).view(-1, tile_size, tile_size, 3)
        items.append(Request(id=r["id"], prompt_ids=list(r["prompt_ids"]), tiles=tiles,
                             tiles_per_image=list(r["tiles_per_image"] or []), keep=keep,
                             max_new_tokens=r.get("max_new_tokens")))
    return items


class Engine:
    """Ray Data GPU stage: `Prepare`'s rows to output rows with the schema of a local run.

    The model is loaded once, when the actor starts, as the job's `engine:` section says (`device: auto`
    takes the GPU Ray gives the actor). Each batch runs as engine batches of `engine.max_batch_size`
    requests (a batch out of device memory is split, as in a local run); error rows pass through.
    """

    def __init__(self, job: Job | str | os.PathLike | dict, overrides: Sequence[str] = ()):
        self.job = load_job_like(job, overrides)
        plan = plan_model(self.job)
        self.engine = build_engine(self.job, plan)
        self.tile_size = plan.checkpoint.tile_size
        self.schema = output_schema(keep_types(self.job, self.job.input.files))

    def __call__(self, batch: Any) -> pa.Table:
        rows = _rows_of(batch)
        if rows and "prompt_ids" not in rows[0]:
            raise ValueError("batchvl.ray.Engine takes the rows batchvl.ray.Prepare makes; map the dataset "
                             "through Prepare first")
        items = prepared_items(rows, self.tile_size)
        size = self.job.engine.max_batch_size
        results: list[Result] = []
        for start in range(0, len(items), size):
            results += run_batch(self.engine, items[start:start + size])
        return results_table(results, self.schema)


__all__ = ["Engine", "INSTALL_HINT", "PREPARED_SCHEMA", "Prepare", "require_ray"]

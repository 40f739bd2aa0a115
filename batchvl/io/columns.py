"""The output's columns of batchvl's own beyond its base ones (io.writer.BASE_SCHEMA), which a job adds after them
and before its keep columns: `sample` with generation.n > 1, `prompt` and `tile_grids` with output.include_prompt.
In Parquet their fields say so in their metadata (OWN), which a part keeps, so that a part read back tells them
from keep columns of the same name; in JSONL lines they are keys like the others.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from batchvl.core import Result

OWN = b"batchvl"
TILE_GRID = pa.struct([("cols", pa.int32()), ("rows", pa.int32()), ("thumbnail", pa.bool_()), ("tokens", pa.int32())])
OWN_COLUMNS = {"sample": pa.int32(), "prompt": pa.string(), "tile_grids": pa.list_(TILE_GRID)}


def own_columns(samples: int, include_prompt: bool) -> tuple[str, ...]:
    """The columns of OWN_COLUMNS a job writes: `samples` is its generation.n."""
    return (("sample",) if samples > 1 else ()) + (("prompt", "tile_grids") if include_prompt else ())


def own_value(result: Result, column: str) -> Any:
    """The value of one of OWN_COLUMNS for a result, as Arrow and JSON take it."""
    if column == "tile_grids":
        return None if result.tile_grids is None else [g._asdict() for g in result.tile_grids]
    return getattr(result, column)


def is_own(field: pa.Field) -> bool:
    return bool(field.metadata) and OWN in field.metadata


def has_own(schema: pa.Schema, name: str) -> bool:
    """Whether `schema` holds batchvl's own column `name` (not an input column of that name kept as it was)."""
    return name in schema.names and is_own(schema.field(name))

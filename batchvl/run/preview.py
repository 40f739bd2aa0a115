"""`batchvl preview JOB [--rows N]`: what the run would hand the engine for the first rows, shown to a person.

It goes the run's own way, weights aside: the model half of the plan (`plan_model`, configs and tokenizer; no
weight file is opened), the run's preparer (`make_preparer`), its row reader and media fetching, the preparer's
plan and build with the run's tiling. So each row shows the prompt the engine would get, each image's tile grid
and token count, and a video's chosen frames, or the error row the run would write instead.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image

from batchvl.config import Job
from batchvl.core import Result
from batchvl.errors import RowError
from batchvl.io.ids import Ids
from batchvl.io.readers import read_rows
from batchvl.media.fetch import load_blob
from batchvl.media.pixels import Out, Tiled, TileTask, tile_media
from batchvl.media.sources import describe
from batchvl.media.video import chosen_frames
from batchvl.run.fingerprint import written_before_id_rule
from batchvl.run.loop import fetch_settings, make_preparer
from batchvl.run.plan import plan_model


def preview(job: Job, rows: int = 3) -> Iterator[str]:
    """The lines `batchvl preview` prints for the job's first `rows` input rows."""
    plan = plan_model(job, check_weight_files=False)
    preparer = make_preparer(job, plan)
    ck = plan.checkpoint
    yield (f"model {ck.path}: {ck.tokens_per_tile} tokens per tile of {ck.tile_size} px; template "
           f"{job.chat_template}; no weights loaded")
    ids = Ids.of(job, old_values=written_before_id_rule(job.output_dir))
    fetch = fetch_settings(job)
    for file, row in islice(read_rows(job.input.files, ids), rows):
        yield ""
        yield f"row {row.id} ({file.name})"
        row_plan = preparer.plan(row, job.media_root_for(file))
        if isinstance(row_plan, Result):
            yield f"  error row: {row_plan.error}"
            continue
        try:
            blobs = [load_blob(m.ref, row_plan.media_root, settings=fetch) for m in row_plan.media]
        except RowError as e:
            yield f"  error row: {e}"
            continue
        seen: list[str] = []
        built = preparer.build(row_plan, blobs, tile=functools.partial(_tiles_shown, seen=seen, ck=ck))
        if isinstance(built, Result):
            yield f"  error row: {built.error}"
            continue
        for ref, line in zip(row_plan.media, seen, strict=True):
            yield f"  {ref.kind} {describe(ref.ref)}: {line}"
        prompt = preparer.prompts.readable(row_plan.messages, built.tiles_per_image)
        limit = f", at most {built.max_new_tokens} new" if built.max_new_tokens else ""
        yield f"  prompt: {len(built.prompt_ids):,} tokens{limit}"
        yield from ("    " + line for line in prompt.splitlines())


def _tiles_shown(task: TileTask, out: Out | None, seen: list[str], ck: Any) -> Tiled:
    """The run's tiling of one item (tile_media), noting what it did in `seen`."""
    tiled = tile_media(task, out)
    per = [t.shape[0] for t in tiled.arrays]  # tiles per image (a video: per frame)
    if task.kind == "video":
        frames, count, fps = chosen_frames(task.blob, task.frames, task.bound)
        seen.append(f"{len(frames)} frames of {count} at {fps:g} fps, frames {frames}; {per[0]} tile(s) each, "
                    f"{sum(per)} tiles, {sum(per) * ck.tokens_per_tile} tokens")
        return tiled
    with Image.open(io.BytesIO(task.blob.data) if task.blob.data is not None else Path(task.blob.path)) as img:
        width, height = _upright(img)
    (grid,) = tiled.grids
    thumb = " + thumbnail" if grid.thumbnail else ""
    seen.append(f"{width}x{height}, grid {grid.cols}x{grid.rows}{thumb} = {per[0]} tiles, "
                f"{per[0] * ck.tokens_per_tile} tokens")
    return tiled


def _upright(img: Image.Image) -> tuple[int, int]:
    """An image's size after its EXIF orientation, as decode_image turns it."""
    orientation = img.getexif().get(0x0112, 1)
    return (img.height, img.width) if orientation in (5, 6, 7, 8) else (img.width, img.height)

"""`batchvl report OUT/`: what an output folder holds, gathered for one self-contained HTML page (run.report_page).

Bounded on any size of output: the part files are streamed one at a time (memory holds one part), the grid's
rows are a uniform reservoir sample of fixed size (Li's Algorithm L with a fixed seed, so the same folder gives
the same page and the work per row not taken is a counter, not a random draw), and at most `max_errors` failed
rows are kept, in part order, beside the full counts by error kind. Throughput over time comes from the parts
themselves: each is renamed into place when committed, so its modification time is its commit time, and its
rows are the rows committed then.

With several samples per row (generation.n > 1) an output row is one (id, sample): the reservoir and the error
list take output rows, so one input row may show up as several cards, each labelled with its sample, and the
bounds are those of any folder of as many output rows.

Output rows do not hold their media. With the job file (`--job`), the input is streamed once to find the
sampled rows' media references, and each is made a small JPEG thumbnail on the fly (local files, data URIs and
inline bytes; URLs are not fetched). Without it the cards show text only.
"""

from __future__ import annotations

import base64
import io
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from batchvl.config import Job
from batchvl.errors import DamagedPartError, JobError, RowError
from batchvl.io.ids import Ids
from batchvl.io.jsonl_parts import results as jsonl_results
from batchvl.io.readers import read_rows
from batchvl.io.shards import shard_status
from batchvl.io.writer import BASE_SCHEMA, error_kind, part_files, read_part_samples
from batchvl.media.fetch import load_blob
from batchvl.media.image import decode_image
from batchvl.media.sources import as_reference_list, describe, scheme_of
from batchvl.media.video import decode_frames
from batchvl.prepare.messages import flatten_messages
from batchvl.run.fingerprint import read_fingerprint, recorded_value, written_before_id_rule

THUMB_PX = 160
THUMBS_PER_ROW = 4
TEXT_CHARS = 2000  # a card's text, at most (the page stays bounded whatever the model wrote)
ERROR_CHARS = 600


@dataclass
class Card:
    """One output row as the page shows it."""

    id: str
    text: str | None
    error: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    thumbs: list[str] = field(default_factory=list)  # data: URIs of JPEG thumbnails
    media: list[str] = field(default_factory=list)  # the references, described; why a thumbnail is missing
    sample: int | None = None  # generation.n > 1: which of the row's samples this output row is

    @property
    def kind(self) -> str:
        return "ok" if self.error is None else error_kind(self.error)

    @property
    def label(self) -> str:
        """The output row's name on the page: its id, and its sample where the row has several."""
        return self.id if self.sample is None else f"{self.id} · sample {self.sample}"


@dataclass
class Gathered:
    """What the page shows: counts over every row, and bounded samples of them."""

    out_dir: Path
    rows: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    output_tokens: int = 0
    commits: list[tuple[float, int]] = field(default_factory=list)  # (part mtime, rows), one per part
    damaged: list[str] = field(default_factory=list)
    sample: list[Card] = field(default_factory=list)
    sample_size: int = 0
    seed: int = 0
    errors: list[Card] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    media_note: str = ""

    @property
    def samples(self) -> int:
        """Output rows per input row: the folder's generation.n (1 for a folder written before it was recorded)."""
        n = recorded_value(self.fingerprint, "generation.n")
        return n if isinstance(n, int) and n > 1 else 1

    @property
    def ok(self) -> int:
        return self.rows - sum(self.failed.values())


class Reservoir:
    """A uniform sample of `size` items from a stream of unknown length (Li 1994, Algorithm L): after the first
    `size`, the positions to take are drawn as geometric jumps, so items skipped cost nothing."""

    def __init__(self, size: int, seed: int):
        self.size, self.rng = size, random.Random(seed)
        self.items: list[Any] = []
        self._w = math.exp(math.log(self._u()) / size) if size else 0.0
        self.next = size + self._jump() if size else math.inf  # the position of the next item taken after filling

    def _u(self) -> float:
        return self.rng.random() or 1e-300

    def _jump(self) -> int:
        return int(math.log(self._u()) / math.log1p(-self._w)) if self._w < 1 else 0

    def picks(self, start: int, n: int) -> list[tuple[int, int]]:
        """(position in the batch, slot) for each of the items start..start+n-1 that is taken; slot ==
        len(items) appends, any other replaces. The caller stores them in this order."""
        out = []
        filled = len(self.items)
        for pos in range(max(start, filled), min(start + n, self.size)):
            out.append((pos - start, filled))
            filled += 1
            self.items.append(None)
        while self.next < start + n:
            out.append((int(self.next) - start, self.rng.randrange(self.size)))
            self._w *= math.exp(math.log(self._u()) / self.size)
            self.next += self._jump() + 1
        return out


def gather(out_dir: Path, sample_rows: int = 200, max_errors: int = 200, seed: int = 0) -> Gathered:
    """Stream the folder's parts once: counts, tokens, commit times, a sample of rows and the first failed ones."""
    if not out_dir.is_dir():
        raise JobError(f"report: no such output folder: {out_dir}")
    g = Gathered(out_dir, sample_size=sample_rows, seed=seed)
    g.fingerprint = read_fingerprint(out_dir) or {}
    g.summaries = shard_status(out_dir)
    parts = part_files(out_dir)
    if not parts and not g.fingerprint:
        raise JobError(f"report: {out_dir} is not an output folder of batchvl (no part files, no _batchvl.json)")
    reservoir = Reservoir(sample_rows, seed)
    for part in parts:
        try:
            n, tokens, errors, take = _read(part)
        except DamagedPartError as e:
            g.damaged.append(str(e))
            continue
        g.commits.append((part.stat().st_mtime, n))
        g.prompt_tokens += tokens[0]
        g.output_tokens += tokens[1]
        for _, message in errors:
            kind = error_kind(message)
            g.failed[kind] = g.failed.get(kind, 0) + 1
        room = max_errors - len(g.errors)
        if room > 0 and errors:
            g.errors += take([pos for pos, _ in errors[:room]])
        picks = reservoir.picks(g.rows, n)
        for (_, slot), card in zip(picks, take([pos for pos, _ in picks]), strict=True):
            reservoir.items[slot] = card
        g.rows += n
    g.sample = reservoir.items
    return g


def _read(part: Path) -> tuple[int, tuple[int, int], list[tuple[int, str]], Callable[[list[int]], list[Card]]]:
    """A part's row count, (prompt, output) tokens, its failed rows as (position, error), and a function giving
    the Cards of rows by position."""
    if part.suffix == ".jsonl":
        results = list(jsonl_results(part))
        errors = [(i, r.error) for i, r in enumerate(results) if r.error is not None]
        tokens = (sum(r.prompt_tokens or 0 for r in results), sum(r.output_tokens or 0 for r in results))
        return len(results), tokens, errors, lambda rows: [
            Card(str(results[i].id), results[i].text, results[i].error, results[i].finish_reason,
                 results[i].prompt_tokens or 0, results[i].output_tokens or 0, sample=results[i].sample)
            for i in rows]
    table, _ = read_part_samples(part, BASE_SCHEMA.names)
    error = table.column("error")
    failed = pc.indices_nonzero(pc.is_valid(error)).to_pylist()
    messages = error.take(failed).to_pylist() if failed else []
    tokens = tuple(pc.sum(table.column(c)).as_py() or 0 for c in ("prompt_tokens", "output_tokens"))
    return table.num_rows, tokens, list(zip(failed, messages, strict=True)), lambda rows: [
        Card(r["id"], r["text"], r["error"], r["finish_reason"], r["prompt_tokens"] or 0, r["output_tokens"] or 0,
             sample=r.get("sample")) for r in table.take(rows).to_pylist()] if rows else []


# --- media, through the job's input ---------------------------------------------------------------------------

def attach_media(g: Gathered, job: Job | None) -> None:
    """Give the sampled cards their thumbnails, found through the job's input; say on the page what was done."""
    if job is None:
        g.media_note = ("Text only: the output folder does not record where its input is; pass --job JOB.yaml to "
                        "show each row's images.")
        return
    wanted: dict[str, list[Card]] = {}  # several samples of one row share its input row, and its thumbnails
    for card in g.sample:
        wanted.setdefault(card.id, []).append(card)
    if not wanted:
        return
    found = 0
    for media_root, row_id, refs in _input_refs(job, g.out_dir, set(wanted)):
        cards = wanted.get(row_id)
        if cards is None:
            continue
        found += 1
        thumbs, problems = [], []
        for kind, ref in refs[:THUMBS_PER_ROW]:
            try:
                thumbs.append(thumbnail(kind, ref, media_root, job.media.max_image_pixels))
            except (RowError, OSError, ValueError) as e:
                problems.append(f"{describe(ref)}: {str(e)[:160]}")
        for card in cards:
            card.thumbs += thumbs
            if card.error is None:  # a failed row's error says it already
                card.media += problems
        if found == len(wanted):
            break
    g.media_note = (f"Thumbnails ({THUMB_PX} px) made from the input of {job.input.path} for {found} of the "
                    f"{len(wanted)} sampled rows." + ("" if found == len(wanted) else
                                                      " The others' ids are not in the input (any more)."))


def _input_refs(job: Job, out_dir: Path, wanted: set[str]) -> Iterator[tuple[Path, str, list[tuple[str, Any]]]]:
    """(media root, row id, [(kind, reference)]) for the input rows whose ids are wanted (a duplicate's output id
    `ID#dup@...` is found by its input id)."""
    bases = {i.split("#dup@")[0]: i for i in wanted}
    ids = Ids.of(job, old_values=written_before_id_rule(out_dir))
    inp = job.input
    for path, row in read_rows(job.input.files, ids):
        row_id = row.id if row.id in wanted else bases.get(row.id)
        if row_id is None or row.data is None:
            continue
        refs = [("image", r) for r in _refs(row.data.get(inp.image_column) if inp.image_column else None)]
        refs += [("video", r) for r in _refs(row.data.get(inp.video_column) if inp.video_column else None)]
        if inp.messages_column is not None:
            try:
                refs += [(m.kind, m.ref) for m in flatten_messages(row.data.get(inp.messages_column), 1,
                                                                   inp.messages_column)[1]]
            except RowError:
                pass
        yield job.media_root_for(path), row_id, refs


def _refs(cell: Any) -> list[Any]:
    return [] if isinstance(cell, (int, float, bool)) else as_reference_list(cell)


def thumbnail(kind: str, ref: Any, media_root: Path, max_pixels: int | None) -> str:
    """A JPEG thumbnail of an image (or a video's middle frame) as a data: URI. URLs are not fetched."""
    if isinstance(ref, str) and scheme_of(ref) not in ("", "file", "data"):
        raise RowError("not fetched for the report (a URL)")
    blob = load_blob(ref, media_root)
    if kind == "video":
        image = decode_frames(blob, 1)[0]
    else:
        data = blob.data if blob.data is not None else blob.path.read_bytes()
        image = decode_image(data, blob.name, max_pixels)
    image.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

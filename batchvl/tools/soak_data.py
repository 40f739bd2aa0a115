"""The chaos soak's data and its verdict on an output folder (the driver is batchvl.tools.soak).

`make_dataset` writes, from a seed, an input folder of text-only rows, rows naming small PNG/JPEG files and
rows holding image bytes (a Parquet binary column), plus a few rows that are bad on purpose: a line that is not
JSON, an image file that is not there, bytes that are no image. Each bad row must come out as exactly one
error row of a known kind; every other row as one row without error.

`check_output` reads every part file of a folder and says whether each id is there exactly once, with the
error (or none) its row asks for; `compare_texts` compares two folders' rows over a set of ids.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGES = 48  # distinct small images, shared by the image rows
WORDS = ("cat", "window", "river", "red", "car", "beach", "sunset", "chart", "page", "dog", "ball", "frame",
         "kitchen", "mountain", "snow", "two", "people", "bowl", "fruit", "street", "blue", "sky", "light")
PROMPTS = ("Describe this in a few words:", "What is shown here?", "Caption:", "List what you see about",
           "Say something about")


@dataclass
class Dataset:
    """What was written: the good rows (id -> the record, its image bytes under `image` for Parquet rows),
    and the ids of the bad rows with the error kind each must come out with (`input`, `media`)."""
    folder: Path
    good: dict[str, dict] = field(default_factory=dict)
    parquet_ids: set[str] = field(default_factory=set)
    bad: dict[str, str] = field(default_factory=dict)

    @property
    def ids(self) -> set[str]:
        return set(self.good) | set(self.bad)


def _image_bytes(rng: np.random.Generator, index: int) -> tuple[str, bytes]:
    """A small image (8 to 48 pixels a side, smooth colours and noise), as PNG or JPEG bytes."""
    width, height = (int(v) for v in rng.integers(8, 49, size=2))
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * (c + 1) * 9 + y * (3 - c) * 7 + index * 31) % 256 for c in range(3)], -1)
    pixels = (base + rng.integers(0, 30, size=(height, width, 3))) % 256
    buf = io.BytesIO()
    kind = "png" if index % 2 else "jpeg"
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buf, format=kind)
    return ("png" if kind == "png" else "jpg"), buf.getvalue()


def _prompt(rng: random.Random, i: int) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    return f"{rng.choice(PROMPTS)} {words} (row {i})"


def make_dataset(folder: Path, rows: int, seed: int, image_share: float = 0.2, bad_rows: int = 3,
                 chunk: int = 1000) -> Dataset:
    """Write `rows` input rows to `folder/input` and their image files to `folder/media`: a share `image_share`
    of them with one image (half by path, half as bytes), and `bad_rows` of them bad on purpose (one of each
    kind in turn). Every `chunk` rows make a JSONL file (text rows, image paths) and a Parquet file (image
    bytes), `rows-NNNNN.jsonl` and `rows-NNNNN.parquet`, so that the kinds of rows mix all along the run.
    Everything follows from `seed`."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    media, inp = folder / "media", folder / "input"
    media.mkdir(parents=True)
    inp.mkdir(parents=True)
    images = []
    for k in range(IMAGES):
        ext, data = _image_bytes(np_rng, k)
        (media / f"img-{k:02d}.{ext}").write_bytes(data)
        images.append((f"img-{k:02d}.{ext}", data))
    bad_at = dict(zip(rng.sample(range(rows), min(bad_rows, rows)), range(bad_rows), strict=False))
    data = Dataset(folder)
    for first in range(0, rows, chunk):
        name = f"rows-{first // chunk:05d}"
        lines: list[str] = []
        table: dict[str, list] = {"id": [], "prompt": [], "image": []}
        for i in range(first, min(first + chunk, rows)):
            row_id = f"row-{i:06d}"
            record = {"id": row_id, "prompt": _prompt(rng, i)}
            draw = rng.random()
            if i in bad_at:
                kind = bad_at[i] % 3
                if kind == 0:  # not JSON: its output id is its position, file:line
                    lines.append(json.dumps(record)[:-9])
                    data.bad[f"{name}.jsonl:{len(lines)}"] = "input"
                elif kind == 1:
                    lines.append(json.dumps({**record, "image": f"missing-{i}.png"}))
                    data.bad[row_id] = "media"
                else:
                    _add(table, {**record, "image": b"\x89PNG\r\n\x1a\n" + rng.randbytes(40)})
                    data.bad[row_id] = "media"
            elif draw < image_share / 2:
                record["image"] = rng.choice(images)[1]
                _add(table, record)
                data.good[row_id] = record
                data.parquet_ids.add(row_id)
            else:
                if draw < image_share:
                    record["image"] = rng.choice(images)[0]
                lines.append(json.dumps(record))
                data.good[row_id] = record
        (inp / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        write_parquet(inp / f"{name}.parquet", table)
    return data


def _add(table: dict[str, list], record: dict) -> None:
    for key, column in table.items():
        column.append(record[key])


def write_parquet(path: Path, table: dict[str, list]) -> None:
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("image", pa.binary())])
    pq.write_table(pa.table(table, schema=schema), path, row_group_size=1000)


def write_subset(data: Dataset, ids: list[str], folder: Path) -> Path:
    """The good rows `ids` of `data`, written as an input folder of their own (the same records, in one JSONL
    and one Parquet file; image paths stay relative to the dataset's media folder): the clean run's input."""
    folder.mkdir(parents=True)
    lines, table = [], {"id": [], "prompt": [], "image": []}
    for row_id in ids:
        record = data.good[row_id]
        if row_id in data.parquet_ids:
            _add(table, record)
        else:
            lines.append(json.dumps(record))
    (folder / "rows.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    write_parquet(folder / "rows.parquet", table)
    return folder


def job_dict(model: Path, input_dir: Path, media_root: Path, out: Path, batch: int, rows_per_file: int,
             new_tokens: int) -> dict:
    """The soak's job: the tiny model on the CPU in float32, greedy, one tile per image (small images, cheap)."""
    return {
        "model": str(model),
        "input": {"path": str(input_dir), "id_column": "id", "prompt_column": "prompt", "image_column": "image",
                  "media_root": str(media_root)},
        "output": {"path": str(out), "rows_per_file": rows_per_file},
        "media": {"max_dynamic_patch": 1},
        "generation": {"max_new_tokens": new_tokens, "temperature": 0.0},
        "engine": {"backend": "native", "device": "cpu", "dtype": "float32", "max_batch_size": batch},
    }


def read_output(out: Path) -> tuple[list[dict], list[str]]:
    """Every row of every part file (id, text, error, finish_reason, token counts), and the parts that could
    not be read."""
    rows, damaged = [], []
    for part in sorted(out.glob("part-*.parquet")):
        try:
            rows.extend(pq.read_table(part).to_pylist())
        except (OSError, pa.ArrowException) as e:
            damaged.append(f"{part.name}: {e}")
    return rows, damaged


@dataclass
class Verdict:
    """One check: its name, whether it holds, and a line of detail."""
    name: str
    ok: bool
    detail: str


def _some(ids, n: int = 5) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:n])) + (f" (+{len(ids) - n} more)" if len(ids) > n else "")


def check_output(data: Dataset, rows: list[dict], damaged: list[str]) -> list[Verdict]:
    """Exactly once: every input id once, no other id; errors only where the input row is bad, of its kind."""
    counts = Counter(r["id"] for r in rows)
    dup = {i: n for i, n in counts.items() if n > 1}
    missing = data.ids - set(counts)
    extra = set(counts) - data.ids
    once = not dup and not missing and not extra and not damaged
    detail = (f"{len(rows)} rows in {len(counts)} ids for {len(data.ids)} inputs; duplicated: {len(dup)}"
              + (f" [{_some(f'{i} x{n}' for i, n in dup.items())}]" if dup else "")
              + f"; missing: {len(missing)}" + (f" [{_some(missing)}]" if missing else "")
              + f"; unexpected: {len(extra)}" + (f" [{_some(extra)}]" if extra else "")
              + (f"; unreadable parts: {_some(damaged, 2)}" if damaged else ""))
    wrong = []
    for r in rows:
        kind = data.bad.get(r["id"])
        if kind is None and r["id"] in data.good and (r["error"] is not None or r["text"] is None):
            wrong.append(f"{r['id']}: {r['error']}")
        elif kind is not None and not (r["error"] or "").startswith(kind + ":"):
            wrong.append(f"{r['id']}: expected a {kind} error, got {r['error']!r}")
    errors = Verdict("errors only where meant", not wrong,
                     f"{len(data.bad)} bad input rows ({', '.join(sorted(set(data.bad.values())))}), "
                     f"{sum(r['error'] is not None for r in rows)} error rows"
                     + (f"; wrong: {_some(wrong, 3)}" if wrong else ""))
    return [Verdict("every id exactly once", once, detail), errors]


COMPARED = ("text", "error", "finish_reason", "prompt_tokens", "output_tokens")


def compare_texts(rows: list[dict], clean: list[dict], ids: list[str]) -> Verdict:
    """Whether the soak's rows and the clean run's agree on `ids` (text, finish reason, token counts)."""
    soak = {r["id"]: r for r in rows}
    ref = {r["id"]: r for r in clean}
    differ = [i for i in ids if i not in soak or i not in ref
              or any(soak[i][k] != ref[i][k] for k in COMPARED)]
    shown = [f"{i}: {soak.get(i, {}).get('text')!r} != {ref.get(i, {}).get('text')!r}" for i in differ[:3]]
    return Verdict("text = one clean run", not differ and len(ref) == len(ids),
                   f"{len(ids) - len(differ)}/{len(ids)} sampled ids identical (clean run: {len(ref)} rows)"
                   + (f"; differ: {'; '.join(shown)}" if differ else ""))

"""JSONL part files (`output.format: jsonl` or `openai-batch`): one JSON object a line, each part written whole
under a temporary name and renamed into place, as the Parquet parts are (io.writer).

A `jsonl` line is the Parquet output's row: `id, text, error, finish_reason, prompt_tokens, output_tokens`, the
job's own columns (`sample`, `prompt`, `tile_grids`: io.columns) and the keep columns. An `openai-batch` line is
an OpenAI batch result (io.openai_batch), whose `custom_id` is the row's id and whose `error.message` its error;
the own columns are top-level keys of it. A part is damaged when a line does not parse as JSON or the last line
lacks its newline (a part cut short): the run stops on it, and `batchvl repair` moves it aside.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from batchvl.core import Result
from batchvl.errors import DamagedPartError
from batchvl.io.columns import own_value
from batchvl.io.openai_batch import is_result_line, line_id_error, line_result, result_line

BASE_FIELDS = ("id", "text", "error", "finish_reason", "prompt_tokens", "output_tokens")


def encode_line(value: dict[str, Any]) -> bytes:
    """One JSON line in UTF-8. A lone surrogate in a string is written as its JSON escape (`\\udc80`), which reads
    back as it was; a value JSON has no form for is written as its text."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text.encode("utf-8", "backslashreplace") + b"\n"


def write_results(f: IO[bytes], results: list[Result], fmt: str, keep_columns: list[str], model: str,
                  own: list[str] = ()) -> None:
    """Results as lines of `fmt` (jsonl or openai-batch) into an open binary file, with the own columns `own`
    (io.writer.own_columns) and the keep columns."""
    for r in results:
        own_values = {c: own_value(r, c) for c in own}
        if fmt == "openai-batch":
            line = {**result_line(r, model), **own_values}
        else:
            line = {"id": r.id, "text": r.text, "error": r.error, "finish_reason": r.finish_reason,
                    "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens, **own_values,
                    **{c: r.keep.get(c) for c in keep_columns}}
        f.write(encode_line(line))


def part_lines(part: Path) -> Iterator[dict[str, Any]]:
    """The lines of a JSONL part, parsed. DamagedPartError for a part that is cut short or does not parse."""
    try:
        with open(part, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    raise DamagedPartError(part, f"line {number} is cut short (no newline)")
                try:
                    line = json.loads(raw)
                except ValueError as e:
                    raise DamagedPartError(part, f"line {number} is not JSON: {' '.join(str(e).split())[:100]}") \
                        from None
                if not isinstance(line, dict):
                    raise DamagedPartError(part, f"line {number} is not a JSON object")
                yield line
    except OSError as e:
        raise DamagedPartError(part, " ".join(str(e).split())[:160]) from None


def line_id_and_error(line: dict[str, Any]) -> tuple[Any, str | None]:
    """(row id, error) of an output line of either kind."""
    return line_id_error(line) if is_result_line(line) else (line.get("id"), line.get("error"))


def index(part: Path) -> tuple[list[str], list[str | None], list[int] | None]:
    """The ids, errors and sample indices (None when its lines have no `sample`: generation.n 1) of a JSONL
    part, in order. DamagedPartError as part_lines."""
    ids, errors, samples = [], [], []
    for line in part_lines(part):
        row_id, error = line_id_and_error(line)
        if not isinstance(row_id, str):
            raise DamagedPartError(part, f"a line has no id: {json.dumps(line)[:80]}")
        ids.append(row_id)
        errors.append(error)
        samples.append(line.get("sample"))
    return ids, errors, samples if any(isinstance(k, int) for k in samples) else None


def results(part: Path) -> Iterator[Result]:
    """The Results a JSONL part was written from (keep columns in `keep`)."""
    for line in part_lines(part):
        if is_result_line(line):
            yield line_result(line)
            continue
        keep = {k: v for k, v in line.items() if k not in BASE_FIELDS}  # own columns too, as table_results
        sample = line.get("sample")
        yield Result(line["id"], line.get("text"), line.get("error"), line.get("finish_reason", "stop"),
                     line.get("prompt_tokens", 0), line.get("output_tokens", 0), keep,
                     sample=sample if isinstance(sample, int) else None)


def without(part: Path, drop: Callable[[str, str | None], bool]) -> tuple[list[bytes], int]:
    """The raw lines of a part that `drop(id, error)` keeps, and how many it drops."""
    kept, dropped = [], 0
    with open(part, "rb") as f:
        raw_lines = f.readlines()
    for raw in raw_lines:
        if drop(*line_id_and_error(json.loads(raw))):
            dropped += 1
        else:
            kept.append(raw)
    return kept, dropped


def count_lines(part: Path) -> int:
    with open(part, "rb") as f:
        return sum(1 for _ in f)

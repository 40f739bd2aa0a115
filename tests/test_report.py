"""`batchvl report OUT/`: one self-contained HTML page of an output folder, looked at in a real headless browser
(Chromium's engine, from the PySide6-WebEngine wheel: tests/browser.py), and bounded on a large output."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchvl.cli import main
from batchvl.core import Result
from batchvl.io.durable import Owner
from batchvl.io.writer import BASE_SCHEMA, PartWriter
from batchvl.run.report import Reservoir, gather

from .conftest import base_job, write_job, write_jsonl

BROWSER = Path(__file__).with_name("browser.py")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An output folder as a run leaves it, written by the run's own writer (OpenAI batch lines, three parts),
    with two rows whose image is missing, and the job file whose input names the rows' images."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("report")
    (tmp / "media").mkdir()
    for i, size in enumerate([(300, 200), (120, 260), (200, 200)]):
        Image.new("RGB", size, (60 * i, 120, 200)).save(tmp / "media" / f"im{i}.jpg")
    rows = [{"id": f"row{i}", "prompt": "Describe the image.", "image": f"media/im{i % 3}.jpg"} for i in range(5)]
    rows += [{"id": "lost", "prompt": "x", "image": "media/none.jpg"},
             {"id": "gone", "prompt": "x", "image": "media/none2.jpg"}]
    job = write_job(tmp / "job.yaml", base_job(tmp / "model", write_jsonl(tmp / "in.jsonl", rows), tmp / "out"))
    writer = PartWriter(tmp / "out", BASE_SCHEMA, 3, Owner.new(), format="openai-batch", model="tiny")
    for r in rows[:5]:
        writer.add(Result(r["id"], f"a picture <b>{r['id']}</b>", None, "stop", 250, 7))
    for r in rows[5:]:
        writer.add(Result.failed(r["id"], f"media: no such file: {r['image']}"))
    writer.close()
    return tmp, job


def _browse(page: Path, tmp: Path) -> tuple[bytes, str]:
    """(screenshot PNG, DOM after the page's script ran) from the headless browser."""
    shot, dom = tmp / "shot.png", tmp / "dom.html"
    proc = subprocess.run([sys.executable, str(BROWSER), str(page), str(shot), str(dom), "1280", "1400"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return shot.read_bytes(), dom.read_text(encoding="utf-8")


def test_report_shows_thumbnails_error_rows_and_filters_in_a_headless_browser(finished_run, tmp_path):
    tmp, job = finished_run
    page = tmp_path / "report.html"
    assert main(["report", str(tmp / "out"), "--job", str(job), "-o", str(page)]) == 0
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=['\"]?(https?:|/|file:)", html)  # self-contained

    png, dom = _browse(page, tmp_path)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000  # a real picture, not a blank page
    from PIL import Image

    with Image.open(tmp_path / "shot.png") as shot:
        assert shot.size == (1280, 1400) and len(shot.convert("RGB").getcolors(1 << 20) or ()) > 50
    thumbs = re.findall(r"<img src=\"data:image/jpeg;base64,[A-Za-z0-9+/=]+\"", dom)
    assert len(thumbs) == 5  # one per row whose image exists
    assert "7 card(s) shown" in dom  # the filter's script ran
    assert re.search(r"<tr class=\"errrow\"[^>]*data-kind=\"media\"[^>]*><td class=\"id\">lost</td>", dom)
    assert "media: no such file" in dom and "showing all 7 rows" in dom
    assert "<b>row0" not in dom and "&lt;b&gt;row0" in dom  # the model's text is text, not markup
    assert re.search(r"<td>media</td><td>2</td>", dom)  # the count by kind


def test_report_without_the_job_shows_text_only_cards_and_says_so(finished_run, tmp_path):
    tmp, _ = finished_run
    page = tmp_path / "r.html"
    assert main(["report", str(tmp / "out"), "-o", str(page), "--rows", "2"]) == 0
    html = page.read_text(encoding="utf-8")
    assert "data:image" not in html and "pass --job" in html
    assert "showing 2 of 7 rows, sampled uniformly with seed 0" in html


def test_report_of_a_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().startswith("batchvl: error: report: no such output folder")


def _big_output(out: Path, rows: int, per_part: int) -> None:
    """`rows` output rows as Parquet parts, one in 50 failed, written directly."""
    out.mkdir()
    for p, start in enumerate(range(0, rows, per_part)):
        n = min(per_part, rows - start)
        ids = [f"id{i}" for i in range(start, start + n)]
        errors = [f"{'media' if i % 100 else 'prompt'}: bad {i}" if i % 50 == 0 else None
                  for i in range(start, start + n)]
        table = pa.table({"id": ids, "text": [f"caption number {i} " * 4 for i in range(start, start + n)],
                          "error": errors, "finish_reason": ["stop"] * n, "prompt_tokens": [100] * n,
                          "output_tokens": [20] * n}, schema=BASE_SCHEMA)
        pq.write_table(table, out / f"part-20260101T000000-aaaaaaaa-{p:05d}.parquet")


def test_report_of_200k_rows_is_bounded_in_time_memory_and_size(tmp_path):
    out = tmp_path / "out"
    _big_output(out, 200_000, 10_000)
    tracemalloc.start()
    start = time.perf_counter()
    g = gather(out, sample_rows=200, max_errors=200)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert g.rows == 200_000 and g.failed == {"media": 2000, "prompt": 2000}
    assert g.output_tokens == 4_000_000 and len(g.commits) == 20
    assert len(g.sample) == 200 and len(g.errors) == 200 and len({c.id for c in g.sample}) == 200
    assert elapsed < 10 and peak < 64 << 20  # one part's rows at a time, not 200k
    page = tmp_path / "big.html"
    assert main(["report", str(out), "-o", str(page)]) == 0
    assert page.stat().st_size < 1 << 20
    assert "showing 200 of 200,000 rows, sampled uniformly with seed 0" in page.read_text(encoding="utf-8")
    assert "the first 200 of 4,000 failed rows" in page.read_text(encoding="utf-8")


def test_the_reservoir_samples_every_position_alike():
    """Over many seeds, each of 100 positions streamed in uneven parts lands in a 10-row sample about 10% of the
    time (Algorithm L is uniform), and a seed always gives the same sample."""
    hits = [0] * 100
    for seed in range(2000):
        r = Reservoir(10, seed)
        start = 0
        for n in (7, 30, 1, 62):
            for pos, slot in r.picks(start, n):
                r.items[slot] = start + pos
            start += n
        assert sorted(r.items) == sorted(set(r.items)) and len(r.items) == 10
        for i in r.items:
            hits[i] += 1
    assert min(hits) > 140 and max(hits) < 270  # expected 200 each


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_several_samples_per_row_each_get_a_labelled_card_and_error_row_within_the_bounds(tmp_path, fmt):
    """generation.n 3: every (id, sample) is a card or a failed row of its own, named with its sample, each card
    with its input row's thumbnail; the sample and the error list stay bounded by output rows."""
    import json

    from PIL import Image

    from batchvl.io.columns import own_columns
    from batchvl.io.writer import FINGERPRINT_NAME, output_schema

    for i in range(2):
        Image.new("RGB", (80, 60), (90 * i, 40, 160)).save(tmp_path / f"im{i}.jpg")
    rows = [{"id": "a", "prompt": "x", "image": "im0.jpg"}, {"id": "b", "prompt": "x", "image": "im1.jpg"}]
    job = write_job(tmp_path / "job.yaml", base_job(tmp_path / "model", write_jsonl(tmp_path / "in.jsonl", rows),
                                                    tmp_path / "out"))
    out = tmp_path / "out"
    writer = PartWriter(out, output_schema({}, own_columns(3, False)), 4, Owner.new(), format=fmt)
    for k in range(3):
        writer.add(Result("a", f"text a{k}", None, "stop", 10, 3, sample=k))
    writer.add(Result("b", "text b0", None, "stop", 10, 3, sample=0))
    for k in (1, 2):
        writer.add(Result.failed("b", f"prompt: too long for sample {k}", sample=k))
    writer.close()
    (out / FINGERPRINT_NAME).write_text(json.dumps({"job": {"generation.n": 3}}), encoding="utf-8")

    g = gather(out)
    assert sorted((c.id, c.sample) for c in g.sample) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert [c.label for c in g.errors] == ["b · sample 1", "b · sample 2"]
    page = tmp_path / "r.html"
    assert main(["report", str(out), "--job", str(job), "-o", str(page)]) == 0
    html = page.read_text(encoding="utf-8")
    for k in range(3):
        assert f"<div class=id>a · sample {k}</div>" in html and f"<div class=id>b · sample {k}</div>" in html
    assert len(re.findall(r"<img src='data:image/jpeg", html)) == 6  # every sample's card, not one per id
    assert re.findall(r"<td class=id>([^<]*)</td>", html) == ["b · sample 1", "b · sample 2"]
    assert "with 3 samples per input row, a row here is one (id, sample)" in html

    small = gather(out, sample_rows=2, max_errors=1)
    assert len(small.sample) == 2 and [c.label for c in small.errors] == ["b · sample 1"]

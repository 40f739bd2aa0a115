"""output.include_prompt: the prompt the engine got, collapsed as `batchvl preview` shows it, and each image's (a
video's frames') tile grid, as columns of every output format; part of the fingerprint. (The grids through the
worker processes: tests/test_media_processes.py.)"""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from batchvl.cli import main
from batchvl.core import Result, TileGrid
from batchvl.io.columns import own_columns
from batchvl.io.durable import Owner
from batchvl.io.jsonl_parts import results
from batchvl.io.writer import PartWriter, output_schema, part_files, part_index, read_done
from batchvl.media.tiling import choose_grid
from batchvl.models.checkpoint import CheckpointInfo

from .conftest import base_job, random_image, write_job, write_jsonl
from .test_video_messages import write_video


def test_the_prompt_and_tile_grids_of_an_image_a_text_and_a_video_row(tiny_model, tmp_path, capsys):
    random_image(300, 200).save(tmp_path / "a.png")
    write_video(tmp_path / "clip.mp4", frames=6)
    write_jsonl(tmp_path / "rows.jsonl", [{"id": "pic", "prompt": "Describe it.", "image": "a.png"},
                                          {"id": "txt", "prompt": "Say something."},
                                          {"id": "vid", "prompt": "What happens?", "video": "clip.mp4"}])
    job = write_job(tmp_path / "job.yaml", base_job(
        tiny_model, tmp_path / "rows.jsonl", tmp_path / "out", input={"video_column": "video"},
        output={"include_prompt": True}, generation={"max_new_tokens": 2},
        media={"max_dynamic_patch": 6, "use_thumbnail": True, "video_frames": 2, "video_max_dynamic_patch": 1}))
    assert main(["run", str(job), "--quiet"]) == 0
    table = pq.read_table(tmp_path / "out")
    assert table.column_names[6:] == ["prompt", "tile_grids"]  # after the base columns; no `sample` with n: 1
    rows = {r["id"]: r for r in table.to_pylist()}
    per_tile = CheckpointInfo.read(tiny_model).tokens_per_tile

    cols, rows_ = choose_grid(300, 200, 1, 6)  # the tiling's own choice for this size
    assert rows["pic"]["tile_grids"] == [{"cols": cols, "rows": rows_, "thumbnail": True,
                                          "tokens": (cols * rows_ + 1) * per_tile}]
    assert rows["txt"]["tile_grids"] == []
    assert rows["vid"]["tile_grids"] == [{"cols": 1, "rows": 1, "thumbnail": False, "tokens": per_tile}] * 2
    assert f"<img><IMG_CONTEXT>×{(cols * rows_ + 1) * per_tile}</img>" in rows["pic"]["prompt"]
    assert "Say something." in rows["txt"]["prompt"] and "<img>" not in rows["txt"]["prompt"]
    video = rows["vid"]["prompt"]
    assert video.count(f"<img><IMG_CONTEXT>×{per_tile}</img>") == 2 and "Frame2:" in video

    capsys.readouterr()
    assert main(["preview", str(job), "--rows", "3"]) == 0  # the same prompt, line for line, as preview prints it
    shown = capsys.readouterr().out.split("\nrow ")
    for block, row_id in zip(shown[1:], ("pic", "txt", "vid"), strict=True):
        lines = block.split("  prompt: ", 1)[1].splitlines()[1:]
        assert [x.removeprefix("    ") for x in lines] == rows[row_id]["prompt"].splitlines(), row_id

    for fmt in ("jsonl", "openai-batch"):  # `batchvl export` carries the columns into either format
        assert main(["export", str(tmp_path / "out"), "-o", str(tmp_path / f"{fmt}.jsonl"), "--format", fmt]) == 0
        lines = {x.get("id") if fmt == "jsonl" else x["custom_id"]: x
                 for x in map(json.loads, (tmp_path / f"{fmt}.jsonl").read_text().splitlines())}
        assert {k: (v["prompt"], v["tile_grids"]) for k, v in lines.items()} == \
            {k: (v["prompt"], v["tile_grids"]) for k, v in rows.items()}, fmt

    capsys.readouterr()
    assert main(["run", str(job), "--quiet", "--set", "output.include_prompt=false"]) == 2  # one folder, one schema
    assert "output.include_prompt: true -> false" in capsys.readouterr().err


def test_jsonl_and_openai_batch_parts_hold_the_own_columns_and_read_back_their_samples(tmp_path):
    grids = [TileGrid(2, 1, True, 12)]
    done = [Result("a", "x", None, "stop", 5, 1, sample=0, prompt="p <img>", tile_grids=grids),
            Result("a", None, "media: gone", "error", 0, 0, sample=1)]
    schema = output_schema({}, own_columns(2, include_prompt=True))
    for fmt in ("jsonl", "openai-batch"):
        out = tmp_path / fmt
        writer = PartWriter(out, schema, 10, Owner.new(), format=fmt, model="m")
        for r in done:
            writer.add(r)
        writer.close()
        (part,) = part_files(out)
        assert part_index(part) == (["a", "a"], [None, "media: gone"], [0, 1])
        assert read_done(out).samples == {("a", 0), ("a", 1)}
        back = list(results(part))
        assert [r.sample for r in back] == [0, 1] and back[0].keep["tile_grids"] == [g._asdict() for g in grids]
        assert back[0].keep["prompt"] == "p <img>" and back[1].keep["tile_grids"] is None
    first, second = (json.loads(x) for x in (tmp_path / "openai-batch").glob("part-*").__next__().read_text()
                     .splitlines())
    assert first["custom_id"] == second["custom_id"] == "a" and first["id"] != second["id"]  # a line per sample
    assert first["response"]["body"]["choices"][0]["index"] == 0 and second["error"]["code"] == "media"

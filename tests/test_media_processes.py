"""Decoding and tiling in worker processes (media.prepare_processes): the same tiles and errors as the threads,
a worker that dies is replaced and costs at most its item, and nothing is left behind: no process, no shared
memory, after a run, an exception or Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batchvl.cli import main
from batchvl.core import Request, Result, Row
from batchvl.errors import RowError, TransientError
from batchvl.media.fetch import Blob
from batchvl.media.image import decode_image
from batchvl.media.pixels import Tiled, TileTask, tile_media
from batchvl.media.pool import TilePool
from batchvl.media.tiling import choose_grid
from batchvl.prepare.prefetch import Prefetcher, tile_pool

from .conftest import base_job, drain_slowly, random_image, write_job, write_jsonl
from .test_prefetch import preparer
from .test_robustness import by_id
from .test_tiling import reference_tiles
from .test_video_messages import write_video

REPO = Path(__file__).resolve().parents[1]
TILE = 448 * 448 * 3


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Images of every kind decode_image handles, and some it refuses."""
    d = tmp_path_factory.mktemp("media")
    for name, (w, h) in {"wide.jpg": (900, 500), "tall.png": (300, 700), "square.jpg": (448, 448),
                         "tiny.png": (60, 40), "panorama.jpg": (2000, 300), "dot.png": (1, 1)}.items():
        random_image(w, h, seed=w + h).save(d / name, quality=95)
    rgba = random_image(500, 400, seed=1).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((500, 400)))
    rgba.save(d / "alpha.png")
    rgba.convert("LA").save(d / "grey-alpha.png")
    palette = random_image(200, 300, seed=2).convert("P")
    palette.info["transparency"] = 0
    palette.save(d / "palette.png", transparency=0)
    random_image(640, 480, seed=3).convert("L").save(d / "grey.png")
    Image.fromarray((np.arange(300 * 200, dtype=np.uint32).reshape(200, 300) % 65536).astype(np.uint16)) \
        .save(d / "grey16.png")
    random_image(400, 300, seed=4).convert("CMYK").save(d / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the decoded image is 300 wide, 800 high
    random_image(800, 300, seed=5).save(d / "rotated.jpg", exif=exif)
    jpeg = (d / "wide.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 3])
    (d / "garbage.png").write_bytes(np.random.default_rng(6).bytes(5000))
    (d / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (1200, 1000)).save(d / "huge.png")  # over the max_image_pixels of the tests below
    noise(900, 800).save(d / "noise.png", compress_level=1)  # its bytes are larger than a slot
    write_video(d / "clip.mp4", frames=12)
    return d


ROWS = [["wide.jpg"], ["tall.png"], ["square.jpg"], ["tiny.png"], ["panorama.jpg"], ["dot.png"], ["alpha.png"],
        ["grey-alpha.png"], ["palette.png"], ["grey.png"], ["grey16.png"], ["cmyk.jpg"], ["rotated.jpg"],
        ["truncated.jpg"], ["garbage.png"], ["empty.jpg"], ["huge.png"], ["missing.png"], ["noise.png"],
        ["wide.jpg", "alpha.png", "rotated.jpg"], ["tall.png", "garbage.png"], ["panorama.jpg"]]


def rows_of(refs: list[list[str]], media: Path, extra: dict[int, dict] | None = None) -> list[tuple[Path, Row]]:
    extra = extra or {}
    return [(media / "rows.jsonl", Row(id=f"r{i}", source=f"rows.jsonl:{i}", data={"image": r, **extra.get(i, {})}))
            for i, r in enumerate(refs)]


def prepare(rows, prep, media: Path, processes: int) -> list[Request | Result]:
    pre = Prefetcher(rows, prep, lambda f: media, max_rows=8, threads=2,
                     tiles=tile_pool(prep.s, processes) if processes else None)
    try:
        return list(pre)
    finally:
        pre.close()


def test_tiles_and_errors_from_processes_are_byte_for_byte_the_threads(media):
    """Every kind of image, refused ones among them, one to three per row: the same tiles, prompt and tile
    counts, or the same error, from two worker processes as from threads; the good rows' tiles also equal the
    reference tiling of the decoded image. Row 21 asks for 6 tiles, more than a slot of this job holds (its
    tiles come back pickled), and noise.png's bytes do not fit a slot either (they go pickled)."""
    prep = preparer(max_image_pixels=1_000_000, max_dynamic_patch_column="n", include_prompt=True)
    rows = rows_of(ROWS, media, {21: {"n": 6}})
    threads = prepare(rows, prep, media, 0)
    processes = prepare(rows, prep, media, 2)

    slot = tile_pool(prep.s, 1)
    slot.close()
    assert (media / "noise.png").stat().st_size > slot.slot_bytes
    assert threads[21].tiles.shape[0] * TILE > slot.slot_bytes
    errors = {r.id: r.error for r in threads if isinstance(r, Result)}
    assert set(errors) == {"r13", "r14", "r15", "r16", "r17", "r20"}, errors
    assert "media: image too large: 1200x1000" in errors["r16"]
    for t, p in zip(threads, processes, strict=True):
        assert type(t) is type(p) and t.id == p.id
        if isinstance(t, Result):
            assert p.error == t.error
            continue
        assert p.tiles_per_image == t.tiles_per_image and p.prompt_ids == t.prompt_ids
        assert p.tiles.dtype == torch.uint8 and torch.equal(p.tiles, t.tiles), t.id
        assert p.tile_grids == t.tile_grids and p.prompt == t.prompt, t.id  # output.include_prompt's columns
        assert [g.cols * g.rows + g.thumbnail for g in p.tile_grids] == p.tiles_per_image
    for (_, row), got in zip(rows, processes, strict=True):
        if isinstance(got, Request) and len(row.data["image"]) == 1:
            image = decode_image((media / row.data["image"][0]).read_bytes())
            want = np.stack([np.asarray(t) for t in reference_tiles(image, 1, row.data.get("n", 2))])
            assert np.array_equal(got.tiles.numpy(), want), row.id
            (grid,) = got.tile_grids  # the grid the tiling chose, as the reference picks it for this size
            assert (grid.cols, grid.rows) == choose_grid(image.width, image.height, 1, row.data.get("n", 2)), row.id


def test_video_frames_are_tiled_in_processes_as_in_threads(media):
    prep = preparer(image_column=None, video_column="video", video_frames=5, video_max_tiles=2)
    rows = [(media / "rows.jsonl", Row(id="v", source="rows.jsonl:1", data={"video": "clip.mp4"}))]
    (threads,), (processes,) = prepare(rows, prep, media, 0), prepare(rows, prep, media, 1)
    assert isinstance(threads, Request), threads
    assert processes.tiles_per_image == threads.tiles_per_image == [1] * 5
    assert torch.equal(processes.tiles, threads.tiles)


def task_for(path: Path) -> TileTask:
    return TileTask(Blob(str(path), data=path.read_bytes()), "image", 1, 6, True, 448, None)


def same(got: Tiled, want: Tiled) -> bool:
    return got.grids == want.grids and len(got.arrays) == len(want.arrays) and all(
        np.array_equal(a, b) for a, b in zip(got.arrays, want.arrays, strict=True))


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def gone_soon(pids, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_worker_killed_mid_item_is_replaced_and_the_item_tried_again(media, monkeypatch):
    task = task_for(media / "wide.jpg")
    # The first worker stalls once it has written the item's tiles into its slot, over the item's bytes.
    monkeypatch.setenv("BATCHVL_FAULT", "sleep:tile:1:60")
    with TilePool(1, 8 * TILE) as pool, ThreadPoolExecutor(1) as caller:
        assert pool.wait_ready(60)
        tiled = caller.submit(pool.tile, task)
        while pool.workers()[0][1] == 0:
            time.sleep(0.01)
        time.sleep(0.5)  # tiling it takes 20 ms: it is stalled by now
        ((pid, held),) = pool.workers()
        monkeypatch.delenv("BATCHVL_FAULT")  # its replacement works normally
        os.kill(pid, signal.SIGKILL)
        assert same(tiled.result(timeout=60), tile_media(task))
        assert pool.restarts == 1 and held == 1
        ((new, _),) = pool.workers()
        assert new != pid and not alive(pid)


def test_an_item_whose_workers_die_twice_fails_alone_and_the_pool_goes_on(media, monkeypatch):
    monkeypatch.setenv("BATCHVL_FAULT", "kill:tile:1")  # each worker dies at its first item
    with TilePool(1, 8 * TILE) as pool:
        with pytest.raises(RowError) as failed:
            pool.tile(task_for(media / "tall.png"))
        assert str(failed.value) == (f"media: a preparation process died 2 times while preparing "
                                     f"{media / 'tall.png'} (killed by SIGKILL)")
        monkeypatch.delenv("BATCHVL_FAULT")
        task = task_for(media / "wide.jpg")
        assert same(pool.tile(task), tile_media(task))  # on a new worker: one, or two if the next died too
        assert pool.restarts >= 2


def test_the_process_path_keeps_the_prefetchers_byte_budget(media):
    """The threads' test_byte_budget_bounds_memory_under_a_slow_consumer, with two worker processes."""
    prep = preparer()
    rows = rows_of([["wide.jpg"]] * 8, media)
    one_row = 900 * 500 * 6 + (media / "wide.jpg").stat().st_size + 3 * TILE  # decoding, bytes, tiles
    pre = Prefetcher(rows, prep, lambda f: media, max_rows=8, max_bytes=2 * one_row, threads=1,
                     tiles=tile_pool(prep.s, 2))
    assert drain_slowly(pre) == 8
    assert one_row <= pre.peak_bytes <= 3 * one_row  # the budget, and the row the consumer waits for


def ring_descriptors() -> list[str]:
    out = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            out.append(os.readlink(fd))
        except OSError:  # the listing's own descriptor, closed meanwhile
            pass
    return [link for link in out if "batchvl-tiles" in link]


def test_closing_after_the_end_or_an_exception_leaves_no_process_and_no_shared_memory(media):
    shm = sorted(os.listdir("/dev/shm"))
    prep = preparer()

    def failing_rows():
        yield from rows_of([["wide.jpg"], ["tall.png"]], media)
        raise OSError("disk gone")

    for rows, raises in ((rows_of([["wide.jpg"]] * 4, media), False), (failing_rows(), True)):
        tiles = tile_pool(prep.s, 2)
        assert tiles.wait_ready(60)
        pids = [pid for pid, _ in tiles.workers()]
        assert ring_descriptors()  # the ring is there while the pool is (its descriptor, and its mapping's)
        pre = Prefetcher(rows, prep, lambda f: media, threads=2, tiles=tiles)
        try:
            if raises:
                with pytest.raises(OSError, match="disk gone"):
                    list(pre)
            else:
                assert [type(r) for r in pre] == [Request] * 4
        finally:
            pre.close()
        assert not any(alive(p) for p in pids)  # close() waits for them
        assert ring_descriptors() == []
    assert sorted(os.listdir("/dev/shm")) == shm


def test_ctrl_c_stops_a_run_and_its_workers_and_the_run_resumes_with_threads(tiny_model, media, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C: the workers ignore it, the run finishes its
    batch, stops (exit 130) and closes them; the same job resumes without processes (not in the fingerprint)."""
    names = ["wide.jpg", "tall.png", "alpha.png", "rotated.jpg"]
    rows = [{"id": f"r{i:02d}", "prompt": "Describe.", "image": str(media / names[i % 4])} for i in range(24)]
    job = base_job(tiny_model, write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "out",
                   engine={"backend": "transformers", "device": "cpu", "dtype": "float32", "max_batch_size": 2},
                   output={"rows_per_file": 2}, generation={"max_new_tokens": 2},
                   media={"prepare_processes": 2, "max_dynamic_patch": 2})
    job_file = write_job(tmp_path / "job.yaml", job)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("BATCHVL_FAULT", None)
    proc = subprocess.Popen([sys.executable, "-m", "batchvl", "run", str(job_file), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob("part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    workers = [p for p in children(proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert gone_soon(workers)
    done = by_id(tmp_path / "out")
    assert 0 < len(done) < 24
    assert main(["run", str(job_file), "--quiet", "--set", "media.prepare_processes=0"]) == 0
    out = by_id(tmp_path / "out")
    assert sorted(out) == [r["id"] for r in rows] and all(r["error"] is None for r in out.values())


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError):
            pass
    return out


def test_a_worker_that_cannot_start_breaks_the_pool_with_one_message():
    """A worker that dies before it is ready, again and again (here: its Python cannot start), must not be
    restarted forever: the pool gives up, and every call says so."""
    import multiprocessing.spawn as spawn
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # it starts with the same executable: before the switch
    python = spawn.get_executable()
    spawn.set_executable("/bin/false")
    try:
        with TilePool(1, 8 * TILE) as pool:
            assert not pool.wait_ready(60)
            with pytest.raises(TransientError, match=r"^media: preparation processes cannot start: 3 ended before "
                                                     r"ready \(exit code 1\); the run stops \(rerun to resume\)$"):
                pool.tile(TileTask(Blob("a.png", data=b"x"), "image", 1, 1, True, 448, None))
    finally:
        spawn.set_executable(python)


def test_bench_media_takes_worker_counts_as_lists_or_repeated(capsys):
    from batchvl.cli import _parser

    args = _parser().parse_args(["bench-media", "--threads", "1,2", "--processes", "1", "--processes", "2,4"])
    assert (args.threads, args.processes, args.pipes) == ([1, 2], [1, 2, 4], False)
    with pytest.raises(SystemExit) as bad:
        _parser().parse_args(["bench-media", "--processes", "2,-1"])
    assert bad.value.code == 2 and "counts must be >= 0, got '2,-1'" in capsys.readouterr().err


@pytest.mark.parametrize("processes,threads,gpu,batchvl_main,cores,want", [
    ("auto", 0, True, True, 16, (28, 14)),  # a native engine on a GPU, from the batchvl command: processes, and
                                            # two threads per process to keep each worker's next item ready
    ("auto", 0, False, True, 16, (16, 0)),  # no GPU: the engine is the bottleneck, threads do it
    ("auto", 0, True, False, 16, (16, 0)),  # a user's script: spawned workers would import it again
    ("auto", 0, True, True, 3, (3, 0)),  # too few cores to leave two to the engine's process
    ("auto", 20, True, True, 8, (20, 6)),  # more threads than two per process: as set
    (0, 0, True, True, 16, (16, 0)),  # none asked for
    (3, 0, False, False, 16, (6, 3)),  # a number is taken as it is, anywhere
])
def test_media_workers_take_processes_where_a_gpu_engine_waits_for_its_gil(monkeypatch, processes, threads, gpu,
                                                                           batchvl_main, cores, want):
    from types import SimpleNamespace

    from batchvl.config.spec import MediaSpec
    from batchvl.run import loop

    job = SimpleNamespace(media=MediaSpec(prepare_processes=processes, prepare_threads=threads))
    monkeypatch.setattr(loop, "native_on_gpu", lambda job: gpu)
    monkeypatch.setattr(loop, "_started_by_batchvl", lambda: batchvl_main)
    assert loop.media_workers(job, cores=cores) == want
    assert loop.media_workers(job, cores=cores, processes=False) == (threads or cores, 0)  # the API's prefetchers


def test_the_batchvl_command_is_recognised_as_safe_to_spawn_from(monkeypatch):
    """`python -m batchvl` and the `batchvl` script qualify; a user's script does not."""
    from types import ModuleType, SimpleNamespace

    from batchvl.run import loop

    main_module = ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main_module)
    main_module.__spec__ = SimpleNamespace(name="batchvl.__main__")
    assert loop._started_by_batchvl()
    main_module.__spec__ = SimpleNamespace(name="captions")
    assert not loop._started_by_batchvl()
    main_module.__spec__ = None
    main_module.__file__ = "/venv/bin/batchvl"
    assert loop._started_by_batchvl()
    main_module.__file__ = "/home/me/caption.py"
    assert not loop._started_by_batchvl()

"""`batchvl bench-media`: how fast media preparation runs, against a naive single-thread Pillow loop.

It writes real JPEG files of two workloads to a temporary folder, then prepares each workload into
model-ready tiles: once with a plain loop (decode, tile, normalise, one image after another, as the
InternVL reference code does), then with batchvl's prefetch pipeline (asyncio reads) once per worker count
asked for: `--threads T` decoding and tiling in T threads, `--processes P` in P worker processes
(`media.prepare_processes`). It prints images/s and tiles/s, per worker, the main process's CPU time per
image (what the engine's thread shares the GIL with), and how long the worker processes took to start.

- `7tile`: every image 1344x896 (3x2 tiles + thumbnail = 7 tiles), the `caption-7tile` shape.
- `mixed`: 4:3 and 16:9 photos, portraits, panoramas and scanned pages from 320 to 4000 pixels, up to 12
  tiles each.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from batchvl.core import Request, Row
from batchvl.media.pool import TilePool
from batchvl.media.tiling import tile_image
from batchvl.prepare.prefetch import Prefetcher, tile_pool
from batchvl.prepare.preparer import PrepareSettings, RowPreparer
from batchvl.prepare.prompt import PromptBuilder

MIXED_SHAPES = [(4, 3), (3, 4), (16, 9), (9, 16), (3, 1), (1, 3), (1, 1.414), (1, 1)]


@dataclass
class BenchResult:
    workload: str
    method: str  # "naive loop", "threads", "processes" (or "processes, pipes": tiles pickled, for comparison)
    workers: int
    images: int
    tiles: int
    seconds: float
    main_cpu_s: float = 0.0  # the main process's CPU time, all its threads
    start_s: float | None = None  # worker processes: from starting them to all ready, before `seconds` starts

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A photo-like image (smooth gradients, shapes and noise), so JPEG sizes and decode costs are realistic."""
    small = rng.integers(0, 255, size=(max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def write_images(folder: Path, workload: str, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEG files of the workload's sizes, written in parallel; each image's pixels come from its own
    seeded generator, so the files are the same whatever the thread count."""
    pick = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(count):
        if workload == "7tile":
            w, h = 1344, 896
        else:
            a, b = pick.choice(MIXED_SHAPES)
            long_side = pick.randint(320, 4000)
            w, h = (long_side, int(long_side * b / a)) if a >= b else (int(long_side * a / b), long_side)
        jobs.append((folder / f"{workload}-{i:05d}.jpg", max(w, 8), max(h, 8), i))

    def write(job: tuple[Path, int, int, int]) -> Path:
        path, w, h, i = job
        photo(w, h, np.random.default_rng([seed, i])).save(path, quality=90)
        return path

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(write, jobs))


def naive_loop(paths: list[Path], max_tiles: int) -> tuple[int, float]:
    """The reference recipe, one image after another: Pillow open + RGB, dynamic tiling, then per tile a
    ToTensor (uint8 -> float / 255) and Normalize in torch."""
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, really: torch would spread the arithmetic over every core
    try:
        start = time.perf_counter()
        tiles = 0
        for path in paths:
            image = Image.open(path).convert("RGB")
            pixels = torch.stack([(torch.from_numpy(np.array(t)).permute(2, 0, 1).float().div(255) - mean) / std
                                  for t in tile_image(image, 1, max_tiles)])
            tiles += pixels.shape[0]
        return tiles, time.perf_counter() - start
    finally:
        torch.set_num_threads(torch_threads)


class _NoTokens:
    bos_token = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [0] * 8}


def pipeline(paths: list[Path], max_tiles: int, threads: int = 0, processes: int = 0,
             pipes: bool = False) -> tuple[int, float, float, float | None]:
    """Prepare `paths` with the prefetcher on `threads` threads, or on `processes` worker processes (their
    tiles pickled through pipes with `pipes`, for comparison). (tiles, seconds, main CPU seconds, start-up
    seconds of the processes or None)."""
    settings = PrepareSettings(prompt="Describe.", prompt_column=None, image_column="image",
                               max_dynamic_patch_column=None, keep_columns=(), keep_as_json=True, min_tiles=1,
                               max_tiles=max_tiles, use_thumbnail=True, tile_size=448, max_prompt_tokens=1 << 30)
    preparer = RowPreparer(settings, PromptBuilder(_NoTokens(), None, tokens_per_tile=256))
    rows = [(p, Row(id=p.name, source=p.name, data={"image": str(p)})) for p in paths]
    tiles_pool, start_s = None, None
    if processes:
        started = time.perf_counter()
        tiles_pool = TilePool(processes, 0) if pipes else tile_pool(settings, processes)
        if not tiles_pool.wait_ready(timeout=120):
            tiles_pool.close()
            raise RuntimeError("bench-media: the worker processes did not start (see their errors above)")
        start_s = time.perf_counter() - started
    workers = processes or threads
    cpu = time.process_time()
    start = time.perf_counter()
    pre = Prefetcher(rows, preparer, lambda f: f.parent, max_rows=4 * workers, max_bytes=4 << 30,
                     threads=threads or 1, tiles=tiles_pool)
    tiles = 0
    try:
        for item in pre:
            if not isinstance(item, Request):
                raise RuntimeError(f"preparation failed: {item.error}")
            tiles += item.tiles.shape[0]
        seconds = time.perf_counter() - start
        main_cpu = time.process_time() - cpu
    finally:
        pre.close()
    return tiles, seconds, main_cpu, start_s


def run(images: int, workloads: list[str], naive_images: int, threads: list[int] = (), processes: list[int] = (),
        pipes: bool = False) -> list[BenchResult]:
    """The naive loop, then the pipeline at each thread count, then at each process count (and with `pipes`,
    again with the tiles pickled through pipes), per workload."""
    results = []
    runs = [("threads", t, {"threads": t}) for t in threads]
    runs += [("processes", p, {"processes": p}) for p in processes]
    runs += [("processes, pipes", p, {"processes": p, "pipes": True}) for p in processes if pipes]
    with tempfile.TemporaryDirectory() as tmp:
        for workload in workloads:
            paths = write_images(Path(tmp) / workload, workload, images)
            max_tiles = 12
            cpu = time.process_time()
            tiles, seconds = naive_loop(paths[:naive_images], max_tiles)
            results.append(BenchResult(workload, "naive loop", 1, min(naive_images, len(paths)), tiles, seconds,
                                       time.process_time() - cpu))
            for method, workers, how in runs:
                tiles, seconds, main_cpu, start_s = pipeline(paths, max_tiles, **how)
                results.append(BenchResult(workload, method, workers, len(paths), tiles, seconds, main_cpu,
                                           start_s))
    return results


def format_table(results: list[BenchResult]) -> str:
    lines = ["| workload | method | workers | images | tiles | images/s | tiles/s | images/s per worker "
             "| main CPU ms/image | start s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        start = "" if r.start_s is None else f"{r.start_s:.2f}"
        lines.append(f"| {r.workload} | {r.method} | {r.workers} | {r.images} | {r.tiles} | {r.images_per_s:.1f} "
                     f"| {r.tiles_per_s:.1f} | {r.images_per_s / r.workers:.1f} "
                     f"| {1000 * r.main_cpu_s / r.images:.1f} | {start} |")
    return "\n".join(lines)


def main(images: int, threads: list[int], processes: list[int], workloads: list[str], naive_images: int,
         pipes: bool = False) -> int:
    cores = os.cpu_count() or 1
    threads = [t or cores for t in threads] or ([] if processes else [cores])
    processes = [p or cores for p in processes]
    print(f"bench-media: {images} images per workload, threads {threads or '-'}, processes {processes or '-'}, "
          f"{cores} cores", flush=True)
    print(format_table(run(images, workloads, naive_images, threads, processes, pipes)))
    return 0

"""`batchvl bench`'s data: its workloads, the rows and synthetic media files each one runs over, and the short
chat template both sides use."""

from __future__ import annotations

import json
from pathlib import Path

from batchvl.tools.bench_media import write_images

WORKLOADS = {"caption-7tile": dict(images="7tile", max_new_tokens=128),
             "mixed": dict(images="mixed", max_new_tokens=256),  # each row 32..256 (seeded), its own limit
             "video": dict(images=None, max_new_tokens=256),  # 8 frames x 1 tile from synthetic mp4 files
             # 7-tile captions whose lengths follow a long tail, as a trained model's do (natural_length)
             "caption-natural": dict(images="7tile", max_new_tokens=400)}
PER_ROW_LIMITS = ("mixed", "caption-natural")  # workloads whose rows carry their own max_new_tokens ("limit")
SHORT_TEMPLATE = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                  "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def write_videos(folder: Path, count: int, frames: int = 48, size: tuple[int, int] = (640, 360)) -> list[Path]:
    """Synthetic mp4 clips (moving shapes over noise), with PyAV if installed, else OpenCV."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        base = rng.integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        base = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))
        clip = [np.roll(base, 6 * t, axis=1) for t in range(frames)]
        path = folder / f"clip-{i:05d}.mp4"
        _write_mp4(path, clip, fps=24)
        paths.append(path)
    return paths


def _write_mp4(path: Path, frames: list, fps: int) -> None:
    try:
        import av
    except ImportError:
        import cv2

        h, w = frames[0].shape[:2]
        out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        for f in frames:
            out.write(f[:, :, ::-1])
        out.release()
        return
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def natural_length(rng) -> int:
    """A caption length as trained models' captions run: nine rows in ten take 40 to 120 tokens (uniform),
    the tenth 120 to 400, log-uniform, so that a few run long. `rng`: a random.Random (seeded by the caller)."""
    if rng.random() < 0.9:
        return rng.randint(40, 120)
    return round(120 * (400 / 120) ** rng.random())


def prepare_data(root: Path, workload: str, rows: int) -> Path:
    import random

    lengths = random.Random(0)
    with open(root / "rows.jsonl", "w") as f:
        if workload == "video":
            for p in write_videos(root / "videos", rows):
                f.write(json.dumps({"id": p.stem, "prompt": "Describe what happens in the video.",
                                    "video": str(p)}) + "\n")
        else:
            for p in write_images(root / "images", WORKLOADS[workload]["images"], rows):
                row = {"id": p.stem, "prompt": "Describe this image in detail.", "image": str(p)}
                if workload == "mixed":
                    row["limit"] = lengths.randint(32, 256)
                elif workload == "caption-natural":
                    row["limit"] = natural_length(lengths)
                f.write(json.dumps(row) + "\n")
    (root / "short.jinja").write_text(SHORT_TEMPLATE)
    return root / "rows.jsonl"

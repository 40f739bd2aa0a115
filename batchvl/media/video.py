"""Video frames, sampled the InternVL way.

InternVL's `get_index` splits the clip (or the `bound` [start, end] in seconds) into `num_segments` equal
segments and takes the frame in the middle of each. Frames are decoded with decord; if decord is missing
and PyAV is installed, PyAV decodes instead. Each frame then becomes one or more tiles like any image.

At most `MAX_VIDEO_FRAMES` frames are sampled from one video (`media.video_frames` and a row's frames column
alike): the frames are held decoded, at full size, until they are tiled.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from batchvl.config.checks import LIMITS
from batchvl.errors import RowError
from batchvl.media.fetch import Blob
from batchvl.media.limits import machine_errno, retry_machine_sync

MAX_VIDEO_FRAMES = LIMITS["media.video_frames"]  # the job file's bound on media.video_frames, per row too
DECODE_CHUNK = 8  # frames decoded at once (decord); each is made an image before the next chunk


def frame_indices(max_frame: int, fps: float, num_segments: int, bound: Sequence[float] | None = None,
                  first_idx: int = 0) -> list[int]:
    """InternVL's get_index: the middle frame of each of `num_segments` equal segments.

    `max_frame` is the last frame's index (frames - 1); `bound` is (start, end) in seconds, or None for the
    whole clip.
    """
    start, end = (bound[0], bound[1]) if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + seg_size / 2 + np.round(seg_size * i)) for i in range(num_segments)]


def check_frames(num_segments: int, name: str = "video") -> None:
    if num_segments > MAX_VIDEO_FRAMES:
        raise RowError(f"media: {num_segments} frames asked of {name}, more than the {MAX_VIDEO_FRAMES} a video may "
                       "give (media.video_frames)")


def decode_frames(blob: Blob, num_segments: int, bound: Sequence[float] | None = None) -> list[Image.Image]:
    """The sampled frames of a video as RGB images (at most MAX_VIDEO_FRAMES, checked before decoding)."""
    check_frames(num_segments, blob.name)
    try:
        import decord  # noqa: F401
    except ImportError:
        decord = None
    if decord is not None:
        return _decord_frames(blob, num_segments, bound)
    try:
        import av  # noqa: F401
    except ImportError:
        raise RowError("media: video needs decord (pip install decord), or PyAV as a fallback (pip install av)") \
            from None
    return _pyav_frames(blob, num_segments, bound)


def chosen_frames(blob: Blob, num_segments: int, bound: Sequence[float] | None = None) -> tuple[list[int], int, float]:
    """(the indices of the frames `decode_frames` takes, the video's frame count, its frame rate), from the
    container alone: nothing is decoded (batchvl preview)."""
    check_frames(num_segments, blob.name)
    source = str(blob.path) if blob.path is not None else io.BytesIO(blob.data)
    try:
        try:
            import decord
        except ImportError:
            import av

            with av.open(source) as container:
                stream = container.streams.video[0]
                count, fps = stream.frames, float(stream.average_rate or stream.guessed_rate or 1)
        else:
            reader = decord.VideoReader(source, ctx=decord.cpu(0), num_threads=1)
            count, fps = len(reader), float(reader.get_avg_fps())
    except ImportError:
        raise RowError("media: video needs decord (pip install decord), or PyAV (pip install av)") from None
    except Exception as e:  # each library's own errors for a file that is not a video
        raise RowError(f"media: cannot read video {blob.name}: {str(e).splitlines()[0][:200]}") from None
    return frame_indices(count - 1, fps, num_segments, bound), count, fps


def _decord_frames(blob: Blob, num_segments: int, bound) -> list[Image.Image]:
    import decord

    def open_reader():
        source = str(blob.path) if blob.path is not None else io.BytesIO(blob.data)
        try:
            return decord.VideoReader(source, ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # decord raises DECORDError (a RuntimeError) with ffmpeg's message
            _raise_if_machine(e)
            raise RowError(f"media: cannot decode video {blob.name}: {str(e).splitlines()[0][:200]}") from None

    reader = retry_machine_sync(open_reader, blob.name)
    if len(reader) == 0:
        raise RowError(f"media: video has no frames: {blob.name}")
    indices = frame_indices(len(reader) - 1, float(reader.get_avg_fps()), num_segments, bound)
    images = []
    for start in range(0, len(indices), DECODE_CHUNK):
        try:
            frames = reader.get_batch(indices[start:start + DECODE_CHUNK]).asnumpy()  # [n, H, W, 3] uint8
        except Exception as e:
            raise RowError(f"media: cannot read frames of {blob.name}: {str(e).splitlines()[0][:200]}") from None
        images += [Image.fromarray(f) for f in frames]  # already RGB
    return images


def _pyav_frames(blob: Blob, num_segments: int, bound) -> list[Image.Image]:
    import av

    source = str(blob.path) if blob.path is not None else io.BytesIO(blob.data)
    try:
        with retry_machine_sync(lambda: av.open(source), blob.name) as container:
            if not container.streams.video:
                raise RowError(f"media: no video stream in {blob.name}")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 1)
            # With a frame count in the header, keep only the sampled frames; without one, keep them all.
            wanted = set(frame_indices(stream.frames - 1, fps, num_segments, bound)) if stream.frames else None
            frames = {}
            for i, frame in enumerate(container.decode(stream)):
                if wanted is None or i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
            count = stream.frames or len(frames)
    except RowError:
        raise
    except Exception as e:  # av.error.* for damaged or non-video files
        raise RowError(f"media: cannot decode video {blob.name}: {e}") from None
    if not frames:
        raise RowError(f"media: video has no frames: {blob.name}")
    indices = frame_indices(count - 1, fps, num_segments, bound)
    last = max(frames)
    return [Image.fromarray(frames[min(i, last)] if i in frames else frames[last]) for i in indices]


def _raise_if_machine(e: Exception) -> None:
    """decord reports a file it could not open in text only: out of file descriptors is the machine's fault."""
    if machine_errno(e) is not None:
        raise e
    if "Too many open files" in str(e):
        import errno

        raise OSError(errno.EMFILE, "Too many open files") from None


def decoded_size(blob: Blob, num_segments: int) -> int:
    """About the most memory decoding `num_segments` frames of this video takes (each frame an RGB image of 4
    bytes a pixel, plus one chunk of frames as an array), from its header alone. RowError past MAX_VIDEO_FRAMES;
    1080p frames are assumed when PyAV is not there to read the header, and 0 when the header cannot be read
    (decoding then fails and says why)."""
    check_frames(num_segments, blob.name)
    try:
        import av
    except ImportError:
        width, height = 1920, 1080
    else:
        source = str(blob.path) if blob.path is not None else io.BytesIO(blob.data)
        try:
            with av.open(source) as container:
                context = container.streams.video[0].codec_context
                width, height = context.width, context.height
        except Exception:
            return 0
    return width * height * (4 * num_segments + 3 * min(num_segments, DECODE_CHUNK))

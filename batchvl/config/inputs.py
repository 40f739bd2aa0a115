"""What `input.path` and `input.format` name: the input's files, and the format each is read in."""

from __future__ import annotations

import glob
import json
import posixpath
from pathlib import Path, PurePath
from typing import Any

from batchvl.config.urls import InputFile, RemoteFile, expand_braces, filesystem, is_url, local_path, url_root
from batchvl.config.values import absolute_path, one_of, path_is, shown
from batchvl.errors import JobError

# input.format: how the input's records are read (README "Input formats"). `auto` tells by each file's name:
# DATA_SUFFIXES, then a Hugging Face `save_to_disk` folder, then (only where no data file is found) media files.
INPUT_FORMATS = ("auto", "jsonl", "parquet", "csv", "tsv", "openai-batch", "webdataset", "hf-dataset", "media")
DATA_SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl", ".parquet": "parquet",
                 ".csv": "csv", ".tsv": "tsv", ".tar": "webdataset", ".tar.gz": "webdataset", ".tgz": "webdataset"}
INPUT_SUFFIXES = tuple(DATA_SUFFIXES)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
HF_STATE = "state.json"  # a `datasets` save_to_disk folder: state.json (its Arrow files), dataset_info.json
HF_SPLITS = "dataset_dict.json"  # a DatasetDict's: one such folder per split
OUTPUT_FORMATS = ("parquet", "jsonl", "openai-batch")
# The columns a format's rows always have, taken as the job's where it names none (README "Input formats"):
# an OpenAI batch line is a request with its own id, messages and token limit; a media file or a WebDataset
# sample gives its image or video.
FORMAT_COLUMNS = {
    "openai-batch": {"id_column": "custom_id", "messages_column": "messages", "max_new_tokens_column": "max_tokens"},
    "media": {"image_column": "image", "video_column": "video"},
    "webdataset": {"image_column": "image", "video_column": "video"},
}
# output.path names a folder; a name ending so is most likely meant as one file (issue 19)
FILE_LIKE_SUFFIXES = (*INPUT_SUFFIXES, ".json", ".txt", ".gz", ".zst", ".arrow")

def file_format(file: InputFile, declared: str = "auto") -> str:
    """The format a file of the input is read in: the declared one, or (auto) the one its name says."""
    if declared != "auto":
        return declared
    name = file.name.lower()
    for suffix, fmt in DATA_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    if name.endswith(".arrow"):
        return "hf-dataset"
    return "media"  # a media file, or a folder of them


def _suffixes(fmt: str) -> tuple[str, ...]:
    """The file names a format reads (auto: every data file)."""
    if fmt == "auto":
        return INPUT_SUFFIXES
    if fmt == "openai-batch":
        return tuple(s for s, f in DATA_SUFFIXES.items() if f == "jsonl")
    if fmt == "media":
        return IMAGE_SUFFIXES + VIDEO_SUFFIXES
    return tuple(s for s, f in DATA_SUFFIXES.items() if f == fmt)


def is_media_file(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES + VIDEO_SUFFIXES)


_WAY_FORWARD = ("input.format names how to read it (one of " + ", ".join(INPUT_FORMATS[1:]) +
                "; README \"Input formats\"); other data can be converted to JSONL or Parquet first")


def expand_input(path: str, base_dir: str, fmt: str = "auto", root: PurePath | None = None) -> list[InputFile]:
    """The files `input.path` names, in a stable order (see InputSpec.files). `root`: InputSpec.root, when the
    caller has it (for a URL, finding it asks the filesystem). Raises JobError naming the key."""
    one_of("input.format", fmt, INPUT_FORMATS)
    if is_url(path):
        return expand_url(path, fmt, root)
    local = local_path(path)
    p = absolute_path(local, base_dir)
    if not path_is(p, "exists") and len(patterns := expand_braces(local)) > 1:
        files = {f: None for pattern in patterns for f in _expand_local(pattern, base_dir, fmt)}
        return sorted(files)  # each name (or glob) of the braces must match, as a path of its own would
    return _expand_local(local, base_dir, fmt)


def _expand_local(path: str, base_dir: str, fmt: str) -> list[Path]:
    p = absolute_path(path, base_dir)
    name = shown(path, quote=False)
    if fmt in ("auto", "hf-dataset") and path_is(p, "is_dir") and ((p / HF_STATE).is_file()
                                                                    or (p / HF_SPLITS).is_file()):
        return hf_arrow_files(p)
    if fmt == "hf-dataset":
        raise JobError(f"input.path: {name} is not a Hugging Face dataset folder (save_to_disk writes "
                       f"{HF_STATE} and dataset_info.json, or {HF_SPLITS} for several splits)")
    suffixes = _suffixes(fmt)
    if path_is(p, "is_dir"):
        if fmt == "media":
            return [p]  # walked as it is read: a folder of millions of images is not listed up front
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(suffixes))
        if not files and fmt == "auto" and any(f.is_file() and is_media_file(f) for f in p.rglob("*")):
            return [p]  # no data file, but media files: each one is a row
        if not files:
            raise JobError(f"input.path: no {_names(suffixes)} files under directory {name}; {_WAY_FORWARD}")
        return files
    if path_is(p, "is_file"):
        if not p.name.lower().endswith(suffixes) and not (fmt == "auto" and is_media_file(p)):
            raise JobError(f"input.path: cannot tell how to read {name} from its name (expected "
                           f"{_names(suffixes)}); {_WAY_FORWARD}")
        return [p]
    if glob.has_magic(str(p)):
        matched = [Path(f) for f in glob.glob(str(p), recursive=True)]
        files = sorted(f for f in matched if f.name.lower().endswith(suffixes))
        if not files and fmt == "auto":
            files = sorted(f for f in matched if is_media_file(f))
        if not files:
            raise JobError(f"input.path: the pattern {name} matches no {_names(suffixes)} file; {_WAY_FORWARD}")
        return files
    raise JobError(f"input.path: no such file or directory: {name}")


def _kind(fs, path: str) -> str | None:
    """fsspec's type of `path` (`directory`, `file`, ...), or None when there is nothing there."""
    try:
        return fs.info(path).get("type")
    except FileNotFoundError:
        return None


def expand_url(url: str, fmt: str, root: PurePath | None = None) -> list[RemoteFile]:
    """The files an fsspec URL names (a file, every data file under a folder, a glob's or brace pattern's
    matches), as `expand_input` lists a local path's, in order. Raises JobError naming `input.path`."""
    name = shown(url, quote=False)
    if fmt in ("media", "hf-dataset"):
        raise JobError(f"input.path: {name}: input.format {fmt} reads a local folder; an fsspec URL names data "
                       f"files ({_names(_suffixes('auto'))})")
    suffixes = _suffixes(fmt)
    root = url_root(url) if root is None else root
    found: dict[str, RemoteFile] = {}
    for pattern in expand_braces(url):
        fs, path = filesystem(pattern)
        shown_pattern = shown(pattern, quote=False)
        try:
            if glob.has_magic(path):
                matched = [p for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file"]
                what = f"the pattern {shown_pattern} matches no {_names(suffixes)} file"
            else:
                kind = _kind(fs, path)  # one question to the filesystem, not isdir then isfile
                if kind == "directory":
                    matched = fs.find(path)
                    what = f"no {_names(suffixes)} files under {shown_pattern}"
                elif kind == "file":
                    if not path.lower().endswith(suffixes):
                        raise JobError(f"input.path: cannot tell how to read {shown_pattern} from its name "
                                       f"(expected {_names(suffixes)}); {_WAY_FORWARD}")
                    matched, what = [path], ""
                else:
                    raise JobError(f"input.path: no such file or directory: {shown_pattern}")
        except JobError:
            raise
        except Exception as e:  # a backend's own errors: no such bucket, no access, no network
            raise JobError(f"input.path: cannot list {shown_pattern}: {type(e).__name__}: "
                           f"{shown(str(e), quote=False)}") from None
        files = [p for p in matched if p.lower().endswith(suffixes)]
        if not files:
            raise JobError(f"input.path: {what}; {_WAY_FORWARD}")
        for p in files:
            below = posixpath.relpath(p, str(root)) if str(root) not in ("", ".") else p
            found.setdefault(p, RemoteFile(fs.unstrip_protocol(p), below))
    return sorted(found.values())


def _names(suffixes: tuple[str, ...]) -> str:
    return "/".join(suffixes) if len(suffixes) <= 4 else "/".join(suffixes[:4]) + "/..."


def hf_arrow_files(folder: Path) -> list[Path]:
    """The Arrow files of a `datasets` save_to_disk folder, in their order: those its state.json lists, or for a
    DatasetDict (dataset_dict.json), each split's in the order the file lists the splits. Raises JobError."""
    def listed(path: Path, what: str) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise JobError(f"input.path: cannot read {what} {shown(str(path), quote=False)}: {e}") from None

    if (folder / HF_SPLITS).is_file():
        splits = listed(folder / HF_SPLITS, "the split list").get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise JobError(f"input.path: {folder / HF_SPLITS} has no list of splits")
        return [f for split in splits for f in hf_arrow_files(folder / split)]
    state = listed(folder / HF_STATE, "the dataset state")
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list):
        raise JobError(f"input.path: {folder / HF_STATE} lists no _data_files")
    files = []
    for entry in entries:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not (folder / name).is_file():
            raise JobError(f"input.path: {folder / HF_STATE} names a data file that is not there: {shown(name)}")
        files.append(folder / name)
    return files

"""The fingerprint of a job: what determines its results. An output folder records the fingerprint of the job
that wrote it (`_batchvl.json`); a rerun with a different one is refused, so one folder never mixes rows of
two different jobs. Only settings that change the text of a row count. The list is explicit, here:

- model: its resolved path, a hash of config.json and generation_config.json, and a hash of the weight index
  files and the names and sizes of the weight files;
- the prompt: `prompt`, the input columns a row's prompt, media and id come from, the chat template (its text);
- output.keep_columns, output.format and output.include_prompt (the output's columns and the kind of its part
  files: one folder never mixes schemas); input.format (which reader names the rows);
- every key of `generation`, generation.n included (a folder lacking it was written with one sample per row);
- the media settings that change tiles or frames (effective values, checkpoint defaults filled in);
- the effective engine dtype, and the backend: the two backends draw samples from different random
  generators, so with sampling on they give different text for a row;
- engine.quantization and engine.quantize_vision: fp8 and bf16 rows differ. Both are always recorded, and a
  folder whose fingerprint lacks them (written before they existed) counts as `none` / `false`, its only
  possible values then (IMPLIED_WHEN_MISSING), so that an fp8 run cannot resume it;
- engine.load_format: random weights (dummy) give other text than the checkpoint's; a folder lacking it was
  written from the checkpoint's weights (`auto`);
- engine.deterministic: its rows do not depend on the batch, the others' may; a folder lacking it was written
  without it (`false`), and resuming either kind with the other setting is refused;
- the rule that makes an id column's values ids (`input.ids`): a folder written before it was recorded made
  ids with str() and keeps doing so (`written_before_id_rule`), so none of its rows runs again under a new id.

Not counted, as they do not change results: engine.max_batch_size, max_batch_tokens, device (for the same
dtype), decode_attention, compile and fused_vision_gelu (these two move 16-bit rounding only, BENCHMARKS.md
session 6), gpus, media prefetch sizes, threads, processes (media.prepare_processes: its tiles are byte for byte
the threads', tests/test_media_processes.py), HTTP settings, output.rows_per_file.

A key that the folder's recorded fingerprint does not hold was not recorded by the batchvl that wrote it, and
is not compared: a folder written before a key was added keeps resuming. The exception is a key whose value such
a folder can only have had (IMPLIED_WHEN_MISSING): it is compared against that value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

from batchvl.config import Job, JobError
from batchvl.engine.base import pick_device, pick_dtype
from batchvl.io.durable import Owner, create_json_once
from batchvl.io.ids import ID_RULE
from batchvl.io.writer import FINGERPRINT_NAME, part_files

VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ID_KEY = "input.ids"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str | None:
    return _sha(path.read_bytes()) if path.is_file() else None


def _weights_sha(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.name.endswith(".index.json") or f.suffix in WEIGHT_SUFFIXES):
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
            if f.name.endswith(".index.json"):
                h.update(f.read_bytes())
    return h.hexdigest()


def _template_text(template: Any) -> str | None:
    if template is None:
        return None
    if isinstance(template, str):
        return template
    return json.dumps(dataclasses.asdict(template), sort_keys=True, default=str) \
        if dataclasses.is_dataclass(template) else repr(template)


def _dtype(job: Job) -> str:
    if job.engine.dtype != "auto":
        return job.engine.dtype
    return str(pick_dtype("auto", pick_device(job.engine.device))).removeprefix("torch.")


def job_fingerprint(job: Job, checkpoint: Any, template: Any) -> dict[str, Any]:
    """A flat mapping of dotted keys to values (hashes for files and templates)."""
    ck = checkpoint
    text = _template_text(template)
    m, i = job.media, job.input
    fp: dict[str, Any] = {
        "model.path": str(Path(ck.path).resolve()),
        "model.config": _file_sha(Path(ck.path) / "config.json"),
        "model.generation_config": _file_sha(Path(ck.path) / "generation_config.json"),
        "model.weights": _weights_sha(Path(ck.path)),
        "prompt": job.prompt,
        "input.id_column": i.id_column,
        ID_KEY: ID_RULE,
        "input.prompt_column": i.prompt_column,
        "input.messages_column": i.messages_column,
        "input.image_column": i.image_column,
        "input.video_column": i.video_column,
        "input.video_frames_column": i.video_frames_column,
        "input.video_bound_column": i.video_bound_column,
        "input.max_dynamic_patch_column": i.max_dynamic_patch_column,
        "input.max_new_tokens_column": i.max_new_tokens_column,
        "input.format": i.format,
        "output.keep_columns": list(job.output.keep_columns),
        "output.format": job.output.format,
        "output.include_prompt": job.output.include_prompt,
        "chat_template": None if text is None else _sha(text.encode()),
        "media.max_dynamic_patch": m.max_dynamic_patch or ck.max_dynamic_patch,
        "media.min_dynamic_patch": m.min_dynamic_patch or ck.min_dynamic_patch,
        "media.use_thumbnail": ck.use_thumbnail if m.use_thumbnail is None else m.use_thumbnail,
        "media.video_frames": m.video_frames,
        "media.video_max_dynamic_patch": m.video_max_dynamic_patch,
        "media.max_image_pixels": m.max_image_pixels,
        "engine.dtype": _dtype(job),
        "engine.backend": job.engine.backend,
        "engine.quantization": job.engine.quantization,
        "engine.quantize_vision": job.engine.quantize_vision,
        "engine.load_format": job.engine.load_format,
        "engine.deterministic": job.engine.deterministic,
    }
    for f in dataclasses.fields(job.generation):
        fp[f"generation.{f.name}"] = getattr(job.generation, f.name)
    return json.loads(json.dumps(fp))  # as it reads back from the file (lists, not tuples)


def read_fingerprint(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / FINGERPRINT_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return dict(data["job"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise JobError(f"output.path: cannot read {path}: {e}; use --overwrite to start over") from None


def written_before_id_rule(out_dir: Path) -> bool:
    """Whether an output folder was written by a batchvl that made ids with str() (a bytes id as `b'...'`, a
    float as `1.0`): its fingerprint lacks `input.ids`, or it holds part files but no fingerprint."""
    recorded = read_fingerprint(out_dir)
    return bool(part_files(out_dir)) if recorded is None else ID_KEY not in recorded


def write_fingerprint(out_dir: Path, fingerprint: dict[str, Any], owner: Owner, model: str | None = None) -> bool:
    """Record the fingerprint unless the folder has one: True if this call wrote it. Shards starting at once
    race to write it; exactly one does, and the others check theirs against it. `model`: the job's `model` as
    written, which `batchvl export` names in OpenAI batch results (not compared)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"version": VERSION, "job": fingerprint, **({"model": model} if model is not None else {})}
    return create_json_once(out_dir / FINGERPRINT_NAME, record, owner)


def recorded_model(out_dir: Path) -> str | None:
    """The job's `model` as the run that wrote the folder's fingerprint named it (None for an older folder)."""
    try:
        model = json.loads((out_dir / FINGERPRINT_NAME).read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a hash
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Defaults that changed since a folder may have been written with them: its resume is refused (the value
# differs), and the refusal names the value as the former default.
FORMER_DEFAULTS: dict[str, Any] = {
    "media.max_image_pixels": 1 << 28,  # lowered to Pillow's own limit (issue 15): a PNG bomb got through
}
# Keys recorded as the value of the job setting of the same name: `--set key=recorded value` gives that value back.
SETTINGS = ("generation.", "media.", "engine.dtype", "engine.backend", "engine.quantization",
            "engine.quantize_vision", "engine.load_format", "engine.deterministic", "output.include_prompt")
# Keys added after folders were written without them, whose value in every such folder is known: a batchvl before
# engine.quantization ran everything unquantized. A folder lacking one is compared as if it held this value.
IMPLIED_WHEN_MISSING: dict[str, Any] = {"engine.quantization": "none", "engine.quantize_vision": False,
                                        "engine.load_format": "auto", "engine.deterministic": False,
                                        "output.format": "parquet",
                                        "input.format": "auto", "generation.n": 1, "output.include_prompt": False}


def recorded_value(old: dict[str, Any], key: str) -> Any:
    """What folder fingerprint `old` says for `key`, with IMPLIED_WHEN_MISSING filled in (None if neither)."""
    return old[key] if key in old else IMPLIED_WHEN_MISSING.get(key)


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys whose value changed, in a stable order. A key `old` lacks is not compared (an older batchvl did
    not record it), unless IMPLIED_WHEN_MISSING says what it was."""
    keys = [k for k in new if k in old or k in IMPLIED_WHEN_MISSING] + [k for k in old if k not in new]
    return [k for k in keys if recorded_value(old, k) != new.get(k)]


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each key whose value changed (see changed_keys)."""
    out = []
    for k in changed_keys(old, new):
        was = recorded_value(old, k)
        note = " (the former default)" if FORMER_DEFAULTS.get(k, ()) == was else ""
        note = " (not recorded: the only value then)" if k not in old else note
        out.append(f"{k}: {_show(was)}{note} -> {_show(new.get(k))}")
    return out


def resume_overrides(old: dict[str, Any], new: dict[str, Any]) -> list[str] | None:
    """The `--set` arguments that give a job the fingerprint `old` again, when only settings changed; else None."""
    keys = changed_keys(old, new)
    if not keys or not all((k in old or k in IMPLIED_WHEN_MISSING) and k in new and k.startswith(SETTINGS)
                           for k in keys):
        return None
    return [shlex.quote(f"{k}={_as_yaml(recorded_value(old, k))}") for k in keys]


def _as_yaml(value: Any) -> str:
    """A recorded value as `--set` reads it back (YAML): a string as it is, a float always with a point (YAML reads
    1e-05 as a string), anything else as JSON."""
    if isinstance(value, str):
        return value
    text = json.dumps(value)
    if isinstance(value, float) and "e" in text and "." not in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def check_fingerprint(job: Job, fingerprint: dict[str, Any]) -> None:
    """Raise JobError if the output folder was written by a job with a different fingerprint. When only settings
    changed, the message says which `--set` resumes the folder as it was written."""
    old = read_fingerprint(job.output_dir)
    if old is None:
        return
    changed = differences(old, fingerprint)
    if changed:
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        sets = resume_overrides(old, fingerprint)
        resume = "" if sets is None else (f"to resume it as it was written, run with "
                                          f"{' '.join('--set ' + s for s in sets)} (or set the same in the job "
                                          "file), or ")
        raise JobError(f"output.path: {job.output.path} was written with a different job ({shown}); "
                       f"{resume}use --overwrite to start over")

"""What a run will do, checked before anything heavy happens: the model, its tokenizer and chat template, the
input's columns and the output folder (`plan_job`, which is also `batchvl validate`); and the generation
settings the engine gets from them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchvl.config import Job, JobError
from batchvl.config.spec import InputFile, Problems, is_url, local_path, shown
from batchvl.engine import GenerationParams
from batchvl.engine.factory import check_deterministic, check_quantization
from batchvl.engine.hf import check_load_format
from batchvl.io.ids import Ids, id_type_problem, moved_folder
from batchvl.io.lease import Claim
from batchvl.io.readers import arrow_schema, columns_of, count_rows
from batchvl.io.writer import Done, read_done
from batchvl.models.checkpoint import (
    LAYOUT_OPENGVLAB,
    CheckpointInfo,
    checkpoint_chat_template,
    load_tokenizer,
    resolve_model_dir,
    stop_token_ids,
)
from batchvl.models.families import moe_architecture
from batchvl.models.loader import build_specs, check_weights
from batchvl.prepare.prompt import prompt_fields
from batchvl.prepare.templates import ConversationTemplate, get_template
from batchvl.run.fingerprint import ID_KEY, check_fingerprint, job_fingerprint, written_before_id_rule

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a run will do, checked: the model, its tokenizer and template, the input and the output."""

    job: Job
    checkpoint: CheckpointInfo
    tokenizer: Any
    template: str | ConversationTemplate | None
    files: list[InputFile]
    rows: int
    done: set[str] = field(default_factory=set)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    done_ok: int = 0  # rows of the output folder without error, and failed ones by error kind
    done_failed: dict[str, int] = field(default_factory=dict)
    done_examples: dict[str, str] = field(default_factory=dict)  # the id of one failed row of each error kind
    claim: Claim | None = None  # the output folder's lease, once a run holds it (batchvl.run.output.open_output)
    ids: Ids | None = None  # how rows are named (None: no input, as for the pipeline API)
    done_samples: set[tuple[str, int]] = field(default_factory=set)  # generation.n > 1: (id, sample) written

    def take_done(self, done: Done) -> None:
        """What the output folder holds already (batchvl.io.writer.read_done)."""
        self.done, self.done_ok, self.done_failed, self.done_examples = done.ids, done.ok, done.failed, done.examples
        self.done_samples = done.samples

    @property
    def done_rows(self) -> int:
        """Output rows already in the folder: one per id, or with generation.n > 1 one per (id, sample)."""
        return len(self.done) if self.job.generation.n == 1 else len(self.done_samples)

    def owed(self, key: str) -> tuple[int, ...]:
        """With generation.n > 1: the samples of the row with output id `key` not yet in the folder (() when
        it is done)."""
        return tuple(k for k in range(self.job.generation.n) if (key, k) not in self.done_samples)

    def describe(self) -> str:
        job = self.job
        lines = [
            f"model:    {self.checkpoint.path} ({self.checkpoint.layout} layout, "
            f"{self.checkpoint.tokens_per_tile} tokens per tile)",
            f"backend:  {job.engine.backend} (device {job.engine.device}, dtype {job.engine.dtype}, "
            f"batch {job.engine.max_batch_size}{_quantization_note(job)})" + _workers_note(job),
            f"template: {job.chat_template}" + _template_note(self.template),
            f"input:    {len(self.files)} file(s), {self.rows} row(s)",
            f"output:   {job.output_dir} ({self.done_rows} row(s) already done)"
            + (f"; {job.generation.n} samples per input row" if job.generation.n > 1 else ""),
        ]
        return "\n".join(lines)


def worker_label(device: int, cpu: bool) -> str:
    """The name of a worker in logs, part files, the progress bar and fault specs: `gpu<id>` or `cpu<n>`."""
    return f"cpu{device}" if cpu else f"gpu{device}"


def _workers_note(job: Job) -> str:
    devices = job.engine.devices
    if len(devices) == 1:
        return ""
    labels = ", ".join(worker_label(d, job.engine.device == "cpu") for d in devices)
    return f"\nworkers:  {len(devices)} engine worker processes ({labels})"


def _quantization_note(job: Job) -> str:
    if job.engine.quantization == "none":
        return ""
    return f", {job.engine.quantization} " + ("language model and vision tower" if job.engine.quantize_vision
                                               else "language model")


def _template_note(template: str | ConversationTemplate | None) -> str:
    if template is None:
        return " (prompt used raw)"
    if isinstance(template, ConversationTemplate):
        return f" (InternVL conversation template {template.name})"
    return " (jinja)"


def plan_model(job: Job, check_weight_files: bool = True) -> Plan:
    """The model half of the plan: checkpoint, tokenizer and chat template, checked; no input or output.
    (The pipeline API hands rows over in memory and needs only this.) `check_weight_files=False` opens no
    weight file at all, not even its header (`batchvl preview`: configs and tokenizer only)."""
    path = resolve_model_dir(job.model, job.base_dir)
    checkpoint = CheckpointInfo.read(path)
    limit = checkpoint.max_positions - 1  # the prompt takes at least one position
    if job.generation.max_new_tokens > limit:
        raise JobError(f"generation.max_new_tokens: must be <= {limit:,} (the model's context of "
                       f"{checkpoint.max_positions:,} positions, less one for the prompt), got "
                       f"{job.generation.max_new_tokens:,}")
    if job.engine.backend == "transformers" and checkpoint.layout == LAYOUT_OPENGVLAB \
            and not job.engine.trust_remote_code:
        raise JobError("engine.trust_remote_code: this is an OpenGVLab-layout checkpoint (InternVLChatModel); the "
                       "transformers backend can only load it with its own code: set engine.trust_remote_code: true")
    if job.engine.backend == "native":
        build_specs(checkpoint)  # an unsupported family or config fails here, before any work
    elif (moe := moe_architecture(checkpoint)) is not None:  # transformers could load it; batchvl runs none
        raise JobError(f"model: language model {moe} is a mixture-of-experts model, which batchvl does not run "
                       f"(on either backend)")
    _check_tiling(job, checkpoint)
    check_quantization(job.engine, checkpoint)  # fp8 on this device, and a checkpoint already in fp8
    check_deterministic(job.engine)  # the deterministic mode's kernels need a GPU
    if job.engine.backend == "transformers":
        check_load_format(checkpoint, job.engine.load_format)  # dummy there needs a transformers-layout checkpoint
    if check_weight_files and job.engine.load_format != "dummy":  # dummy reads no weight file, on either backend
        check_weights(path, required=job.engine.backend == "native")  # headers only: a broken shard fails here
    tokenizer = load_tokenizer(path, job.engine.trust_remote_code)
    stop_token_ids(path, tokenizer)  # a broken generation_config.json fails here
    template = _resolve_template(job, checkpoint, tokenizer)
    if isinstance(template, str):
        _check_jinja(job, template, tokenizer)
    return Plan(job, checkpoint, tokenizer, template, files=[], rows=0)


def _check_tiling(job: Job, checkpoint: CheckpointInfo) -> None:
    """A checkpoint that does not tile images (InternVL 1: `dynamic_image_size` false in its config) sees each
    image and video frame as one plain resize to its tile size, as its own code feeds it; settings that would cut
    them into tiles it was never trained on are refused, not silently followed or ignored."""
    if checkpoint.dynamic_tiling:
        return
    why = ("this checkpoint does not tile images (dynamic_image_size is false in its config, as in InternVL 1): "
           "each image is one resize to its tile size")
    for key, value in (("media.max_dynamic_patch", job.media.max_dynamic_patch),
                       ("media.min_dynamic_patch", job.media.min_dynamic_patch),
                       ("media.video_max_dynamic_patch", job.media.video_max_dynamic_patch)):
        if value is not None and value > 1:
            raise JobError(f"{key}: {value} tiles asked for, but {why}; leave it unset or 1")
    if job.input.max_dynamic_patch_column:
        raise JobError(f"input.max_dynamic_patch_column: {why}; a per-row tile count has nothing to set")


def plan_job(job: Job, check_output: bool = True, read_output: bool = True, fresh: bool = False) -> Plan:
    """Check everything a run would, without changing anything. Raises JobError naming the key.
    `check_output`: also refuse an output folder written by a job with a different fingerprint, or whose ids
    name the input files differently. `read_output`: fill in the rows already done (a run does that itself,
    once it holds the folder's lease). `fresh`: the run starts the folder over (--overwrite), so the rule its
    ids were written by does not matter."""
    problems = Problems()  # the model's, the columns' and the folder's problems are reported together
    plan = problems.run(plan_model, job)
    ids = Ids.of(job, old_values=not fresh and written_before_id_rule(job.output_dir))
    for file in job.input.files:
        _check_columns(job, file, ids, problems)
    problems.run(_check_writable, job.output_dir)
    problems.raise_any()
    plan.files, plan.ids = job.input.files, ids
    plan.fingerprint = job_fingerprint(job, plan.checkpoint, plan.template)
    if plan.ids.old_values:
        # Not recorded, so that a folder given a fingerprint now (it had parts but none) keeps its ids' old form.
        del plan.fingerprint[ID_KEY]
        if job.input.id_column is not None:
            log.warning("%s was written by a batchvl that made ids with str(); it keeps doing so for this folder "
                        "(README \"Row ids\"); --overwrite starts it over under the current rule", job.output_dir)
    if check_output:
        check_fingerprint(job, plan.fingerprint)
    plan.rows = count_rows(plan.files, job.input.format)
    if read_output:
        plan.take_done(read_done(job.output_dir))
        if check_output:
            check_ids_stay(job, plan)
    return plan


def check_ids_stay(job: Job, plan: Plan) -> None:
    """Refuse an output folder whose ids name the input files relative to another folder than this job's
    input.path does: their rows would run again under new ids. (A batchvl before ids were fixed by input.path
    named files relative to the folder holding them all, which moved when files were added.)"""
    moved = moved_folder(plan.done, (plan.ids.name(f) for f in plan.files), plan.ids.root)
    if moved is None:
        return
    old, new, folder = moved
    if is_url(job.input.path):  # the folder as a URL of the input's own filesystem
        shown_folder = f"{job.input.path.partition('://')[0]}://{str(folder).lstrip('/')}"
    else:
        given = Path(os.path.expanduser(local_path(job.input.path)))
        shown_folder = str(folder) if given.is_absolute() else os.path.relpath(folder, job.base_dir)
    folder_text = shown(shown_folder, quote=False)
    raise JobError(f"output.path: {shown(job.output.path, quote=False)} holds ids that name input files relative "
                   f"to {folder_text}, not to input.path {shown(job.input.path, quote=False)} ({shown(old)} for "
                   f"what is now {shown(new)}), so their rows would run again; to resume this folder set "
                   f"input.path: {folder_text}, or use --overwrite to start over")


def _resolve_template(job: Job, checkpoint: CheckpointInfo, tokenizer: Any) -> str | ConversationTemplate | None:
    """`none`: raw prompts; a .jinja file; or `auto`: the tokenizer's (or processor's) own template, else
    the InternVL conversation template that an OpenGVLab config names."""
    if job.chat_template == "none":
        return None
    if job.chat_template != "auto":
        try:
            return job.resolve(job.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise JobError(f"chat_template: cannot read {shown(job.chat_template, quote=False)} as UTF-8 text "
                           f"({shown(str(e), quote=False)})") from None
    template = checkpoint_chat_template(checkpoint.path, tokenizer)
    if template is not None:
        return template
    name = checkpoint.template_name
    if name:
        try:
            return get_template(name)
        except KeyError as e:
            raise JobError(f"chat_template: auto, but the checkpoint's template {e.args[0]}") from None
    raise JobError("chat_template: auto, but the checkpoint has no chat template of its own; "
                   "use none (prompt used raw) or a .jinja file")


def _check_jinja(job: Job, template: str, tokenizer: Any) -> None:
    """Compile a jinja chat template as transformers does, and render one user turn with it as each prompt row
    will: a syntax error, or a template that fails on every row, is one JobError now rather than an error in
    every row of the output. (A messages row's turns are its own, so for those only the syntax is checked.)"""
    import jinja2

    where = "the checkpoint's template" if job.chat_template == "auto" else shown(job.chat_template, quote=False)
    try:
        _compile_jinja(template)
    except jinja2.TemplateSyntaxError as e:
        raise JobError(f"chat_template: {where} has a syntax error at line {e.lineno}: "
                       f"{shown(e.message or '', quote=False)}") from None
    if job.input.messages_column is not None:
        return
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Describe this image."}], chat_template=template,
                                      tokenize=False, add_generation_prompt=True)
    except Exception as e:  # whatever a template raises on the simplest turn, every prompt row would raise
        raise JobError(f"chat_template: {where} fails on a one-turn user message ({type(e).__name__}: "
                       f"{shown(str(e), quote=False)})") from None


def _compile_jinja(source: str) -> None:
    """The jinja environment apply_chat_template renders with (its sandbox, filters and `generation` tag)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a private name that moved: jinja's own sandbox finds the same syntax errors
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.from_string(source)
        return
    _compile_jinja_template(source)


def _check_columns(job: Job, file: InputFile, ids: Ids, problems: Problems) -> None:
    """The columns the job names (and its prompt's `{column}` fields) are in the input file."""
    wanted = {
        "input.id_column": job.input.id_column,
        "input.prompt_column": job.input.prompt_column,
        "input.image_column": job.input.image_column,
        "input.max_dynamic_patch_column": job.input.max_dynamic_patch_column,
        "input.messages_column": job.input.messages_column,
        "input.max_new_tokens_column": job.input.max_new_tokens_column,
        "input.video_column": job.input.video_column,
        **{f"output.keep_columns[{i}]": c for i, c in enumerate(job.output.keep_columns)},
    }
    try:
        schema = arrow_schema(file, job.input.format_of(file))  # Parquet, Arrow: typed, read once (maybe remote)
        # JSONL: the keys of its first JSONL_COLUMN_SCAN records
        present = set(schema.names) if schema is not None else columns_of(file, job.input.format)
    except (OSError, ValueError, pa.ArrowException) as e:
        problems.add(f"input.path: cannot read {file}: {e}")
        return
    if present is None:  # an empty file has no columns to check
        return
    columns = ", ".join(sorted(present))
    for key, column in wanted.items():
        if column is not None and column not in present:
            problems.add(f"{key}: column {shown(column)} is not in {file.name} (columns: {columns})")
    if job.prompt is not None and job.input.prompt_column is None and job.input.messages_column is None:
        for name in prompt_fields(job.prompt):  # the prompt of every row: each would fail
            if name not in present:
                problems.add(f"prompt: the field {{{name}}} names no column of {file.name} (columns: {columns})")
    if schema is not None and ids.column is not None and not ids.old_values and ids.column in schema.names:
        problem = id_type_problem(schema.field(ids.column).type)
        if problem is not None:  # every row would be an error row
            problems.add(f"input.id_column: column {ids.column!r} of {file.name} cannot hold ids: {problem}; "
                         "cast it to integers or strings")


def _check_writable(out_dir: Path) -> None:
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise JobError(f"output.path: {probe} is not a writable directory")


def generation_params(job: Job, plan: Plan) -> GenerationParams:
    g = job.generation
    stops = stop_token_ids(plan.checkpoint.path, plan.tokenizer)
    if isinstance(plan.template, ConversationTemplate):  # InternVL's chat() stops at the template's separator
        for text in plan.template.stop_strings:
            token = plan.tokenizer.convert_tokens_to_ids(text)
            if token is not None and token != plan.tokenizer.unk_token_id and token not in stops:
                stops.append(token)
    if not stops:
        raise JobError("model: the checkpoint names no EOS token (tokenizer or generation_config.json)")
    return GenerationParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                            top_k=g.top_k, repetition_penalty=g.repetition_penalty, seed=g.seed,
                            eos_token_ids=tuple(stops), stop_token_ids=tuple(g.stop_token_ids),
                            stop=tuple(g.stop), min_new_tokens=g.min_new_tokens, ignore_eos=g.ignore_eos)

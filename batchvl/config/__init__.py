"""The job file: its sections (`spec`), reading and overriding it (`load`), and the checks that need no model
and no data (`checks`). Everything a run does is decided here, once, before anything heavy happens."""

from batchvl.config.checks import check_engine, check_job
from batchvl.config.load import apply_overrides, build_section, job_from_mapping, load_job, read_mapping
from batchvl.config.spec import (
    BACKENDS,
    DECODE_ATTENTION,
    DEVICES,
    DTYPES,
    EngineSpec,
    GenerationSpec,
    InputSpec,
    Job,
    MediaSpec,
    OutputSpec,
    RunSpec,
    resolve_gpus,
)
from batchvl.errors import JobError

__all__ = ["BACKENDS", "DECODE_ATTENTION", "DEVICES", "DTYPES", "EngineSpec", "GenerationSpec", "InputSpec", "Job",
           "JobError", "MediaSpec", "OutputSpec", "RunSpec", "apply_overrides", "build_section", "check_engine",
           "check_job", "job_from_mapping", "load_job", "read_mapping", "resolve_gpus"]

"""Every error batchvl raises on purpose, in one module that imports nothing from batchvl.

Each stage raises these and never a higher layer's: a model that cannot load raises `CheckpointError`, and the
CLI reports it as the job problem it is.
"""

from __future__ import annotations


class JobError(ValueError):
    """A problem with the job file. The message names the key: `input.path: no such file: rows.jsonl`. The CLI
    prints it on one line and exits with code 2."""


class JobErrors(JobError):
    """Several problems with the job file at once, each a JobError message naming its key (`messages`). The CLI
    prints one line each and exits with code 2. Raised only for two or more; one problem is a plain JobError."""

    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


class CheckpointError(JobError):
    """The checkpoint cannot be loaded natively: an unsupported family, or weights that do not fit. Like every
    JobError it reaches the user as one line naming the key (`model: ...`)."""

    def __init__(self, message: str):
        super().__init__(f"model: {message}")


class RowError(Exception):
    """A problem with one input row (bad media, bad record, prompt too long). It becomes that row's `error`."""


class OutputWriteError(Exception):
    """Writing the output failed (disk full, permissions). The run stops; what was committed stays, resumable."""


class WorkerError(Exception):
    """An engine worker process died or failed. The others ran to the end; the rows it held were not written,
    and a rerun of the same command runs them."""


class TransientError(Exception):
    """The machine, not the row, failed while a row was prepared (out of file descriptors, memory or disk space)
    and short retries did not help. No row error is written for it: the run stops with this message, and a rerun
    of the same command resumes."""


class DamagedPartError(JobError):
    """A committed part file of the output folder cannot be read (truncated, zeroed). The run stops on it with
    one line; `batchvl repair OUT/` moves such parts aside, so that their rows run again."""

    def __init__(self, part, reason: str):
        self.part, self.reason = part, reason
        super().__init__(f"output.path: the part file {part.name} cannot be read ({reason}); `batchvl repair "
                         f"{part.parent}` moves damaged parts aside, so that their rows run again")

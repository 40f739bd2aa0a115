"""Logging set-up, shared by the CLI and the engine worker processes it starts."""

from __future__ import annotations

import logging
import sys

NOISY = ("transformers", "huggingface_hub", "urllib3", "filelock")


def configure_logging(level: int, process: str = "") -> None:
    """Log to stderr at `level`; above DEBUG, the chatty libraries only warn. `process` names an engine worker
    in each line."""
    where = f" [{process}]" if process else ""
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s",
                        stream=sys.stderr)
    if level > logging.DEBUG:
        for noisy in NOISY:
            logging.getLogger(noisy).setLevel(logging.WARNING)
        import transformers  # here: reading a job file or printing help should not pay for importing it

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

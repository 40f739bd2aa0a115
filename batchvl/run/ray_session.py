"""`batchvl run --ray`'s connection to Ray, and Ray's own output kept below batchvl's.

- A Ray Client address (`ray://`) is refused before anything is touched (`check_address`), and a cluster that
  cannot be reached, or refuses this process its token, is one line too (a JobError, before the output is touched).
- Ray Data's progress bars are off for the run: batchvl draws its own bar, and in a terminal the two were drawn
  over each other. Ray Data's console log (which otherwise prints the execution plan and, when stderr is no
  terminal, a progress report every few seconds) is at WARNING unless -v; its full log stays in the session's
  `logs/ray-data/` folder. Where batchvl starts Ray itself, Ray's `ray` logger is at WARNING too.

All of it is Ray's public configuration (DataContext, the `ray.data` logger's handlers, `ray.init`'s
logging_level), checked against Ray 2.60, and is restored when the run ends: a Python caller's own settings
stay theirs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from batchvl.errors import JobError

CLIENT_PREFIX = "ray://"
BARS_OFF_NOTICE = "Progress bars disabled"  # Ray Data's warning when they are off: batchvl turned them off


def check_address(address: str | None) -> None:
    """Refuse a Ray Client address (`ray://`, given or in RAY_ADDRESS). Ray Data's executor runs in the driver
    and needs a real worker there: through Ray Client the pipeline dies in it (`'Worker' object has no attribute
    'core_worker'`, seen with Ray 2.60 and ray[client]); without ray[client], ray.init fails with a traceback."""
    given = address if address is not None else os.environ.get("RAY_ADDRESS")
    if given and given.strip().startswith(CLIENT_PREFIX):
        source = "--ray" if address is not None else "--ray (RAY_ADDRESS)"
        raise JobError(f"{source}: {given.strip()} is a Ray Client address, which Ray Data pipelines cannot run "
                       "through; run batchvl on a node of the cluster with --ray auto (or --ray HEAD_IP:6379), or "
                       "submit it there: ray job submit --address http://HEAD_IP:8265 -- batchvl run job.yaml "
                       "--ray auto")


@contextmanager
def ray_session(ray: Any, address: str | None, verbose: bool) -> Iterator[None]:
    """Ray for one run: connected (ray.init, unless this process already is; shut down after, if so) and with
    its output quiet as the module docstring says. `verbose` (-v) keeps Ray's INFO lines."""
    level = logging.INFO if verbose else logging.WARNING
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, logging_level=level)
        except ConnectionError as e:
            raise JobError(_cannot_connect(address, e)) from None
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False
    consoles = [h for h in logging.getLogger("ray.data").handlers if h.name == "console"]
    levels = [h.level for h in consoles]
    hush = _DropNotice()
    for handler in consoles:
        handler.setLevel(max(handler.level, level))
        handler.addFilter(hush)
    try:
        yield
    finally:
        context.enable_progress_bars = bars
        for handler, old in zip(consoles, levels, strict=True):
            handler.setLevel(old)
            handler.removeFilter(hush)
        if started:
            ray.shutdown()


def _cannot_connect(address: str | None, error: BaseException) -> str:
    """One line for ray.init's failure to reach the cluster. With Ray's token authentication, which `ray start`
    turns on where a token is found, Ray 2.60 sends the token only to a cluster it finds by itself (`auto`);
    to an address given by name only under RAY_AUTH_MODE=token. Without it, the GCS refuses the driver."""
    where = address or os.environ.get("RAY_ADDRESS") or "the address ray.init() finds"
    causes, cause = [], error
    while cause is not None and len(causes) < 5:
        causes.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    if any("InvalidAuthToken" in text or "AuthenticationError" in text for text in causes):
        return (f"--ray: the Ray cluster at {where} refused this process: it wants its authentication token, which "
                "Ray sends to an address given by name only under RAY_AUTH_MODE=token (the token is read from "
                "~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH); or run on a node of the cluster with "
                "--ray auto")
    return f"--ray: cannot connect to the Ray cluster at {where}: {' '.join(str(error).split())[:300]}"


class _DropNotice(logging.Filter):
    """Drops Ray Data's notice that its bars are off, and how to turn them on: batchvl turned them off."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(BARS_OFF_NOTICE)

"""`batchvl report OUT/` and `batchvl preview JOB`: views of an output folder and of a job, which change nothing.
Their subcommands are added to the CLI's parser here; a problem is a JobError (one line, exit 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from batchvl.config import load_job
from batchvl.errors import JobError


def add_view_commands(sub, verbosity: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `report` and `preview` to the CLI's subparsers."""
    report = sub.add_parser("report", help="one self-contained HTML page of an output folder: summary, errors, "
                                           "throughput, a sample of rows with thumbnails")
    report.add_argument("out", type=Path, help="the output folder (output.path)")
    report.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                        help="the page to write (default: OUT/report.html)")
    report.add_argument("--job", default=None, metavar="JOB.yaml",
                        help="the job that wrote the folder, to find each sampled row's images (else text only)")
    report.add_argument("--rows", type=int, default=200, help="rows in the grid, sampled uniformly (default 200)")
    report.add_argument("--errors", type=int, default=200, help="failed rows listed at most (default 200)")
    report.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    verbosity(report)
    report.set_defaults(func=_report)

    preview = sub.add_parser("preview", help="the first rows as the engine would get them: prompt, tile grids, "
                                             "frames; loads no weights")
    preview.add_argument("job", help="the job file (YAML)")
    preview.add_argument("--rows", type=int, default=3, help="input rows to show (default 3)")
    preview.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a job key, as for run (repeatable)")
    verbosity(preview)
    preview.set_defaults(func=_preview)


def _report(args: argparse.Namespace) -> int:
    from batchvl.run.report import attach_media, gather
    from batchvl.run.report_page import write_report

    if args.rows < 0 or args.errors < 0:
        raise JobError("report: --rows and --errors must be >= 0")
    job = load_job(args.job) if args.job else None
    gathered = gather(args.out, args.rows, args.errors, args.seed)
    attach_media(gathered, job)
    dest = args.output or args.out / "report.html"
    size = write_report(gathered, dest)
    print(f"{dest}: {gathered.rows:,} rows, {len(gathered.sample)} in the grid, {size / 1024:,.0f} KiB")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from batchvl.run.preview import preview

    if args.rows < 0:
        raise JobError(f"preview: --rows must be >= 0, got {args.rows}")
    for line in preview(load_job(args.job, args.overrides), args.rows):
        print(line)
    return 0

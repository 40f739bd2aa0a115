"""`batchvl run | serve | validate | make-tiny-model`.

Job-file problems print one line each, naming the key, and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from batchvl import __version__
from batchvl.config import EngineSpec, build_section, load_job
from batchvl.errors import JobError, OutputWriteError, TransientError, WorkerError
from batchvl.log import configure_logging

EXIT_RUN_ERROR = 1  # the output could not be written, a worker failed, the machine ran out of something: rerun
EXIT_JOB_ERROR = 2  # the job file (or a command-line argument) is wrong; nothing ran
EXIT_ROWS_FAILED = 3  # the run ended, but every row failed or more than run.max_error_fraction of them
# 128 + the signal's number when a signal stopped the run (130: SIGINT, 143: SIGTERM); rerun to resume


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    _setup_logging(args)
    try:
        return args.func(args)
    except JobError as e:
        for message in getattr(e, "messages", None) or [str(e)]:  # JobErrors: every problem, one line each
            print(f"batchvl: error: {message}", file=sys.stderr)
        return EXIT_JOB_ERROR
    except KeyboardInterrupt:
        print("batchvl: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchvl", description="Offline InternVL batch inference.")
    parser.add_argument("--version", action="version", version=f"batchvl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def job_command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("job", help="the job file (YAML)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a job key, e.g. --set generation.max_new_tokens=64 (repeatable)")
        _verbosity(p)
        return p

    run = job_command("run", "run a job")
    run.add_argument("--overwrite", action="store_true", help="remove earlier output and start over")
    run.add_argument("--shard", metavar="I/N", default=None,
                     help="run only shard I of N (0-based; rows by a stable hash of their id), e.g. for job arrays")
    run.add_argument("--wait", action="store_true",
                     help="if another run holds the output folder (or this shard of it), wait for it to finish "
                          "instead of stopping")
    run.add_argument("--retry-errors", action="store_true",
                     help="run the rows whose error is set again; their new rows replace the old ones")
    run.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run as a Ray Data pipeline on the Ray cluster at ADDRESS (none: ray.init(), a running "
                          "local cluster or a new one); needs pip install 'batchvl[ray]'")
    run.add_argument("--ray-prepare", type=int, default=None, metavar="N",
                     help="with --ray: at most N media preparation actors (default: the CPUs the engines leave)")
    run.add_argument("--ray-engines", type=int, default=None, metavar="N",
                     help="with --ray: N engine actors (default: one per GPU of the cluster, or 1 without GPUs)")
    run.set_defaults(func=_run)

    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (and its Batch API)")
    serve.add_argument("model", help="a checkpoint (directory or cached hub name), or a job file (*.yaml) whose "
                                     "model, engine, generation and media settings to take")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a job key, e.g. --set engine.max_batch_size=32 (repeatable)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=23333)
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/ routes")
    serve.add_argument("--model-name", default=None, help="the name clients ask for (default: the folder's name)")
    serve.add_argument("--allowed-local-media-path", type=Path, default=None, metavar="DIR",
                       help="take file:// image URLs under DIR (refused otherwise)")
    serve.add_argument("--allow-private-media", action="store_true",
                       help="fetch image URLs on loopback, private and link-local addresses too")
    serve.add_argument("--state-dir", type=Path, default=None,
                       help="where Batch API files and batches live (default ~/.cache/batchvl/serve)")
    serve.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; more get 429")
    _verbosity(serve)
    serve.set_defaults(func=_serve)

    status = sub.add_parser("status", help="how far an output folder is, per shard")
    status.add_argument("out", type=Path, help="the output folder (output.path)")
    _verbosity(status)
    status.set_defaults(func=_status)

    repair = sub.add_parser("repair", help="move the part files that cannot be read aside, so their rows run again")
    repair.add_argument("out", type=Path, help="the output folder (output.path); no run may be writing it")
    _verbosity(repair)
    repair.set_defaults(func=_repair)

    export = sub.add_parser("export", help="an output folder's rows as one file (OpenAI batch results, or JSONL)")
    export.add_argument("out", type=Path, help="the output folder (output.path)")
    export.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="the file to write")
    export.add_argument("--format", default="openai-batch", help="openai-batch (default) or jsonl")
    export.add_argument("--errors", type=Path, default=None, metavar="FILE",
                        help="write the failed rows here, as OpenAI's error file (default: into FILE too)")
    export.add_argument("--model", default=None, help="the model name in OpenAI results (default: the job's model)")
    _verbosity(export)
    export.set_defaults(func=_export)

    from batchvl.tools.views import add_view_commands  # report, preview

    add_view_commands(sub, _verbosity)
    validate = job_command("validate", "check a job and print its plan; changes nothing")
    validate.set_defaults(func=_validate)

    tiny = sub.add_parser("make-tiny-model", help="write a small random InternVL checkpoint (tests, demo)")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--force", action="store_true", help="rewrite it even if an identical one is there")
    tiny.add_argument("--layout", choices=("hf", "opengvlab"), default="hf",
                      help="transformers-native (model_type internvl) or OpenGVLab's InternVLChatModel layout")
    tiny.add_argument("--llm", choices=("qwen2", "qwen3", "internlm2", "llama", "vicuna", "phi3"), default="qwen2",
                      help="language model family (qwen3: InternVL3.5's; vicuna: a Llama-2 with the vicuna_v1.1 "
                           "template; internlm2 and vicuna need --layout opengvlab)")
    tiny.add_argument("--vision", choices=("300m", "6b"), default="300m",
                      help="InternViT-300M's structure (LayerNorm, qkv bias) or InternViT-6B's (RMSNorm, qk norm)")
    tiny.add_argument("--generation", type=int, choices=(1, 2), default=2,
                      help="1: InternVL 1 (no tiling, one 448 px tile, pixel shuffle v1; needs --layout opengvlab "
                           "--vision 6b); 2: InternVL 1.5 and later (dynamic tiling)")
    tiny.add_argument("--fp8", action="store_true",
                      help="the language model's linear weights in compressed-tensors' FP8_DYNAMIC layout")
    _verbosity(tiny)
    tiny.set_defaults(func=_make_tiny)
    check = sub.add_parser("check-parity", help="compare the native engine with transformers on random weights")
    check.add_argument("--shape", action="append", default=None,
                       help="tiny, internvl2-1b, internvl2-4b, internvit-6b, internvl3-8b, internvl3_5-8b or "
                            "internvl-chat-v1-2 "
                            "(repeatable; default tiny)")
    check.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare")
    check.add_argument("--layers", type=int, default=None, metavar="N",
                       help="at most N layers in the vision tower and in the language model, at the shape's own "
                            "widths: for a shape whose checkpoint does not fit the disk (internvl-chat-v1-2: 80 GB)")
    check.add_argument("--device", default="auto")
    check.add_argument("--dtype", default="auto")
    check.add_argument("--out", type=Path, help="also write the figures as JSON here")
    check.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                       help="a native engine setting to check, e.g. compile=true (repeatable)")
    _verbosity(check)
    check.set_defaults(func=_check_parity)

    full = sub.add_parser("bench", help="the whole pipeline on the GPU, native engine vs transformers")
    full.add_argument("--shape", default="internvl2-1b",
                      choices=("internvl2-1b", "internvl2-2b", "internvl2-8b", "internvl3-8b", "internvl3_5-8b",
                               "internvl2-26b", "internvl2-40b", "internvl2-76b", "internvl2-4b"))
    full.add_argument("--workload", default="caption-7tile",
                      choices=("caption-7tile", "caption-natural", "mixed", "video"))  # bench_data.WORKLOADS
    full.add_argument("--rows", type=int, default=512)
    full.add_argument("--batch", type=int, default=64, help="engine.max_batch_size of the native side")
    full.add_argument("--baseline", choices=("transformers",), default=None)
    full.add_argument("--baseline-rows", type=int, default=64)
    full.add_argument("--baseline-batch", type=int, default=0, help="default: --batch")
    full.add_argument("--workdir", type=Path, default=None, help="where the weights and images go (a temp dir)")
    full.add_argument("--set", action="append", default=[], dest="settings", metavar="KEY=VALUE",
                      help="a job setting for every native side (plain keys are engine keys), e.g. gpus=2")
    full.add_argument("--warmup-rows", type=int, default=0,
                      help="each side's run goes over this many more rows first, untimed, on the same engine: the "
                           "figures are the steady state after them")
    full.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                      help="also run the native side with these job settings (plain keys are engine keys; e.g. "
                           "'eager:compile=false' or 't8:media.prepare_threads=8') and compare its text with the "
                           "first native run")
    full.add_argument("--texts", type=Path, default=None, metavar="FILE",
                      help="write each native side's text by row id to FILE (JSON), to compare two commits")
    full.add_argument("--no-save", action="store_true",
                      help="write no weights: only the shape's configs and tokenizer, the native sides running on "
                           "random weights built on the GPU (engine.load_format: dummy), the --baseline side too; "
                           "for shapes whose weights do not fit the disk (internvl2-40b, -76b)")
    _verbosity(full)
    full.set_defaults(func=_bench)

    kern = sub.add_parser("bench-kernels", help="check each Triton kernel against torch on the GPU, and time it")
    kern.add_argument("--rows", type=int, action="append", default=None, help="batch sizes (default 64, 128, 256)")
    kern.add_argument("--span", type=int, default=2048)
    kern.add_argument("--kernel", action="append", default=None,
                      choices=("decode-attention", "fp8-quant", "rmsnorm-fp8-quant"),
                      help="the kernels to check (default: all)")
    _verbosity(kern)
    kern.set_defaults(func=_bench_kernels)

    bench = sub.add_parser("bench-media", help="measure media preparation against a naive Pillow loop")
    bench.add_argument("--images", type=int, default=200, help="images per workload")
    bench.add_argument("--naive-images", type=int, default=50, help="images the naive loop prepares")
    bench.add_argument("--threads", type=_counts, action="extend", default=[], metavar="T[,T...]",
                       help="preparation threads, one run per count (0: one per core); repeatable; default: one "
                            "per core unless --processes is given")
    bench.add_argument("--processes", type=_counts, action="extend", default=[], metavar="P[,P...]",
                       help="worker processes (media.prepare_processes), one run per count (0: one per core); "
                            "repeatable")
    bench.add_argument("--pipes", action="store_true",
                       help="each process count again with tiles pickled through pipes, not shared memory")
    bench.add_argument("--workload", action="append", choices=("7tile", "mixed"), default=None)
    _verbosity(bench)
    bench.set_defaults(func=_bench_media)
    return parser


def _bench(args: argparse.Namespace) -> int:
    from batchvl.tools.bench import main as bench_main

    return bench_main(args.shape, args.workload, args.rows, args.batch, args.baseline, args.baseline_rows,
                      args.baseline_batch or args.batch, args.workdir, args.variant, args.warmup_rows,
                      args.settings, args.texts, args.no_save)


def _bench_kernels(args: argparse.Namespace) -> int:
    from batchvl.tools.bench_kernels import KERNELS
    from batchvl.tools.bench_kernels import main as kernels_main

    return kernels_main(tuple(args.rows or (64, 128, 256)), args.span, kernels=tuple(args.kernel or KERNELS))


def _bench_media(args: argparse.Namespace) -> int:
    from batchvl.tools.bench_media import main as bench_main

    return bench_main(args.images, args.threads, args.processes, args.workload or ["7tile", "mixed"],
                      args.naive_images, args.pipes)


def _counts(text: str) -> list[int]:
    """`4` or `4,8,16`: worker counts, each >= 0."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 4 or 4,8,16, got {text!r}") from None
    if any(c < 0 for c in counts):
        raise argparse.ArgumentTypeError(f"counts must be >= 0, got {text!r}")
    return counts


def _check_parity(args: argparse.Namespace) -> int:
    from batchvl.tools.check_parity import SHAPES
    from batchvl.tools.check_parity import main as check_main

    shapes = args.shape or ["tiny"]
    for shape in shapes:
        if shape not in SHAPES:
            print(f"batchvl: error: --shape: unknown shape {shape!r} (known: {', '.join(SHAPES)})", file=sys.stderr)
            return EXIT_JOB_ERROR
    from batchvl.tools.bench import parse_settings

    try:
        sections = parse_settings(args.engine)
        engine = sections.pop("engine", {})
        if sections:
            raise ValueError(f"only engine keys can be set here, not {', '.join(sections)}")
        build_section(EngineSpec, engine, "engine")  # a misspelt key fails here, naming it, before any work
    except ValueError as e:
        print(f"batchvl: error: --engine: {e}", file=sys.stderr)
        return EXIT_JOB_ERROR
    if args.layers is not None and args.layers < 1:
        print(f"batchvl: error: --layers: must be >= 1, got {args.layers}", file=sys.stderr)
        return EXIT_JOB_ERROR
    return check_main(shapes, args.tokens, args.device, args.dtype, args.out, engine, args.layers)


def _verbosity(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and the summary only; no bar")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _setup_logging(args: argparse.Namespace) -> None:
    configure_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)



def _run(args: argparse.Namespace) -> int:
    from batchvl.io.shards import Shard
    from batchvl.run.local import run_job

    job = load_job(args.job, args.overrides)
    shard = Shard.parse(args.shard) if args.shard else None
    if shard is not None and args.overwrite:
        raise JobError("--overwrite: not with --shard (it would remove the other shards' output); "
                       "clear the folder once, before starting the shards")
    try:
        if args.ray is not None:
            summary = _run_ray(job, args, shard)
        else:
            summary = run_job(job, overwrite=args.overwrite, progress=not args.quiet,
                              retry_errors=args.retry_errors, shard=shard, wait=args.wait)
    except (OutputWriteError, TransientError, WorkerError) as e:
        print(f"batchvl: error: {e}", file=sys.stderr)
        return EXIT_RUN_ERROR
    if summary.interrupted:
        import signal

        again = [a for a in args.argv if a != "--overwrite"]  # resuming must not start over
        print(f"batchvl: stopped by {signal.Signals(summary.interrupted).name} after {summary.committed} rows done "
              f"in this run ({summary.ok} ok, {summary.failed} failed); to resume, run the same command: "
              f"{shlex.join(['batchvl', *again])}", file=sys.stderr)
        return 128 + summary.interrupted
    print("\n".join([summary.line(job.output_dir), *summary.failed_lines()]))
    why = summary.folder and summary.folder.too_many_failed(job.run.max_error_fraction)
    if why:
        print(f"batchvl: error: {why}; `--retry-errors` runs the failed rows again", file=sys.stderr)
        return EXIT_ROWS_FAILED
    return 0


def _run_ray(job, args: argparse.Namespace, shard):
    from batchvl.run.ray_stages import require_ray

    if shard is not None:
        raise JobError("--shard: not with --ray (Ray spreads the rows over the cluster itself)")
    for name in ("ray_prepare", "ray_engines"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise JobError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    try:
        require_ray()
    except RuntimeError as e:
        raise JobError(f"--ray: {e}") from None
    from batchvl.run.ray_runner import RayOptions, run_ray_job

    options = RayOptions(address=args.ray or None, prepare_actors=args.ray_prepare, engines=args.ray_engines)
    return run_ray_job(job, options, overwrite=args.overwrite, retry_errors=args.retry_errors,
                       progress=not args.quiet, wait=args.wait)


def _serve(args: argparse.Namespace) -> int:
    from batchvl.serve.launch import ServeOptions, serve, serving_job

    options = ServeOptions(host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
                           allowed_local_media_path=args.allowed_local_media_path,
                           allow_private_media=args.allow_private_media, max_waiting=args.max_queue)
    if args.state_dir is not None:
        options.state_dir = args.state_dir
    if args.max_queue < 1:
        raise JobError(f"--max-queue: must be >= 1, got {args.max_queue}")
    return serve(serving_job(args.model, args.overrides, options.state_dir), options)


def _status(args: argparse.Namespace) -> int:
    from batchvl.run.status import folder_status

    if not args.out.is_dir():
        raise JobError(f"status: no such output folder: {args.out}")
    print("\n".join(folder_status(args.out)))
    return 0


def _repair(args: argparse.Namespace) -> int:
    from batchvl.io.repair import move_damaged_parts

    moved = move_damaged_parts(args.out)
    for target, why in moved:
        print(f"moved {target.name} to {target.parent}: {why}")
    print(f"{args.out}: {len(moved)} damaged part file(s) moved aside; a rerun of the job runs their rows"
          if moved else f"{args.out}: every part file reads")
    return 0


def _export(args: argparse.Namespace) -> int:
    from batchvl.run.export import export

    ok, failed = export(args.out, args.output, args.format, args.errors, args.model)
    where = f"{args.output}" + (f" and {args.errors}" if args.errors else "")
    print(f"{args.out}: {ok} row(s) ok and {failed} failed written to {where}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from batchvl.run.plan import plan_job

    plan = plan_job(load_job(args.job, args.overrides))
    print(plan.describe())
    print("ok: the job is valid")
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from batchvl.tools.tiny import make_tiny_model

    try:
        made = make_tiny_model(args.dir, seed=args.seed, force=args.force, layout=args.layout, llm=args.llm,
                               vision=args.vision, fp8=args.fp8, generation=args.generation)
    except (FileExistsError, ValueError) as e:
        print(f"batchvl: error: {e}", file=sys.stderr)
        return EXIT_JOB_ERROR
    print(f"{'wrote' if made else 'reusing'} tiny InternVL checkpoint at {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m batchvl.tools.ray_cluster_check`: batchvl on a real Ray cluster of two nodes, on this machine.

It does what a user does. It starts a head node and a second node with `ray start`, each with its own temporary
folder, ports and CPUs, writes a tiny checkpoint and a small input (images, a duplicate id, a missing image, a bad
line), runs `batchvl run job.yaml --ray HEAD` on the cluster and the same job locally, and checks that the two
output folders hold the same ids, each exactly once, with identical rows. A second `--ray` run of the finished
folder must say all is done, without starting Ray, and change nothing. Where the cluster uses Ray's token
authentication, a run without RAY_AUTH_MODE=token must stop in one line. The nodes' logs are searched for native
aborts (`Mutex corrupt`, SIGABRT), seen once on a real cluster, and part of the pipeline must have run on the
second node.

The cluster is stopped at the end, whatever happened. Only the two `ray start --block` processes this started are
stopped (SIGTERM, on which each stops the Ray processes it started), never with `ray stop`, which stops every Ray
node of the machine, a user's own included. Any process still holding the check's folder is then named and killed.

Prints what it did and how long each step took; exit code 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image

import batchvl
from batchvl.tools.tiny import make_tiny_model

REPO = Path(batchvl.__file__).resolve().parents[1]
NATIVE_ABORT = re.compile(r"Mutex corrupt|SIGABRT|Aborted \(core dumped\)")
PIPELINE_LOG = re.compile(r":(?:actor|task)_name:(MapWorker\(MapBatches\((?:Prepare|Engine)\)\)|ReadInputRows)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batchvl.tools.ray_cluster_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=24, help="input rows besides the duplicate, missing and bad ones")
    parser.add_argument("--head-cpus", type=int, default=1)
    parser.add_argument("--node-cpus", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the check's folder (model, input, outputs, logs)")
    parser.add_argument("--show-output", action="store_true", help="print what the --ray run printed")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bvl-ray-"))  # short: Ray's socket paths live under it
    print(f"folder: {work}")
    cluster = Cluster(work, args.head_cpus, args.node_cpus)
    problems: list[str] = []
    try:
        problems = check(cluster, work, args.rows, args.show_output)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        problems.append(str(e))
    finally:
        problems += cluster.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for problem in problems:
        print(f"FAILED: {problem}")
    print(f"{'ok' if not problems else 'failed'}: {time.perf_counter() - start:.1f} s in all")
    return 1 if problems else 0


def check(cluster: Cluster, work: Path, rows: int, show_output: bool) -> list[str]:
    t = time.perf_counter()
    cluster.start()
    print(f"cluster: head {cluster.address} ({cluster.head_cpus} CPU) + a second node ({cluster.node_cpus} CPUs), "
          f"both alive in {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    make_tiny_model(work / "model", seed=0)
    total = write_input(work, rows)
    job = work / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": str(work / "model"),
        "input": {"path": str(work / "rows.jsonl"), "id_column": "id", "prompt_column": "prompt",
                  "image_column": "image"},
        "output": {"path": str(work / "out-ray")},
        "generation": {"max_new_tokens": 8},
        "engine": {"max_batch_size": 4},
    }, sort_keys=False))
    print(f"tiny model and {total} input rows written in {time.perf_counter() - t:.1f} s")

    problems = []
    ray_run = cluster.batchvl(str(job), "--ray", cluster.address)
    local_run = cluster.batchvl(str(job), "--set", f"output.path={work / 'out-local'}")
    if show_output:
        print("the --ray run printed:\n" + "\n".join(f"  | {line}" for line in ray_run.output.splitlines()))
    for name, run in (("--ray run", ray_run), ("local run", local_run)):
        print(f"{name}: exit {run.code} in {run.seconds:.1f} s: {run.last_line}")
        if run.code != 0:
            return [f"{name} exited {run.code}:\n{run.tail}"]
    problems += compare(work / "out-ray", work / "out-local", total)
    placed = cluster.placement()
    print("ran where: " + "; ".join(f"{node}: {', '.join(f'{n} {what}' for what, n in sorted(found.items()))}"
                                    for node, found in placed.items()))
    if not placed.get("node"):
        problems.append("the second node ran no part of the pipeline: the run did not cross nodes")

    before = {p.name: p.stat().st_mtime_ns for p in (work / "out-ray").iterdir()}
    rerun = cluster.batchvl(str(job), "--ray", cluster.address)
    print(f"--ray rerun of the finished folder: exit {rerun.code} in {rerun.seconds:.1f} s: {rerun.last_line}")
    if rerun.code != 0 or f"{total} already done" not in rerun.last_line or "Ray was not started" not in rerun.tail:
        problems.append(f"the rerun of the finished folder did not exit early:\n{rerun.tail}")
    if {p.name: p.stat().st_mtime_ns for p in (work / "out-ray").iterdir()} != before:
        problems.append("the rerun of the finished folder changed it")
    if cluster.env.get("RAY_AUTH_MODE") == "token":
        problems += check_token_refusal(cluster, job, work / "out-refused")
    return problems


def check_token_refusal(cluster: Cluster, job: Path, out: Path) -> list[str]:
    """The cluster uses Ray's token authentication: a driver given its address without RAY_AUTH_MODE=token is
    refused by it (Ray sends the token by itself only with `auto`). batchvl says so in one line (exit 2) and
    writes nothing."""
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    run = cluster.batchvl(str(job), "--ray", cluster.address, "--set", f"output.path={out}", env=env)
    print(f"--ray without RAY_AUTH_MODE=token: exit {run.code} in {run.seconds:.1f} s: {run.last_line[:160]}")
    if run.code != 2 or "RAY_AUTH_MODE=token" not in run.last_line or "Traceback" in run.output or out.exists():
        return [f"a run refused its token did not stop in one line, before its output:\n{run.tail}"]
    return []


def write_input(work: Path, rows: int) -> int:
    """The input: `rows` rows over three small images (one row with two), then a duplicate id, a missing image
    and a line that is not JSON. Returns the number of input rows."""
    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide.jpg": (640, 360), "tall.png": (240, 520), "small.jpg": (120, 90)}.items():
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8), "RGB").save(work / name)
    images = ["wide.jpg", "tall.png", None, ["small.jpg", "wide.jpg"]]
    records = [{"id": f"r{i}", "prompt": f"Describe picture {i}.", "image": images[i % len(images)]}
               for i in range(rows)]
    records += [{"id": "r1", "prompt": "The same id again.", "image": None},
                {"id": "gone", "prompt": "Describe it.", "image": "no-such-file.jpg"}]
    lines = [json.dumps(r) for r in records] + ["{not json"]
    (work / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def compare(ray_out: Path, local_out: Path, total: int) -> list[str]:
    """Problems with the two output folders: ids not exactly once, not the same, or rows that differ."""
    problems = []
    tables = {name: pq.read_table(out).to_pylist() for name, out in (("--ray", ray_out), ("local", local_out))}
    for name, found in tables.items():
        repeated = sorted(i for i, n in Counter(r["id"] for r in found).items() if n > 1)
        if repeated or len(found) != total:
            problems.append(f"the {name} output has {len(found)} rows for {total} input rows; ids more than once: "
                            f"{repeated[:5]}")
    remote, local = ({r["id"]: r for r in found} for found in tables.values())
    if remote.keys() != local.keys():
        problems.append(f"ids differ: only --ray {sorted(remote.keys() - local.keys())[:5]}, only local "
                        f"{sorted(local.keys() - remote.keys())[:5]}")
    differing = sorted(i for i in remote.keys() & local.keys() if remote[i] != local[i])
    if differing:
        problems.append(f"{len(differing)} row(s) differ, e.g. {differing[0]}: --ray {remote[differing[0]]} "
                        f"local {local[differing[0]]}")
    errors = sum(r["error"] is not None for r in local.values())
    print(f"compared: {len(remote)} ids in each output, each once; {len(differing)} differing row(s); "
          f"{errors} error rows (the duplicate, the missing image, the bad line)")
    return problems


class Run:
    def __init__(self, code: int, seconds: float, output: str):
        self.code, self.seconds, self.output = code, seconds, output
        lines = [line for line in output.splitlines() if line.strip()]
        self.last_line = lines[-1] if lines else ""
        self.tail = "\n".join(lines[-15:])


class Cluster:
    """A head and one more node, started with `ray start --block` in their own folders under `work`."""

    def __init__(self, work: Path, head_cpus: int, node_cpus: int):
        self.work, self.head_cpus, self.node_cpus = work, head_cpus, node_cpus
        self.address = ""  # HOST:PORT of the head, once it is up
        self.nodes: dict[str, subprocess.Popen] = {}
        # every process of the check imports this batchvl, the cluster's workers too (they inherit it)
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S: a node told to stop drains first, 30 s by default; none runs here
        self.env = {**os.environ, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.env.pop("RAY_ADDRESS", None)
        if "RAY_AUTH_MODE" not in os.environ and has_auth_token():
            # Ray 2.60 turns token authentication on for a head when a token is there, but a second node or a
            # driver given the head's address uses the token only when told to (`--ray auto` would find it)
            self.env["RAY_AUTH_MODE"] = "token"

    def start(self) -> None:
        self._node("head", "--head", f"--port={free_port()}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
                   "--include-dashboard=false", "--disable-usage-stats")
        self._wait(1)
        self._node("node", f"--address={self.address}", f"--num-cpus={self.node_cpus}", "--num-gpus=0")
        self._wait(2)

    def _node(self, name: str, *args: str) -> None:
        ray = Path(sys.executable).with_name("ray")
        command = [str(ray if ray.exists() else "ray"), "start", "--block", f"--temp-dir={self.work / name}",
                   f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}", *args]
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - the node's own output, read on failure
        self.nodes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def _wait(self, count: int, timeout: float = 90.0) -> None:
        """Until `count` nodes are alive, asked by a driver of its own; fails as soon as a node stops."""
        deadline = time.monotonic() + timeout
        written = self.work / "head" / "ray_current_cluster"  # the head's address, as Ray chose its IP
        while not written.is_file() and self.nodes["head"].poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if written.is_file():
            self.address = written.read_text().strip()
        code = ("import ray, time\n"
                f"ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False)\n"
                f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
                "    time.sleep(0.5)\n")
        probe = subprocess.Popen([sys.executable, "-c", code], env=self.env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        while probe.poll() is None:
            stopped = [name for name, node in self.nodes.items() if node.poll() is not None]
            if stopped or time.monotonic() > deadline:
                probe.kill()
                break
            time.sleep(0.2)
        if probe.wait() != 0:
            stopped = [name for name, node in self.nodes.items() if node.poll() is not None]
            logs = "\n".join(f"{name}.log: ...{(self.work / f'{name}.log').read_text(errors='replace')[-1500:]}"
                             for name in self.nodes)
            raise RuntimeError(f"the cluster did not come up with {count} node(s) in {timeout:.0f} s (stopped: "
                               f"{stopped or 'none'}; probe: {probe.stderr.read()[-800:]})\n{logs}")

    def batchvl(self, *args: str, env: dict[str, str] | None = None) -> Run:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "batchvl", "run", *args], env=env or self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        return Run(done.returncode, time.perf_counter() - start, done.stdout)

    def placement(self) -> dict[str, Counter]:
        """Per node, how many of its worker processes ran each of the pipeline's actors and read tasks, from the
        lines Ray writes in each worker's log (`:actor_name:MapWorker(MapBatches(Engine))`, `:task_name:...`)."""
        found: dict[str, Counter] = {}
        for name in self.nodes:
            found[name] = Counter()
            for log in (self.work / name / "session_latest" / "logs").glob("worker-*.out"):
                lines = log.read_text(errors="replace").splitlines()
                found[name].update({m.group(1) for m in map(PIPELINE_LOG.match, lines) if m is not None})
        return found

    def stop(self) -> list[str]:
        """Stop the nodes this started; return the problems found (native aborts in their logs, processes left)."""
        start = time.perf_counter()
        for node in reversed(self.nodes.values()):  # the second node first, then the head
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)  # its own session: the node and what it started
                node.wait()
        left = processes_under(self.work)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        aborts = [f"{log.relative_to(self.work)}: {line.strip()[:200]}" for log in sorted(self.work.rglob("*"))
                  if log.is_file() and log.suffix in (".log", ".err", ".out")
                  for line in log.read_text(errors="replace").splitlines() if NATIVE_ABORT.search(line)]
        print(f"cluster stopped in {time.perf_counter() - start:.1f} s; "
              f"{len(left)} process(es) were left holding {self.work}{' (killed)' if left else ''}; "
              f"{len(aborts)} native abort line(s) in the nodes' logs")
        for line in aborts:
            print(f"  {line}")
        return ([f"{len(left)} process(es) outlived the cluster: {left}"] if left else []) + \
            [f"a native abort in a node's log: {line}" for line in aborts]


def processes_under(folder: Path) -> list[int]:
    """The ids of the processes whose command line names `folder` (Ray's name their session folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if str(folder) in proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def has_auth_token() -> bool:
    """Whether Ray would find an authentication token: in the environment, or in the default file."""
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")) \
        or (Path.home() / ".ray" / "auth_token").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())

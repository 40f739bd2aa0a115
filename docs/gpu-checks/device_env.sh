# Sourced by the device scripts: the carried wheels (.whl: decord, the server's packages, zstandard) installed
# beside the device image's own packages, this tree first on the path, unbuffered output, and B, the bench
# command with its work folder on the device's disk.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=.:/tmp/site || exit 1
export PYTHONUNBUFFERED=1
B="python3 -m batchvl bench -q --workdir /tmp"

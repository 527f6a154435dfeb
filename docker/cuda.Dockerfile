# syntax=docker/dockerfile:1
# pdserve, CUDA variant: one image for every role (`pdserve router|prefill|decode`). The
# CUDA runtime, cuDNN and NCCL come with torch's wheels and the driver from the node (the
# NVIDIA container toolkit mounts it), so the base is plain Python. Build from the root:
#   docker build -f docker/cuda.Dockerfile -t pdserve:0.1.0-cuda .
# Bake a model in (otherwise mount one at /models, as k8s/base does):
#   docker build -f docker/cuda.Dockerfile --build-arg MODEL_DIR=path/in/context -t ... .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with pdserve, torch (CUDA), Triton and NIXL -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# PyPI's torch for Linux x86-64 is the CUDA build; Triton comes with it.
RUN pip install "torch==2.13.0" numpy
# NIXL (the ucx connector) without its meta package's dependencies (both CUDA stacks and
# torch again); nixl-cu13 bundles its own UCX.
RUN pip install --no-deps "nixl==1.5.1" "nixl-cu13==1.5.1"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY engine/ engine/
COPY kernels/ kernels/
COPY kv_transfer/ kv_transfer/
COPY prefill_service/ prefill_service/
COPY decode_service/ decode_service/
COPY router/ router/
COPY pdserve/ pdserve/
RUN pip install grpcio-tools \
 && python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
      protos/pdserve.proto \
 && pip uninstall -y grpcio-tools \
 && pip install ".[triton,otel]" \
 && pip uninstall -y pip setuptools wheel
ARG MODEL_DIR=docker/no-model
COPY ${MODEL_DIR} /models/model

# ---- runtime: the environment and the model, no pip, not root ---------------------------
FROM ${PYTHON_IMAGE} AS runtime
# The one build tool that stays, on purpose: Triton compiles a small C launcher for each
# kernel signature the first time it runs on the GPU (with the Python headers this base
# image ships), which cannot be done at image build time without a GPU. gcc only -- no
# make, no pip, no git.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && rm -rf /usr/local/lib/python3.11/site-packages/pip* /usr/local/bin/pip* \
 && groupadd --gid 10001 pdserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pdserve
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /models /models
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    TRITON_CACHE_DIR=/tmp/triton \
    PDSERVE_MODEL=/models/model \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    UCX_RCACHE_MAX_UNRELEASED=1024 \
    UCX_MEM_MMAP_HOOK_MODE=none
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 50051 50061 50062 9090
ENTRYPOINT []
CMD ["pdserve", "--help"]

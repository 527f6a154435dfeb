# syntax=docker/dockerfile:1
# pdserve, CPU variant: one image for every role (`pdserve router|prefill|decode`, and
# `pdserve make-model` for the tiny offline model). Build from the repository root:
#   docker build -f docker/cpu.Dockerfile -t pdserve:0.1.0-cpu .
# Bake a model in (otherwise mount one at /models, as k8s/base does):
#   docker build -f docker/cpu.Dockerfile --build-arg MODEL_DIR=path/in/context -t ... .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with pdserve and its dependencies ----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# a C compiler for the CPU attention kernel (kernels/cpu_native.py), built below; it stays here
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# torch pinned to the CPU build (an unpinned torch from PyPI is the multi-GB CUDA one).
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
 && pip install numpy
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
# gRPC stubs are generated here, then the generator leaves with this stage.
RUN pip install grpcio-tools \
 && python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
      protos/pdserve.proto \
 && pip uninstall -y grpcio-tools \
 && pip install ".[otel]" \
 && pip uninstall -y pip setuptools wheel
# The runtime has no compiler, so the kernel is built now, for x86-64-v3 (AVX2/FMA: any
# x86 server of the last decade) instead of this build machine's own CPU.
ENV PDSERVE_KERNEL_CACHE=/opt/venv/pdserve-kernels PDSERVE_KERNEL_MARCH=x86-64-v3
RUN cd /tmp && python -c "from kernels import cpu_native; assert cpu_native.prebuild()"
ARG MODEL_DIR=docker/no-model
COPY ${MODEL_DIR} /models/model

# ---- runtime: the environment and the model, no compilers, no pip, not root -------------
FROM ${PYTHON_IMAGE} AS runtime
RUN rm -rf /usr/local/lib/python3.11/site-packages/pip* /usr/local/bin/pip* \
 && groupadd --gid 10001 pdserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pdserve
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PDSERVE_KERNEL_CACHE=/opt/venv/pdserve-kernels \
    PDSERVE_KERNEL_MARCH=x86-64-v3 \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PDSERVE_MODEL=/models/model
USER 10001:10001
WORKDIR /tmp
# router 8000; prefill gRPC 50051; decode gRPC 50061 and KV 50062; pod metrics 9090
EXPOSE 8000 50051 50061 50062 9090
ENTRYPOINT []
CMD ["pdserve", "--help"]

"""What the machine offers the engine: the dtype ``auto`` picks, the CPU threads a pod
takes, and how host values reach the device.

``auto`` follows vLLM: bf16 where the hardware computes it natively (a CUDA card that
supports it; a CPU with AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo), fp16 on older
CUDA cards, fp32 on other CPUs. Without native bf16 a CPU emulates it and runs slower
than fp32, so fp32 is the right choice there, not a fallback.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from engine.kv_layout import DTYPES

AUTO = "auto"
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first CPU listed (empty where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool(_BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags))


def resolve_dtype(dtype: str, device: str) -> str:
    """A concrete name from DTYPES for ``dtype`` (``auto`` or a name) on ``device``."""
    if dtype != AUTO:
        return dtype
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def dtype_choices() -> list[str]:
    return [AUTO, *DTYPES]


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads_per_pod(num_pods: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``num_pods`` engine processes sharing this machine.

    The cores are split between the pods and the router (one share each), so that pods
    never oversubscribe them: an OpenMP team that finds its cores busy spins and waits,
    and on the 2-core CI machine a decode step took 9x longer with 2 threads than with 1
    when another process was running (bench/RESULTS.md, issue 15).
    """
    cores = available_cores() if cores is None else cores
    return max(1, cores // (num_pods + 1))


def set_cpu_threads(threads: int | None) -> int:
    """Size torch's CPU thread pools for this process; returns the intra-op count.

    None leaves torch's own default (every core). Inter-op threads are one: the engine
    runs one operator at a time.
    """
    if threads is not None:
        torch.set_num_threads(max(1, threads))
        # RuntimeError: already fixed, an inter-op pool ran before (a second engine)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
    return torch.get_num_threads()


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without making the host wait for the GPU.

    A copy from pageable memory to a GPU first waits for everything queued on the stream
    (CUDA's documented behaviour), so the sampler's small per-row tensors used to hold the
    engine thread until the forward had finished, and the sampler's own launches then ran
    after it with the GPU idle. Through pinned memory the copy is queued like a kernel
    (torch's caching host allocator keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return host.to(device)
    if not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)

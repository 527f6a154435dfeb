"""Native CPU kernels: C compiled on this machine at first use, called through ctypes.

cpu_amx_attention.c is the bf16 prefill on Intel AMX tiles, a library of its own (built with
AMX's flags, loaded only where the CPU has them). cpu_elementwise.c holds a decode layer's
elementwise work (residual add + RMSNorm, RoPE +
KV write; cpu_elementwise.py says why), built without fused multiply-adds so it rounds as
torch does. Two kernels in cpu_paged_attention.c: decode (one query per sequence) and prefill (a
sequence's new tokens, causal over its whole context), both reading K and V straight from
the paged cache. Why C and not torch operators: decode attention over long contexts is
bound by reading K and V, and through torch it costs a gather of every sequence's K/V into
a padded batch (a copy as large as what attention reads) and then SDPA's flash kernel,
which is built for blocks of queries and runs a 2-query-per-head decode at a fifth of
memory speed; the C decode is 2.3-3.5x faster at 1-64 sequences of 96-560 tokens, the C
prefill 1.7-2.2x at 64-1024 tokens (bench/cpu_attention_shapes.py, bench/RESULTS.md). Why
not a torch C++ extension: compiling against torch's headers takes minutes on a 2-core
machine; this file has no dependency and builds in about a second. ctypes releases the
GIL for the call, so the pod's gRPC thread runs meanwhile.

The library is built with ``cc -O3 -march=native`` into a cache directory
(``$PDSERVE_KERNEL_CACHE``, else ``~/.cache/pdserve/kernels``) under a name that hashes the
source, the flags and the CPU's feature flags, so a changed file or another CPU model
rebuilds. ``$PDSERVE_KERNEL_MARCH`` names another target (e.g. ``x86-64-v3``); the name then
leaves the CPU out, so an image can carry a library built once (docker/cpu.Dockerfile).
Without a C compiler (or if the build fails) ``library()`` is None, a warning is logged
once, and attention takes the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from engine.device import cpu_flags

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_paged_attention.c")
ELEMENTWISE_SOURCE = Path(__file__).with_name("cpu_elementwise.c")
AMX_SOURCE = Path(__file__).with_name("cpu_amx_attention.c")
HEADER = Path(__file__).with_name("cpu_vector.h")  # included by the attention sources
AMX_FLAGS = ("-mamx-tile", "-mamx-bf16", "-mavx512bf16")
GEMV_SOURCE = Path(__file__).with_name("cpu_gemv.c")
GEMV_FLAGS = ("-mavx512bf16",)
ELEMENTWISE_FLAGS = ("-ffp-contract=off",)  # round where torch rounds
BUILD_TIMEOUT_S = 120.0
# Prefills of fewer new tokens stay on the float32 kernel: below this, packing K/V into
# tiles costs what the tiles save (at 64 tokens 1.1x, at 523 1.6x, at 1024 1.8-2.2x, a 32-wide
# head of a 4-layer model on this repo's 2-core Sapphire Rapids: bench/RESULTS.md).
AMX_MIN_TOKENS = 64


def _flags(march: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["-O3", f"-march={march}", "-fopenmp-simd", *extra, "-shared", "-fPIC"]


def _cache_dir() -> Path:
    return Path(os.environ.get("PDSERVE_KERNEL_CACHE")
                or Path.home() / ".cache" / "pdserve" / "kernels")


def _build(target: Path, source: Path, flags: list[str]) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent pods never load a half-written file
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run([compiler, *flags, "-o", str(built), str(source), "-lm"],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)


def _load(source: Path, extra_flags: tuple[str, ...], fallback: str) -> ctypes.CDLL | None:
    """``source`` compiled (once per source, flags and CPU) and loaded; None, with a
    warning naming ``fallback``, where it cannot be built."""
    march = os.environ.get("PDSERVE_KERNEL_MARCH") or "native"
    flags = _flags(march, extra_flags)
    cpu = " ".join(sorted(cpu_flags())) if march == "native" else ""
    key = hashlib.sha256(source.read_bytes() + HEADER.read_bytes() + " ".join(flags).encode()
                         + cpu.encode() + platform.machine().encode()).hexdigest()
    target = _cache_dir() / f"{source.stem}-{key[:16]}.so"
    try:
        if not target.exists():
            _build(target, source, flags)
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("native CPU kernels of %s unavailable (%s); using %s", source.name, exc,
                    fallback)
        return None


@functools.cache
def elementwise_library() -> ctypes.CDLL | None:
    """cpu_elementwise.c, built on first use; None where it cannot be built."""
    lib = _load(ELEMENTWISE_SOURCE, ELEMENTWISE_FLAGS, "torch operators")
    if lib is None:
        return None
    pointer, integer, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn = lib.add_rms_norm
    fn.restype = None
    fn.argtypes = (pointer, long, pointer, long, pointer, pointer, pointer, long, long,
                   ctypes.c_float, integer, integer)
    fn = lib.rope_and_write_kv
    fn.restype = ctypes.c_int
    fn.argtypes = (pointer, long, integer, pointer, long, pointer, long, integer, integer,
                   pointer, pointer, long, pointer, pointer, pointer, long, integer)
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled attention kernels, built on first use; None where they cannot be
    built."""
    lib = _load(SOURCE, (), "torch's SDPA")
    if lib is None:
        return None
    fn = lib.paged_decode_attention
    fn.restype = ctypes.c_int
    pointer, integer, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = (pointer, pointer, pointer, pointer, integer, pointer, integer, integer,
                   integer, integer, integer, ctypes.c_float, integer, pointer, integer)
    fn = lib.paged_prefill_attention
    fn.restype = ctypes.c_int
    fn.argtypes = (pointer, long, pointer, pointer, pointer, integer, integer, integer,
                   integer, integer, integer, ctypes.c_float, integer, pointer, long)
    fn = lib.apply_token_bitmask
    fn.restype = None
    fn.argtypes = (pointer, long, pointer, long, integer, integer)
    return lib


def prebuild() -> bool:
    """Build every kernel library into the cache now (an image's build stage, for
    ``$PDSERVE_KERNEL_MARCH``), the AMX one too whatever this CPU has: True if all built."""
    return all(_load(source, flags, "nothing") is not None for source, flags in (
        (SOURCE, ()), (ELEMENTWISE_SOURCE, ELEMENTWISE_FLAGS), (AMX_SOURCE, AMX_FLAGS),
        (GEMV_SOURCE, GEMV_FLAGS)))


@functools.cache
def gemv_library() -> ctypes.CDLL | None:
    """cpu_gemv.c where the CPU has AVX512-BF16; None elsewhere (oneDNN serves)."""
    if "avx512_bf16" not in cpu_flags():
        return None
    lib = _load(GEMV_SOURCE, GEMV_FLAGS, "oneDNN's linear")
    if lib is None:
        return None
    fn = lib.gemv_bf16
    fn.restype = ctypes.c_int
    pointer, integer, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = (pointer, long, integer, pointer, integer, integer, pointer, pointer, long)
    return lib


def gemv_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``gemv`` takes these: x [1 or 2, K] bf16 rows (unit stride), weight [N, K]
    bf16 contiguous, K a multiple of 32, bias [N] bf16 or None, all on the CPU."""
    return x.dim() == 2 and 1 <= x.shape[0] <= 2 and x.dtype is torch.bfloat16 \
        and x.stride(1) == 1 and not x.is_cuda and weight.dim() == 2 \
        and weight.dtype is torch.bfloat16 and weight.is_contiguous() \
        and weight.shape[1] == x.shape[1] and x.shape[1] % 32 == 0 \
        and (bias is None or (bias.dtype is torch.bfloat16 and bias.is_contiguous()
                              and bias.shape == (weight.shape[0],))) \
        and gemv_library() is not None


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
         ) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for what ``gemv_fits`` took: float32 sums of exact
    bf16 products, rounded once (oneDNN rounds alike, summing in another order)."""
    lib = gemv_library()
    assert lib is not None
    rows, k = x.shape
    n = weight.shape[0]
    out = torch.empty((rows, n), dtype=torch.bfloat16)
    status = lib.gemv_bf16(x.data_ptr(), x.stride(0), rows, weight.data_ptr(), n, k,
                           bias.data_ptr() if bias is not None else None, out.data_ptr(), n)
    if status != 0:
        raise ValueError(f"gemv_bf16: refused rows={rows} k={k}")
    return out


@functools.cache
def amx_library() -> ctypes.CDLL | None:
    """cpu_amx_attention.c, where the CPU has AMX-BF16 and the kernel lets this process use
    its tiles; None elsewhere (bf16 prefill then takes the float32 C kernel)."""
    if not {"amx_bf16", "amx_tile", "avx512_bf16"} <= cpu_flags():
        return None
    lib = _load(AMX_SOURCE, AMX_FLAGS, "the float32 C prefill")
    if lib is None:
        return None
    if lib.amx_enable() != 0:
        log.warning("the kernel refused AMX's tile state; bf16 prefill runs in float32")
        return None
    fn = lib.amx_prefill_attention
    fn.restype = ctypes.c_int
    pointer, integer, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = (pointer, long, pointer, pointer, pointer, integer, integer, integer,
                   integer, integer, integer, ctypes.c_float, pointer, long)
    return lib


def serves(kv_cache: torch.Tensor) -> bool:
    """Whether decodes over this cache run here (queries come in the cache's dtype)."""
    return kv_cache.dtype in (torch.bfloat16, torch.float32) and \
        kv_cache.device.type == "cpu" and kv_cache.is_contiguous() and \
        kv_cache.shape[-1] % 16 == 0 and kv_cache.shape[-1] <= 256 and library() is not None


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor,
                           context: torch.Tensor, scale: float,
                           bf16_scores: bool = True) -> torch.Tensor:
    """q [n, Hq, D] -> [n, Hq, D]; kv_cache [2, blocks, block_size, Hk, D] (contiguous);
    tables [n, max_blocks] int32 and context [n] int32, both contiguous. In bf16 with heads
    of a multiple of 32, the scores take the CPU's bf16 dot product where it has one
    (AVX512-BF16; ``bf16_scores=False``: the float32 form, for comparison)."""
    lib = library()
    assert lib is not None
    n, hq, d = q.shape
    _, _, block_size, hk, _ = kv_cache.shape
    q = q.contiguous()
    assert tables.dtype == torch.int32 and context.dtype == torch.int32
    assert tables.is_contiguous() and context.is_contiguous() and tables.shape[0] == n
    out = torch.empty_like(q)
    status = lib.paged_decode_attention(
        q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), tables.data_ptr(),
        tables.shape[1], context.data_ptr(), n, hq, hk, d, block_size, scale,
        int(q.dtype == torch.bfloat16), out.data_ptr(), int(bf16_scores))
    _check(status, "paged_decode_attention", d)
    return out


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, table: torch.Tensor,
                            context: int, scale: float, out: torch.Tensor,
                            use_amx: bool | None = None) -> None:
    """One sequence's new tokens: q [n, Hq, D] (rows may be strided, as views of a fused
    projection are) at positions context - n .. context - 1, causal over the whole context
    read from the cache; the result goes into ``out`` [n, Hq, D] (rows may be strided).
    table: the sequence's block-table row, int32, contiguous. bf16 with heads of a multiple
    of 32 runs on AMX where the CPU has it (``use_amx``: None = where available, False =
    never, True = required)."""
    lib = library()
    assert lib is not None
    n, hq, d = q.shape
    _, _, block_size, hk, _ = kv_cache.shape
    for t in (q, out):
        assert t.stride(2) == 1 and t.stride(1) == d and t.dtype == kv_cache.dtype
    assert table.dtype == torch.int32 and table.is_contiguous() and out.shape == q.shape
    assert table.shape[0] * block_size >= context >= n
    amx = amx_library() if use_amx is not False else None
    if use_amx and amx is None:
        raise RuntimeError("AMX prefill asked for where it is unavailable")
    if amx is not None and q.dtype == torch.bfloat16 and d % 32 == 0 \
            and (use_amx or n >= AMX_MIN_TOKENS):
        status = amx.amx_prefill_attention(
            q.data_ptr(), q.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
            table.data_ptr(), context, n, hq, hk, d, block_size, scale, out.data_ptr(),
            out.stride(0))
        _check(status, "amx_prefill_attention", d)
        return
    status = lib.paged_prefill_attention(
        q.data_ptr(), q.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
        table.data_ptr(), context, n, hq, hk, d, block_size, scale,
        int(q.dtype == torch.bfloat16), out.data_ptr(), out.stride(0))
    _check(status, "paged_prefill_attention", d)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> bool:
    """reference.apply_token_bitmask in one pass over float32 CPU logits (rows may be
    strided); False, doing nothing, where it does not apply (another dtype, no library)."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or \
            logits.stride(1) != 1 or bitmask.dtype != torch.int32 or \
            bitmask.stride(1) != 1 or bitmask.shape[1] * 32 < logits.shape[1]:
        return False
    lib = library()
    if lib is None:
        return False
    lib.apply_token_bitmask(logits.data_ptr(), logits.stride(0), bitmask.data_ptr(),
                            bitmask.stride(0), logits.shape[0], logits.shape[1])
    return True


def _check(status: int, name: str, head_dim: int) -> None:
    if status == -2:
        raise ValueError(f"{name}: head size {head_dim} is not a multiple of 16 up to 256 "
                         "(serves() says which caches it takes)")
    if status != 0:
        raise MemoryError(f"{name}: no memory for its scratch")



def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rms_norm(x + residual) * weight, x + residual), or with no residual (rms_norm(x) *
    weight, x), in one pass over contiguous bf16 or float32 rows; None, doing nothing,
    where it does not apply. (Checked in well under a microsecond: at batch 1 the whole
    call must cost less than the operators it replaces, about 10 us.)"""
    if x.is_cuda or x.dim() != 2 or not x.is_contiguous() or weight.shape[0] != x.shape[1] \
            or not weight.is_contiguous() or weight.dtype is not x.dtype \
            or x.dtype not in (torch.bfloat16, torch.float32):
        return None
    if residual is not None and (residual.shape != x.shape or residual.dtype is not x.dtype
                                 or not residual.is_contiguous()):
        return None
    lib = elementwise_library()
    if lib is None:
        return None
    rows, hidden = x.shape
    out = torch.empty_like(x)
    if residual is None:
        lib.add_rms_norm(x.data_ptr(), hidden, None, 0, weight.data_ptr(), out.data_ptr(),
                         None, rows, hidden, eps, int(x.dtype is torch.bfloat16), 0)
        return out, x
    summed = torch.empty_like(x)
    lib.add_rms_norm(x.data_ptr(), hidden, residual.data_ptr(), hidden, weight.data_ptr(),
                     out.data_ptr(), summed.data_ptr(), rows, hidden, eps,
                     int(x.dtype is torch.bfloat16), 1)
    return out, summed


def rope_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor) -> bool:
    """Whether ``rope_and_write_kv`` takes these: q [tokens, q_heads, dim] and k, v
    [tokens, kv_heads, dim] with each token's heads contiguous (views of a fused qkv, any
    row stride), a contiguous cache [2, blocks, block_size, kv_heads, dim] of their dtype
    (bf16 or float32) on the CPU (dim even, at most 512), cos and sin [tokens, 1, dim]
    contiguous of that dtype, one
    int64 slot per token. A step's layers all pass alike tensors: the caller checks once per
    step (kernels.cpu_step.CpuStepPlan.native_rope)."""
    dtype = kv_cache.dtype
    tokens, _, dim = q.shape
    heads = k.shape[1]
    return dtype in (torch.bfloat16, torch.float32) and not kv_cache.is_cuda \
        and kv_cache.is_contiguous() and kv_cache.shape[3:] == (heads, dim) \
        and all(t.dtype is dtype and t.stride(2) == 1 and t.stride(1) == dim
                for t in (q, k, v)) \
        and k.shape == (tokens, heads, dim) and v.shape == k.shape and dim % 2 == 0 \
        and dim <= 512 \
        and all(t.dtype is dtype and t.is_contiguous() and t.numel() == tokens * dim
                for t in (cos, sin)) \
        and slots.dtype is torch.int64 and slots.is_contiguous() \
        and slots.shape == (tokens,) and elementwise_library() is not None


def rope_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      kv_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      slots: torch.Tensor) -> None:
    """RoPE on q and k in place with the step's tables, then k and v into ``kv_cache`` at
    ``slots`` (one per token), for tensors ``rope_fits`` took. A slot outside the cache is
    an error (the C side checks every one before it writes)."""
    lib = elementwise_library()
    assert lib is not None
    base = kv_cache.data_ptr()
    slots_in_cache = kv_cache.shape[1] * kv_cache.shape[2]
    status = lib.rope_and_write_kv(
        q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), v.data_ptr(),
        v.stride(0), k.shape[1], q.shape[2], cos.data_ptr(), sin.data_ptr(), q.shape[0],
        base, base + kv_cache.stride(0) * kv_cache.element_size(), slots.data_ptr(),
        slots_in_cache, int(kv_cache.dtype is torch.bfloat16))
    if status != 0:
        raise IndexError(f"rope_and_write_kv: a slot outside the cache's {slots_in_cache}")

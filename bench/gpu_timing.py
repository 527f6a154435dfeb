"""Timing for the GPU benchmarks: a run's log and record, CUDA-graph timing of many calls,
how many input copies defeat L2, correctness checks, and the card's two ceilings (copy
bandwidth, bf16 matmul) that every ratio is taken against. Used by gpu_kernels.py,
gpu_gemv.py and gpu_decode_floor.py; on the CPU (``smoke``) calls run once through Triton's
interpreter so the scripts can be checked before spending device time."""

from __future__ import annotations

import math
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BF16 = torch.bfloat16


@dataclass(slots=True)
class Run:
    dev: torch.device
    smoke: bool
    l2_bytes: int
    lines: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - want.double()).norm() / want.double().norm())


def time_calls(run: Run, calls: list[Callable[[], object]], graph: bool = True) -> float:
    """Median seconds per call. ``calls`` are rotated through (one per input set)."""
    for c in calls:
        c()
    if run.smoke:
        t0 = time.perf_counter()
        calls[0]()
        return time.perf_counter() - t0
    torch.cuda.synchronize()
    n = max(16, len(calls))
    if graph:
        try:
            return _time_body(_capture(calls, n), n)
        except RuntimeError as e:  # a call that cannot be captured: time plain launches
            print(f"  (graph capture failed, timing launches: {str(e)[:120]})")

    def body() -> None:
        for i in range(n):
            calls[i % len(calls)]()
    return _time_body(body, n)


def _capture(calls: list[Callable[[], object]], n: int) -> Callable[[], object]:
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:  # warm the allocator on the capture stream
            c()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        for i in range(n):
            calls[i % len(calls)]()
    torch.cuda.synchronize()
    return g.replay


def _time_body(body: Callable[[], object], n: int) -> float:
    body()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    body()
    end.record()
    end.synchronize()
    reps = int(min(50, max(5, 0.4 / max(start.elapsed_time(end) / 1e3, 1e-6))))
    samples = []
    for _ in range(reps):
        start.record()
        body()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / n)
    return statistics.median(samples)


def n_sets_for(run: Run, nbytes: int, cap: int = 64) -> int:
    """How many input copies to rotate so that repeated calls do not run out of L2."""
    return max(1, min(cap, math.ceil(4 * run.l2_bytes / max(nbytes, 1))))


def check(run: Run, name: str, err: float, tol: float = 1e-2) -> None:
    ok = err < tol
    run.say(f"  check {name:<44} rel err {err:.2e}  {'ok' if ok else 'FAIL'}")
    run.record.setdefault("checks", {})[name] = err
    if not ok:
        run.failures.append(name)


def _copy_rates(run: Run) -> dict[str, float]:
    """Bytes read + written per second by a 1 GiB device-to-device copy, three ways (the
    2 GiB of buffers are freed on return, before the matmul)."""
    n = 1 << 20 if run.smoke else 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, dtype=BF16, device=run.dev)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    return {
        "memcpy, graph": moved / time_calls(run, [lambda: dst.copy_(src)]),
        "memcpy, launches": moved / time_calls(run, [lambda: dst.copy_(src)], graph=False),
        "elementwise kernel": moved / time_calls(run, [lambda: torch.mul(src, 1, out=dst)]),
    }


def baselines(run: Run) -> tuple[float, float]:
    """The card's two ceilings, measured several ways; the highest of each is the baseline
    (the stricter yardstick for our kernels)."""
    copies = _copy_rates(run)
    m = 256 if run.smoke else 8192
    a = torch.randn(m, m, dtype=BF16, device=run.dev)
    b = torch.randn(m, m, dtype=BF16, device=run.dev)
    flop = 2 * m ** 3
    mms = {"sustained (graph, median)": flop / time_calls(run, [lambda: a @ b])}
    if not run.smoke:  # a short burst, as KINDS.md measured: 10 after 3 warm-ups, mean
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        mms["burst (10 launches, mean)"] = flop / (start.elapsed_time(end) / 1e3 / 10)
    one = torch.zeros(1, device=run.dev)
    floor = time_calls(run, [lambda: one.add_(1)])
    for k, v in copies.items():
        run.say(f"device-to-device copy, {k:<20}: {v / 1e9:6.0f} GB/s (read+write)")
    for k, v in mms.items():
        run.say(f"bf16 matmul {m}^3, {k:<26}: {v / 1e12:6.1f} TFLOP/s")
    run.say(f"one tiny kernel in a CUDA graph: {floor * 1e6:.2f} us (the per-launch floor)")
    copy_bw, mm = max(copies.values()), max(mms.values())
    run.record.update(copy_GBps=copy_bw / 1e9, matmul_TFLOPs=mm / 1e12, launch_floor_us=floor * 1e6,
                      copies={k: v / 1e9 for k, v in copies.items()},
                      matmuls={k: v / 1e12 for k, v in mms.items()})
    return copy_bw, mm


def size_matched_copy(run: Run, nbytes: int) -> str:
    """Copy bandwidth (read+write) of a tensor the size of the KV read: what a copy reaches
    at this size, launch and ramp-up included. Skipped above 2 GB (it is the asymptote)."""
    if nbytes > 2e9:
        return "-"
    sets = n_sets_for(run, 2 * nbytes)
    srcs = [torch.randn(nbytes // 2, dtype=BF16, device=run.dev) for _ in range(sets)]
    dsts = [torch.empty_like(x) for x in srcs]
    t = time_calls(run, [lambda i=i: torch.mul(srcs[i], 1, out=dsts[i]) for i in range(sets)])
    return f"{2 * nbytes / t / 1e9:.0f}"


def guarded(run: Run, what: str, fn: Callable[[], object]) -> object:
    """Run one section; a crash is reported and counted, and the later sections still run
    (a device call is too scarce to lose to one bad section)."""
    try:
        return fn()
    except Exception:
        run.say(f"{what} CRASHED:\n{traceback.format_exc()[-2000:]}")
        run.failures.append(what)
        return None

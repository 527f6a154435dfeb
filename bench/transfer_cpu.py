"""KV transfer throughput on this machine: the ``tcp`` and ``ucx`` connectors.

Moves a request's KV (default 64 MiB: 32 layers of 2 MiB, a Llama-3-8B-shaped KV of 512
tokens in bf16) layer by layer, as a prefill pod does, and prints GB/s (payload bytes over
the time from ``begin`` to the receiver's acknowledgement, packing included). Cases:
- memcpy: pack_layer + scatter_layer only (the floor a copying connector pays);
- each connector with both ends in one process (they share the GIL), and with the
  receiver in its own process, as between pods;
- the same split into N concurrent requests interleaved over the one connection.

    .venv/bin/python bench/transfer_cpu.py [--mib 64] [--layers 32] [--repeat 5] [--kinds tcp,ucx]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kv_layout import KVLayout, KVMemory
from kv_transfer import (
    KVSender,
    KVTargetSpec,
    introduce,
    make_receiver,
    make_sender,
    pack_layer,
    scatter_layer,
)


def layout_for(layers: int) -> KVLayout:
    return KVLayout(model_id="bench", dtype="bfloat16", block_size=16, num_layers=layers,
                    num_kv_heads=8, head_dim=128)


def caches(layout: KVLayout, num_blocks: int) -> list[torch.Tensor]:
    return [torch.randn(layout.layer_shape(num_blocks)).to(layout.torch_dtype)
            for _ in range(layout.num_layers)]


def plan(layout: KVLayout, total_blocks: int, requests: int) -> list[tuple[list[int], list[int]]]:
    """(source ids, destination ids) per request; destinations are shuffled free blocks."""
    per = total_blocks // requests
    dst_order = torch.randperm(2 * total_blocks, generator=torch.Generator().manual_seed(0))
    jobs = []
    for r in range(requests):
        src = list(range(r * per, (r + 1) * per))
        dst = [int(b) for b in dst_order[r * per:(r + 1) * per]]
        jobs.append((src, dst))
    return jobs


def send_all(sender: KVSender, address: str, kind: str, layout: KVLayout,
             jobs: list[tuple[list[int], list[int]]], tag: str) -> float:
    """Seconds from the first begin() to the last acknowledgement."""
    t0 = time.perf_counter()
    handles = [sender.begin(KVTargetSpec(kind, address, f"{tag}-{i}", tuple(dst),
                                         layout.fingerprint))
               for i, (_, dst) in enumerate(jobs)]
    for layer in range(layout.num_layers):  # layer-major, as the forward produces them
        for handle, (src_ids, _) in zip(handles, jobs, strict=True):
            handle.layer_written(layer, src_ids, None)
    for handle in handles:
        handle.wait(60)
    return time.perf_counter() - t0


def run_in_process(kind: str, layout: KVLayout, src: list[torch.Tensor],
                   dst: list[torch.Tensor], jobs: list[tuple[list[int], list[int]]],
                   repeat: int) -> list[float]:
    receiver = make_receiver(kind, KVMemory(layout, tuple(dst)))
    sender = make_sender(kind, KVMemory(layout, tuple(src)))
    introduce(receiver, sender)
    try:
        times = []
        for rep in range(repeat + 1):  # the first run warms up (connection, buffers)
            pendings = [receiver.expect(f"r{rep}-{i}", d) for i, (_, d) in enumerate(jobs)]
            seconds = send_all(sender, receiver.address, kind, layout, jobs, f"r{rep}")
            for p in pendings:
                p.wait(60)
            if rep:
                times.append(seconds)
        check(src, dst, jobs)
        return times
    finally:
        sender.close()
        receiver.close()


def check(src: list[torch.Tensor], dst: list[torch.Tensor],
          jobs: list[tuple[list[int], list[int]]]) -> None:
    for s, d in zip(src, dst, strict=True):
        for src_ids, dst_ids in jobs:
            assert torch.equal(d[:, dst_ids], s[:, src_ids]), "bytes did not land exactly"


def receiver_process(conn: Connection, kind: str, layers: int, num_blocks: int) -> None:
    torch.set_num_threads(1)
    layout = layout_for(layers)
    dst = [torch.zeros(layout.layer_shape(num_blocks), dtype=layout.torch_dtype)
           for _ in range(layers)]
    receiver = make_receiver(kind, KVMemory(layout, tuple(dst)))
    conn.send((receiver.address, receiver.peer_info()))
    back = conn.recv()
    if back:
        receiver.add_peer(back)
    while (msg := conn.recv()) is not None:
        tag, jobs = msg
        pendings = [receiver.expect(f"{tag}-{i}", d) for i, (_, d) in enumerate(jobs)]
        conn.send("ready")
        for p in pendings:
            p.wait(60)
        conn.send([d[:, ids].clone() for d in dst for _, ids in jobs[:1]])
    receiver.close()


def run_two_processes(kind: str, layout: KVLayout, src: list[torch.Tensor],
                      jobs: list[tuple[list[int], list[int]]], num_blocks: int,
                      repeat: int) -> list[float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_process,
                       args=(child, kind, layout.num_layers, num_blocks), daemon=True)
    proc.start()
    sender = make_sender(kind, KVMemory(layout, tuple(src)))
    try:
        address, info = parent.recv()
        parent.send(sender.add_peer(address, info) if info else b"")
        times = []
        for rep in range(repeat + 1):
            tag = f"x{rep}"
            parent.send((tag, jobs))
            assert parent.recv() == "ready"
            seconds = send_all(sender, address, kind, layout, jobs, tag)
            landed = parent.recv()
            src_ids = jobs[0][0]
            assert all(torch.equal(got, s[:, src_ids]) for got, s in zip(landed, src, strict=True))
            if rep:
                times.append(seconds)
        parent.send(None)
        return times
    finally:
        sender.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def memcpy_only(layout: KVLayout, src: list[torch.Tensor], dst: list[torch.Tensor],
                jobs: list[tuple[list[int], list[int]]], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        for layer in range(layout.num_layers):
            for src_ids, dst_ids in jobs:
                scatter_layer(dst[layer], dst_ids, pack_layer(src[layer], src_ids))
        times.append(time.perf_counter() - t0)
    return times[1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="KV bytes per run, MiB")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16, help="for the concurrent cases")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--kinds", default="tcp,ucx", help="connectors to measure")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    layout = layout_for(args.layers)
    total_blocks = (args.mib << 20) // (layout.block_bytes_per_layer * args.layers)
    total_bytes = total_blocks * layout.block_bytes_per_layer * args.layers
    src = caches(layout, total_blocks)
    dst = caches(layout, 2 * total_blocks)
    print(f"KV: {total_bytes / 2**20:.0f} MiB = {args.layers} layers x {total_blocks} blocks "
          f"of {layout.block_bytes_per_layer // 1024} KiB ({layout.dtype}, block_size "
          f"{layout.block_size}, {layout.num_kv_heads} KV heads x {layout.head_dim}); "
          f"median (best) of {args.repeat}")
    cases: list[tuple[str, Callable[[], list[float]]]] = []
    for reqs in (1, args.requests):
        jobs = plan(layout, total_blocks, reqs)
        suffix = "" if reqs == 1 else f", {reqs} requests"
        cases += [
            (f"memcpy (pack+scatter){suffix}",
             lambda j=jobs: memcpy_only(layout, src, dst, j, args.repeat)),
        ]
        for kind in args.kinds.split(","):
            cases += [
                (f"{kind}, 1 process{suffix}",
                 lambda j=jobs, k=kind: run_in_process(k, layout, src, dst, j, args.repeat)),
                (f"{kind}, 2 processes{suffix}",
                 lambda j=jobs, k=kind: run_two_processes(k, layout, src, j, 2 * total_blocks,
                                                          args.repeat)),
            ]
    print(f"{'case':<40} {'GB/s':>14} {'ms':>16}")
    for name, fn in cases:
        times = fn()
        med, best = statistics.median(times), min(times)
        print(f"{name:<40} {total_bytes / med / 1e9:6.2f} ({total_bytes / best / 1e9:5.2f}) "
              f"{med * 1e3:8.1f} ({best * 1e3:6.1f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

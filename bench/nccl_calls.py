"""What one NCCL transfer costs on the host, between two GPU processes, by communicator mode.

The nccl connector carries a fixed ~2.3 ms per transfer that raw NCCL does not (bench/
RESULTS.md, issue 9). This isolates the library's share: 16 MiB and 256 MiB moved from
cuda:0 to cuda:1 as 1, 16 or 64 send/recv pairs (one NCCL group), on a blocking and on a
non-blocking communicator (nccl4py, as kv_transfer/backends/nccl/link.py makes them). The
receiver posts its receives first; the sender then starts the clock, posts its sends and
polls until NCCL has enqueued them (``enqueue``), and the receiver notes when its event
fires (``total``, the same clock: CLOCK_MONOTONIC is shared by processes on one host).
A second table measures the connector's proposed path alone (``_design``): every layer's K
and V gathered into one buffer, one op, one scatter, for one run of blocks and scattered
ones.

    PYTHONPATH=. python3 bench/nccl_calls.py --repeats 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SIZES_MIB = (16, 256)
SPLITS = (1, 16, 64)
IN_PROGRESS = 7
# The connector's proposed data path, measured alone: Llama-3-8B-shaped KV (32 layers, 8 KV
# heads x 128, bf16, block 16: 2 MiB per block over all layers) held as views of one
# allocation, so a post of every layer is one gather kernel, one NCCL op and one scatter.
LAYERS, POOL_BLOCKS, BLOCK_SHAPE = 32, 1024, (16, 8, 128)
DESIGN_BLOCKS = (8, 128, 512)  # 16 MiB, 256 MiB, 1 GiB


def _poll(comm: Any) -> None:
    while True:
        state = int(comm.get_async_error())
        if state == 0:
            return
        if state != IN_PROGRESS:
            raise RuntimeError(f"NCCL error {state}")


def _post(comm: Any, op: str, parts: list[Any], peer: int, stream: int) -> None:
    import nccl.core as nccl

    def run() -> None:
        nccl.group_start()
        try:
            for t in parts:
                getattr(comm, op)(t, peer, stream=stream)
        finally:
            nccl.group_end()

    try:
        run()
    except Exception as exc:  # a non-blocking communicator says "in progress"
        if "progress" not in str(exc).lower():
            raise
    _poll(comm)


def worker(rank: int, conn: Any, repeats: int, result: Any) -> None:
    import nccl.core as nccl
    import torch

    device = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(device)
    stream = torch.cuda.Stream(device)
    torch.manual_seed(0)  # the same values on both GPUs: the receiver checks what landed
    pool = torch.randn((LAYERS, 2, POOL_BLOCKS, *BLOCK_SHAPE), dtype=torch.bfloat16,
                       device=device)
    rows = []
    for blocking in (True, False):
        uid = conn.recv() if rank else nccl.get_unique_id().as_bytes
        if not rank:
            conn.send(bytes(uid))
        comm = nccl.Communicator.init(2, rank, nccl.UniqueId.from_bytes(bytes(uid)),
                                      config=nccl.NCCLConfig(blocking=blocking))
        _poll(comm)
        warm = torch.empty(1 << 20, dtype=torch.uint8, device=device)
        _post(comm, "recv" if rank else "send", [warm], 1 - rank, stream.cuda_stream)
        stream.synchronize()
        for mib in SIZES_MIB:
            buf = torch.empty(mib << 20, dtype=torch.uint8, device=device)
            for split in SPLITS:
                parts = list(buf.chunk(split))
                enq, total = [], []
                for _ in range(repeats + 2):
                    done = torch.cuda.Event()
                    if rank:
                        _post(comm, "recv", parts, 0, stream.cuda_stream)
                        done.record(stream)
                        conn.send("posted")
                        while not done.query():
                            pass
                        conn.send(time.perf_counter())
                    else:
                        assert conn.recv() == "posted"
                        t0 = time.perf_counter()
                        _post(comm, "send", parts, 1, stream.cuda_stream)
                        t1 = time.perf_counter()
                        done.record(stream)
                        while not done.query():
                            pass
                        t_end = conn.recv()
                        enq.append(t1 - t0)
                        total.append(t_end - t0)
                if not rank:
                    enq, total = enq[2:], total[2:]
                    row = {"blocking": blocking, "mib": mib, "ops": split,
                           "enqueue_us": 1e6 * statistics.median(enq),
                           "total_us": 1e6 * statistics.median(total),
                           "gbps": (mib << 20) / statistics.median(total) / 1e9}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        rows += _design(comm, rank, conn, stream, pool, repeats, blocking)
        comm.destroy() if hasattr(comm, "destroy") else comm.abort()
    if not rank:
        result.put(rows)


def _design(comm: Any, rank: int, conn: Any, stream: Any, pool: Any, repeats: int,
            blocking: bool) -> list[dict]:
    """Every layer's K and V of ``n`` blocks in one op: the sender gathers them from the
    pool into one staging buffer (one kernel: a strided copy for one run of blocks, an
    index_select for scattered ones) and sends it; the receiver, its receive posted first,
    scatters them into its pool (one kernel) on the same stream. Total: from the sender's
    start to the receiver's scatter done; the receiver checks the bytes by their sum."""
    import random

    import torch

    rows = []
    for n in DESIGN_BLOCKS:
        shape = (LAYERS, 2, n, *BLOCK_SHAPE)
        nbytes = pool.element_size() * LAYERS * 2 * n * BLOCK_SHAPE[0] * BLOCK_SHAPE[1] \
            * BLOCK_SHAPE[2]
        for pattern in ("one run", "scattered"):
            rng = random.Random(n)
            if pattern == "one run":
                src, dst = list(range(100, 100 + n)), list(range(300, 300 + n))
            else:
                src, dst = rng.sample(range(POOL_BLOCKS), n), rng.sample(range(POOL_BLOCKS), n)
            mine = torch.tensor(dst if rank else src, dtype=torch.long, device=pool.device)
            staging = torch.empty(shape, dtype=pool.dtype, device=pool.device)
            flat = staging.view(torch.uint8).view(-1)
            total, ok = [], True
            for _ in range(repeats + 2):
                done = torch.cuda.Event()
                if rank:
                    _post(comm, "recv", [flat], 0, stream.cuda_stream)
                    with torch.cuda.stream(stream):
                        if pattern == "one run":
                            pool[:, :, dst[0]:dst[0] + n].copy_(staging)
                        else:
                            pool.index_copy_(2, mine, staging)
                    done.record(stream)
                    conn.send("posted")
                    while not done.query():
                        pass
                    t_done = time.perf_counter()
                    landed = float(pool.index_select(2, mine).float().sum())
                    conn.send(t_done)
                    ok = ok and abs(landed - conn.recv()) <= 1e-3 * max(1.0, abs(landed))
                else:
                    assert conn.recv() == "posted"
                    t0 = time.perf_counter()
                    with torch.cuda.stream(stream):
                        if pattern == "one run":
                            staging.copy_(pool[:, :, src[0]:src[0] + n])
                        else:
                            torch.index_select(pool, 2, mine, out=staging)
                    _post(comm, "send", [flat], 1, stream.cuda_stream)
                    done.record(stream)
                    while not done.query():
                        pass
                    total.append(conn.recv() - t0)
                    conn.send(float(staging.float().sum()))
            if rank:
                conn.send(ok)
            else:
                ok = conn.recv()
                row = {"blocking": blocking, "mib": nbytes >> 20, "design": pattern,
                       "total_us": 1e6 * statistics.median(total[2:]),
                       "gbps": nbytes / statistics.median(total[2:]) / 1e9, "bytes_ok": ok}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    result: Any = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, c, args.repeats, result))
             for r, c in ((0, a), (1, b))]
    for proc in procs:
        proc.start()
    rows: list[dict] = result.get(timeout=300)
    for proc in procs:
        proc.join(60)
    print("| communicator | MiB | ops in the group | enqueue us | total us | GB/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "design" in r:
            continue
        mode = "blocking" if r["blocking"] else "non-blocking"
        print(f"| {mode} | {r['mib']} | {r['ops']} | {r['enqueue_us']:.0f} | "
              f"{r['total_us']:.0f} | {r['gbps']:.1f} |")
    print("\nthe proposed path: gather every layer into one buffer, one op, scatter\n")
    print("| communicator | MiB | blocks | total us | GB/s | bytes ok |\n|---|---|---|---|---|---|")
    for r in rows:
        if "design" in r:
            mode = "blocking" if r["blocking"] else "non-blocking"
            print(f"| {mode} | {r['mib']} | {r['design']} | {r['total_us']:.0f} | "
                  f"{r['gbps']:.1f} | {r['bytes_ok']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if rows and all(r.get("bytes_ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

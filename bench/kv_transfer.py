"""KV transfer between two GPU processes, through each connector, against the ceilings.

A "prefill" process on cuda:0 sends Llama-3-8B-shaped KV (32 layers, 8 KV heads, head_dim
128, bf16, block size 16: 2 MiB per block over all layers) of requests from 1 to 512 blocks
(2 MiB .. 1 GiB) into a "decode" process's reserved blocks on cuda:1 (``--same-gpu``: both
on cuda:0), through each connector asked for, with a fresh pool (both sides' blocks in one
run) and a fragmented one (random block ids on both sides). In the same run it measures
the ceilings for the same bytes: one raw NCCL send/recv of a contiguous buffer between the
two processes, and a peer copy cuda:0 -> cuda:1 in one process. A transfer's time runs
from the sender's begin() to the moment the receiver has every layer in its blocks.

    PYTHONPATH=. python3 bench/kv_transfer.py --kinds nccl,ucx,ucx-packed --json out.json

(``ucx-packed``: the ucx backend with a 1 GiB staging area, so fragmented blocks are
gathered and scattered on the GPUs instead of going block by block.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
POOL_BLOCKS = 2048  # per process: 4 GiB of KV
SIZES = [1, 4, 8, 32, 128, 256, 512]  # blocks per request: 2 MiB .. 1 GiB


def _layout() -> Any:
    from engine.kv_layout import KVLayout

    return KVLayout(model_id="bench-8b", dtype="bfloat16", block_size=BLOCK,
                    num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)


def _memory(device: str, fill: bool) -> Any:
    import torch

    from engine.kv_layout import KVMemory

    layout = _layout()
    shape = layout.layer_shape(POOL_BLOCKS)
    layers = []
    for i in range(LAYERS):
        t = torch.empty(shape, dtype=torch.bfloat16, device=device)
        t.normal_() if fill else t.zero_()
        if fill:
            t.add_(i)
        layers.append(t)
    return KVMemory(layout, tuple(layers))


def _cases(seed: int) -> list[tuple[str, int, list[int], list[int]]]:
    rng = random.Random(seed)
    cases = []
    for n in SIZES:
        start = rng.randrange(0, POOL_BLOCKS - n)
        run = list(range(start, start + n))
        cases.append(("fresh", n, run, [(b + 7) % POOL_BLOCKS for b in run]))
        cases.append(("fragmented", n, rng.sample(range(POOL_BLOCKS), n),
                      rng.sample(range(POOL_BLOCKS), n)))
    return cases


def _config(kind: str) -> Any:
    """``ucx-packed``: the ucx backend with a 1 GiB staging area (ucx/staging.py)."""
    from kv_transfer import ConnectorConfig

    return ConnectorConfig(staging_bytes=1 << 30 if kind == "ucx-packed" else None)


def _dump_stacks_if_stuck() -> None:
    """A run stuck for two minutes from here prints where every thread is, then ends,
    instead of hanging silently (each call restarts the clock)."""
    import faulthandler

    faulthandler.dump_traceback_later(120, exit=True)


def receiver_main(conn: Any, device: str, kinds: list[str], repeats: int,
                  same_gpu: bool) -> None:
    import torch

    _dump_stacks_if_stuck()

    from kv_transfer import make_receiver

    torch.cuda.set_device(device)
    memory = _memory(device, fill=False)
    if not same_gpu:  # two NCCL ranks on one GPU are unsupported
        _raw_nccl(conn, device, rank=1, repeats=repeats)
    for kind in kinds:
        receiver = make_receiver(kind.removesuffix("-packed"), memory, _config(kind))
        conn.send((receiver.address, receiver.peer_info()))
        back = conn.recv()
        if back:
            receiver.add_peer(back)
        while True:
            msg = conn.recv()
            if msg is None:
                break
            tid, dst = msg
            _dump_stacks_if_stuck()
            pending = receiver.expect(tid, dst)
            conn.send("ready")
            pending.wait(120)
            done = time.perf_counter()
            # the sender's layer i holds values around i: a landed block shows it
            ok = all(abs(float(memory.layers[i][:, dst[:1]].float().mean()) - i) < 0.5
                     for i in (0, LAYERS - 1))
            conn.send((done, ok))
        receiver.close()


def _raw_nccl(conn: Any, device: str, rank: int, repeats: int) -> dict[int, float]:
    """The ceiling: one contiguous buffer of each size, NCCL send/recv through
    torch.distributed (the same library every connector sits on), median seconds."""
    import datetime

    import torch
    import torch.distributed as dist

    if rank == 0:
        conn.send(f"file:///tmp/pdserve-kvt-{time.time_ns()}")
    init = conn.recv() if rank == 1 else None
    if rank == 0:
        init = conn.recv()  # the receiver echoes it once it is about to join
    else:
        conn.send(init)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120),
                            device_id=torch.device(device))
    out: dict[int, float] = {}
    for n in SIZES:
        nbytes = n * LAYERS * _layout().block_bytes_per_layer
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        times = []
        for _ in range(repeats + 1):
            dist.barrier(device_ids=[torch.device(device).index])
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
            else:
                dist.recv(buf, 0)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        out[n] = statistics.median(times[1:])
    if rank == 1:
        conn.send(out)  # the receiver's view: its recv completes when the data is in
    else:
        out = {k: max(v, w) for (k, v), w in zip(out.items(), conn.recv().values(),
                                                 strict=True)}
    dist.destroy_process_group()
    return out


def sender_main(conn: Any, device: str, peer_device: str, kinds: list[str], repeats: int,
                same_gpu: bool, result: Any) -> None:
    import torch

    _dump_stacks_if_stuck()

    from kv_transfer import KVTargetSpec, make_sender

    torch.cuda.set_device(device)
    memory = _memory(device, fill=True)
    layer_bytes = memory.layout.block_bytes_per_layer
    rows: list[dict] = []
    copies = _peer_copy(device, peer_device, repeats)
    print("peer copies measured", flush=True)
    raw = copies if same_gpu else _raw_nccl(conn, device, rank=0, repeats=repeats)
    print("raw NCCL measured", flush=True)
    for n in SIZES:
        nbytes = n * LAYERS * layer_bytes
        if not same_gpu:
            rows.append({"kind": "raw-nccl", "pattern": "contiguous", "blocks": n,
                         "mib": nbytes / 2**20, "gbps": nbytes / raw[n] / 1e9})
        rows.append({"kind": "peer-copy", "pattern": "contiguous", "blocks": n,
                     "mib": nbytes / 2**20, "gbps": nbytes / copies[n] / 1e9})
    for kind in kinds:
        sender = make_sender(kind.removesuffix("-packed"), memory, _config(kind))
        address, info = conn.recv()
        print(f"{kind}: handshake", flush=True)
        conn.send(sender.add_peer(address, info) if info else b"")
        serial = 0
        for pattern, n, src, dst in [("warmup", 1, [0], [1])] + _cases(1) * 1:
            times = []
            ok_all = True
            for _ in range(1 if pattern == "warmup" else repeats):
                serial += 1
                _dump_stacks_if_stuck()
                tid = f"{kind}-{serial}"
                conn.send((tid, dst))
                assert conn.recv() == "ready"
                t0 = time.perf_counter()
                handle = sender.begin(KVTargetSpec(kind.removesuffix("-packed"), address, tid,
                                                   tuple(dst),
                                                   memory.fingerprint))
                for layer in range(LAYERS):
                    handle.layer_written(layer, src, None)
                handle.wait(120)
                done, ok = conn.recv()
                times.append(done - t0)
                ok_all = ok_all and ok
            if pattern == "warmup":
                continue
            nbytes = n * LAYERS * layer_bytes
            sec = statistics.median(times)
            rows.append({"kind": kind, "pattern": pattern, "blocks": n, "mib": nbytes / 2**20,
                         "gbps": nbytes / sec / 1e9, "vs_raw_nccl": raw[n] / sec,
                         "bytes_ok": ok_all})
            base = "peer copy" if same_gpu else "raw NCCL"
            print(f"{kind:5s} {pattern:10s} {nbytes / 2**20:7.0f} MiB  {nbytes / sec / 1e9:7.1f} "
                  f"GB/s  {100 * raw[n] / sec:5.1f}% of {base}  ok={ok_all}", flush=True)
        conn.send(None)
        sender.close()
    result.put(rows)


def _peer_copy(device: str, peer: str, repeats: int) -> dict[int, float]:
    import torch

    out = {}
    for n in SIZES:
        nbytes = n * LAYERS * _layout().block_bytes_per_layer
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=peer)
        times = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize(device)
            torch.cuda.synchronize(peer)
            t0 = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize(device)
            torch.cuda.synchronize(peer)
            times.append(time.perf_counter() - t0)
        out[n] = statistics.median(times[1:])
        del src, dst
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="nccl,ucx")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--same-gpu", action="store_true", help="both processes on cuda:0")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    recv_dev = "cuda:0" if args.same_gpu else "cuda:1"
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    result: Any = ctx.Queue()
    if args.same_gpu and "nccl" in kinds:
        p.error("nccl needs two GPUs (two ranks on one GPU are unsupported)")
    recv = ctx.Process(target=receiver_main,
                       args=(b, recv_dev, kinds, args.repeats, args.same_gpu))
    send = ctx.Process(target=sender_main,
                       args=(a, "cuda:0", recv_dev, kinds, args.repeats, args.same_gpu, result))
    recv.start()
    send.start()
    rows = result.get(timeout=900)
    send.join(60)
    recv.join(60)
    base = "the same-GPU copy" if args.same_gpu else "raw NCCL"
    print(f"\n| connector | pool | MiB | GB/s | of {base} |\n|---|---|---|---|---|")
    for r in rows:
        share = f"{100 * r['vs_raw_nccl']:.0f}%" if "vs_raw_nccl" in r else "-"
        print(f"| {r['kind']} | {r['pattern']} | {r['mib']:.0f} | {r['gbps']:.1f} | {share} |")
    if args.json:
        args.json.write_text(json.dumps({"same_gpu": args.same_gpu, "rows": rows}, indent=1))
    return 0 if all(r.get("bytes_ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

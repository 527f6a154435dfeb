"""What a kernel that only reads the 1 x 4096 KV can reach on this card: the floor under
paged decode attention at batch 1 (issue 3's 50%-of-copy goal at 1 x 4096).

Stand-in kernels read the same 16.8 MB in the same 512 programs of 32 KB (8 KV heads x 64
splits) and add, one at a time, what the real kernel must do:

1. contiguous: each program sums its own 32 KB (no table, no merge);
2. paged: each program first reads its page number from a table (one dependent load);
3. + merge: each program stores a 2 KB partial and draws a ticket; the last of each group
   of 64 reads the group's 128 KB of partials back and writes 2 KB (the real merge's bytes),
   (a) as [8 splits, 512] tiles summed over the split axis, which Triton reduces across
   threads (the real kernel's way), or (b) one split per unrolled step; (c) draws the
   ticket but reads nothing back (the cost of the synchronisation alone); (d) merges in two
   levels, the last of each 8 programs first, then the last of those 8 mergers;
4. + PDL chain: 3a launched by programmatic dependent launch, as the real kernel is.

Beside them, in the same run: the real kernel at 1 x 4096, an elementwise copy of the same
bytes, and the copy bandwidth the goal is measured against. All timed as bench/gpu_kernels.py
times (CUDA graphs of many calls, inputs rotated past L2).

    PYTHONPATH=. python3 bench/gpu_decode_floor.py [--smoke]
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.language as tl
from gpu_attention_cases import HD, HK, decode_setup, time_decode
from gpu_timing import Run, baselines, n_sets_for, size_matched_copy, time_calls
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.triton_decode_attention import DecodeConfig

GROUP_PROGRAMS = 64  # splits per KV head
PARTIAL = 512  # floats per program's partial: 4 query heads x 128


FLAT, FLAT_PER_SPLIT, TICKET_ONLY, TWO_LEVEL = 1, 2, 3, 4  # merge modes (0: none)


@triton.jit
def _sum_rows(partials, first, p, N: tl.constexpr, PART: tl.constexpr):
    """Sum N partial rows from ``first`` as [8, PART] tiles reduced over the row axis."""
    rows = first + tl.arange(0, 8)
    total = tl.zeros([PART], tl.float32)
    for c in tl.static_range(N // 8):
        total += tl.sum(tl.load(partials + (rows + c * 8)[:, None] * PART + p[None, :],
                                cache_modifier=".cg"), axis=0)
    return total


@triton.jit
def _last(tickets, idx, n):
    """Draw a ticket; true for the n-th drawer, which also resets the counter."""
    last = tl.atomic_add(tickets + idx, 1, sem="acq_rel", scope="gpu") == n - 1
    if last:
        tl.atomic_xchg(tickets + idx, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def _stand_in(src, table, partials, partials2, tickets, out, ELEMS: tl.constexpr,
              BLOCK: tl.constexpr, PAGED: tl.constexpr, MERGE: tl.constexpr,
              CHAIN: tl.constexpr, GROUP: tl.constexpr, PART: tl.constexpr,
              NGROUPS: tl.constexpr):
    pid = tl.program_id(0)
    if CHAIN:
        gdc_launch_dependents()
        gdc_wait()
    base = tl.load(table + pid).to(tl.int64) * ELEMS if PAGED else pid.to(tl.int64) * ELEMS
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(ELEMS // BLOCK):
        acc += tl.load(src + base + i * BLOCK + offs).to(tl.float32)
    p = tl.arange(0, PART)
    part = tl.sum(acc) + p.to(tl.float32)
    group = pid // GROUP
    if MERGE == 0:
        tl.store(out + pid * PART + p, part)
    else:
        tl.store(partials + pid * PART + p, part)
        tl.debug_barrier()
        if MERGE == 4:  # groups of 8 merge first, then the last of 8 group-mergers
            sub = pid // 8
            if _last(tickets, NGROUPS + sub, 8):
                tl.store(partials2 + sub * PART + p, _sum_rows(partials, sub * 8, p, 8, PART))
                tl.debug_barrier()
                if _last(tickets, group, GROUP // 8):
                    tl.store(out + group * PART + p,
                             _sum_rows(partials2, group * (GROUP // 8), p, GROUP // 8, PART))
        elif _last(tickets, group, GROUP):
            if MERGE == 1:
                total = _sum_rows(partials, group * GROUP, p, GROUP, PART)
            elif MERGE == 2:
                total = tl.zeros([PART], tl.float32)
                for r in tl.static_range(GROUP):
                    total += tl.load(partials + (group * GROUP + r) * PART + p,
                                     cache_modifier=".cg")
            else:  # ticket only: what the merge costs without reading the partials
                total = part
            tl.store(out + group * PART + p, total)


def main() -> int:
    smoke = "--smoke" in sys.argv
    dev = torch.device("cpu" if smoke else "cuda")
    l2 = 1 << 16 if smoke else torch.cuda.get_device_properties(dev).L2_cache_size
    run = Run(dev, smoke, l2)
    copy_bw, _ = baselines(run)
    batch, ctx = (1, 64) if smoke else (1, 4096)
    nbytes = batch * ctx * HK * HD * 2 * 2
    programs = HK * (8 if smoke else GROUP_PROGRAMS)
    group = programs // HK
    elems = nbytes // 2 // programs
    sets = n_sets_for(run, nbytes)
    srcs = [torch.randn(nbytes // 2, dtype=torch.bfloat16, device=dev) for _ in range(sets)]
    tables = [torch.randperm(programs, device=dev).int() for _ in range(sets)]
    partials = torch.empty(programs * PARTIAL, device=dev)
    partials2 = torch.empty(programs // 8 * PARTIAL, device=dev)
    tickets = torch.zeros(HK + programs // 8, dtype=torch.int32, device=dev)
    out = torch.empty(programs * PARTIAL, device=dev)

    def variant(paged: bool, merge: int, chain: bool = False) -> float:
        def call(i: int) -> None:
            _stand_in[(programs,)](srcs[i], tables[i], partials, partials2, tickets, out,
                                   ELEMS=elems, BLOCK=min(elems, 2048), PAGED=paged,
                                   MERGE=merge, CHAIN=chain and not smoke, GROUP=group,
                                   PART=PARTIAL, NGROUPS=HK,
                                   num_warps=4, **({"launch_pdl": True} if chain and not smoke
                                                   else {}))
        return time_calls(run, [lambda i=i: call(i) for i in range(sets)])

    rows = [("1. contiguous read, one kernel", variant(False, 0)),
            ("2. paged (one dependent table load)", variant(True, 0)),
            ("3a. paged + merge, split axis reduced across threads", variant(True, FLAT)),
            ("3b. paged + merge, one split per step", variant(True, FLAT_PER_SPLIT)),
            ("3c. paged + ticket, last arriver reads nothing", variant(True, TICKET_ONLY)),
            ("3d. paged + two-level merge (8 x 8)", variant(True, TWO_LEVEL)),
            ("4. 3a + PDL chain", variant(True, FLAT, chain=True))]
    assert int(tickets.sum()) == 0, "tickets must return to zero"
    srcs.clear()  # free them before the real kernel's own inputs
    st = decode_setup(run, batch, ctx)
    rows.append(("paged decode attention (default config)", time_decode(run, st, DecodeConfig())))
    rows.append(("paged decode attention, 32 splits of 128-token tiles",
                 time_decode(run, st, DecodeConfig(num_splits=32, split_block_n=128))))
    run.say(f"\n{batch} x {ctx}: {nbytes / 1e6:.1f} MB read in {programs} programs; "
            f"copy bandwidth {copy_bw / 1e9:.0f} GB/s; the 50% goal is "
            f"{nbytes / (0.5 * copy_bw) * 1e6:.1f} us; an elementwise copy of these bytes "
            f"reaches {size_matched_copy(run, nbytes)} GB/s (read+write)")
    run.say("| kernel | us | GB/s read | % of copy |")
    run.say("|---|---|---|---|")
    for name, t in rows:
        run.say(f"| {name} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | "
                f"{nbytes / t / copy_bw * 100:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long llguidance takes to fill one step's token bitmasks, by thread count.

32 matchers of the JSON schema bench/structured_bench.py decodes under, each made as the
engine makes them (a deep copy of the compiled template) and walked by random allowed
tokens; per step, one ``unsafe_compute_mask_ptr`` over all rows (what the engine's worker
does), timed after a warm-up of 10 steps. Host only: no model runs.

    .venv/bin/python bench/grammar_fill.py --model models/default [--threads 1,2,4,0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from structured_bench import SCHEMA

from engine.grammar import GrammarCompiler, _build_matcher, tokenizer_factory_for
from engine.structured_spec import StructuredOutputSpec


def fill_ms(templates: list[object], vocab: int, rows: int, threads: int, steps: int,
            split: int = 1) -> float:
    """``split`` > 1: that many Python threads, each with a one-thread executor of its
    own, fill a share of the rows each (``threads`` is then ignored). Row i copies
    ``templates[i * len(templates) // rows]``: copies of one template share its lexer
    state and the lock around it, so only rows of different templates fill in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from llguidance import LLExecutor

    executor = LLExecutor(threads) if threads else LLExecutor()
    own = [LLExecutor(1) for _ in range(split)]
    pool = ThreadPoolExecutor(max_workers=split) if split > 1 else None
    rng = random.Random(1)
    matchers = [templates[i * len(templates) // rows].deep_copy()  # type: ignore[attr-defined]
                for i in range(rows)]
    words = (vocab + 31) // 32
    out = torch.full((rows, words), -1, dtype=torch.int32)
    times = []
    for step in range(steps + 10):
        pairs = [(m, i) for i, m in enumerate(matchers)]
        t0 = time.perf_counter()
        if pool is None:
            executor.unsafe_compute_mask_ptr(pairs, out.data_ptr(), words * 4, rows)
        else:
            shares = [pairs[k::split] for k in range(split)]
            jobs = [pool.submit(own[k].unsafe_compute_mask_ptr, share, out.data_ptr(),
                                words * 4, rows) for k, share in enumerate(shares)]
            for job in jobs:
                job.result()
        if step >= 10:
            times.append(time.perf_counter() - t0)
        bits = out.numpy().view(np.uint8)
        for i, m in enumerate(matchers):
            allowed = np.flatnonzero(np.unpackbits(bits[i], bitorder="little")[:vocab])
            m.consume_token(int(rng.choice(allowed)))
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--threads", default="1,2,4,8,16,0", help="0: llguidance's default")
    ap.add_argument("--split", default="",
                    help="also: N Python threads with a one-thread executor each, e.g. 2,3")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--replicas", default="1",
                    help="independently compiled templates the rows copy, e.g. 1,8,32")
    args = ap.parse_args()
    config = json.loads((Path(args.model) / "config.json").read_text())
    vocab = config["vocab_size"]
    compiler = GrammarCompiler(tokenizer_factory_for(args.model, vocab,
                                                     [config.get("eos_token_id") or 0]))
    spec = StructuredOutputSpec.json_schema(SCHEMA)
    print(f"{args.model}: vocab {vocab}; "
          f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; {args.rows} rows")
    print("| templates | threads | ms per fill (median) | us per row |")
    print("| --- | --- | --- | --- |")
    for replicas in (int(r) for r in args.replicas.split(",")):
        # compiled anew, not taken from the compiler's cache: each has its own lexer state
        templates = [_build_matcher(compiler.tokenizer, spec.grammar_text())
                     for _ in range(replicas)]
        for threads in (int(t) for t in args.threads.split(",")):
            ms = fill_ms(templates, vocab, args.rows, threads, args.steps)
            print(f"| {replicas} | {threads or 'default'} | {ms:.3f} | "
                  f"{1e3 * ms / args.rows:.1f} |", flush=True)
        for split in (int(n) for n in args.split.split(",") if n):
            ms = fill_ms(templates, vocab, args.rows, 1, args.steps, split)
            print(f"| {replicas} | {split} Python threads x 1 | {ms:.3f} | "
                  f"{1e3 * ms / args.rows:.1f} |", flush=True)

if __name__ == "__main__":
    main()

"""Sampler time per step: the vectorized sampler against the per-sequence one it replaced.

Times ``engine.sampler.sample`` and ``bench/sampler_legacy.sample`` (the code before the
rewrite, same interface) on the same random logits [batch, vocab] and the same sequences,
at each batch size and for three mixes of sampling parameters:
- greedy: temperature 0;
- sampled: temperature 0.8, top-k 50, top-p 0.95, seeded (every row draws);
- penalties: sampled plus repetition 1.1, frequency 0.2 and presence 0.1 penalties over
  512 prompt and 256 output tokens per sequence, and logprobs=5;
- temperature: temperature 1 only, seeded (a "plain" row: on a GPU drawn by
  kernels.triton_sampler);
- json: temperature plus a random grammar bitmask per row (half the tokens allowed).
Greedy, temperature and json rows are plain: the "torch path" column draws them without
the Triton sampler (``plain_kernel=False``), and ``tokens differ`` counts the rows whose
token differs between the two (the same uniforms: 0 expected, but for a draw within
rounding of a CDF step).
Each call ends with the tokens on the host (as the engine needs them), so on CUDA the time
includes the device work and the copy back; it is the median of ``--repeat`` calls after
``--warmup``. Runs on the CPU or on CUDA (``--device cuda``):

    .venv/bin/python bench/sampler_bench.py [--device cpu|cuda] [--vocab 128256]
        [--batches 1,64,256] [--repeat 10] [--warmup 3]
        [--mixes greedy,sampled,penalties,temperature,json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampler_legacy import sample as legacy_sample

from engine.sampler import sample
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

MIXES = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 0.8, "top_k": 50, "top_p": 0.95},
    "penalties": {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1,
                  "frequency_penalty": 0.2, "presence_penalty": 0.1, "logprobs": 5},
    "temperature": {"temperature": 1.0},
    "json": {"temperature": 1.0},
}


@dataclass
class RandomMasks:
    """engine.sampler.TokenMasks over fixed random rows (the json mix)."""

    rows: torch.Tensor  # [batch, words] int32, on the device

    def bitmask(self, seqs, device):  # type: ignore[no-untyped-def]
        return self.rows

    def settle(self) -> list[int]:
        return []


def _seqs(batch: int, vocab: int, mix: str) -> list[Sequence]:
    rng = random.Random(batch)
    params = SamplingParams(seed=None, max_tokens=4096, **MIXES[mix])
    prompt_len, out_len = (512, 256) if mix == "penalties" else (16, 8)
    return [Sequence(seq_id=i, request_id=f"r{i}", index=0, params=params,
                     seed=rng.randrange(1 << 62),
                     token_ids=[rng.randrange(vocab) for _ in range(prompt_len + out_len)],
                     num_prompt_tokens=prompt_len, max_tokens=4096) for i in range(batch)]


def _time(fn, logits: torch.Tensor, seqs: list[Sequence], warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn(logits.clone(), seqs, [2])
    times = []
    for _ in range(repeat):
        fresh = logits.clone()  # the new sampler works in place, as the engine lets it
        if logits.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(fresh, seqs, [2])  # returns host lists: the device work is done
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--mixes", default="greedy,sampled,penalties,temperature,json")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    print(f"sampler time per step, {name}, vocab {args.vocab}, torch {torch.__version__}, "
          f"median of {args.repeat}")
    print("| mix | batch | before (per-sequence) ms | torch path ms | after ms | "
          "speed-up (before / after) | torch path / after | tokens differ |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mix in args.mixes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            gen = torch.Generator(device=device).manual_seed(batch)
            logits = torch.randn(batch, args.vocab, generator=gen, device=device) * 3
            seqs = _seqs(batch, args.vocab, mix)
            masks = None
            if mix == "json":
                words = (args.vocab + 31) // 32
                masks = RandomMasks(torch.randint(-2**31, 2**31, (batch, words), generator=gen,
                                                  device=device, dtype=torch.int64
                                                  ).to(torch.int32))
            kernel = partial(sample, masks=masks)
            torch_path = partial(sample, masks=masks, plain_kernel=False)
            before = "" if masks is not None else \
                f"{_time(legacy_sample, logits, seqs, args.warmup, args.repeat):.2f}"
            plain = _time(torch_path, logits, seqs, args.warmup, args.repeat)
            after = _time(kernel, logits, seqs, args.warmup, args.repeat)
            differ = sum(a[0] != b[0] for a, b in zip(kernel(logits.clone(), seqs, [2]),
                                                     torch_path(logits.clone(), seqs, [2]),
                                                     strict=True))
            gain = f"{float(before) / after:.1f}x" if before else ""
            print(f"| {mix} | {batch} | {before} | {plain:.2f} | {after:.2f} | {gain} | "
                  f"{plain / after:.1f}x | {differ} |", flush=True)


if __name__ == "__main__":
    main()

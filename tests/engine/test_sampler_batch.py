"""The vectorized sampler on its own: counter-based draws, exact distributions, filters,
bitmasks, and a batch that costs the same number of operations whatever its size.

Sequences here are bare ``Sequence`` records over random logits (no model): what is
checked is the sampler's contract, row by row.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.counter_uniforms import counter_uniforms
from engine.logits_processors import apply_bitmask
from engine.sampler import sample
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

VOCAB = 64


def _seq(params: SamplingParams, seed: int = 0, index: int = 0, outputs: int = 0,
         seq_id: int = 0) -> Sequence:
    prompt = [1, 2, 3]
    return Sequence(seq_id=seq_id, request_id=f"r{seq_id}", index=index, params=params,
                    seed=seed, token_ids=prompt + [5] * outputs, num_prompt_tokens=3,
                    max_tokens=1000)


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 2


def test_uniforms_are_a_pure_function_of_seed_index_and_position() -> None:
    a = counter_uniforms([7, 7, 7, 8], [0, 1, 0, 0], [0, 0, 1, 0])
    b = counter_uniforms([8, 7, 7, 7], [0, 0, 1, 0], [0, 1, 0, 0])
    assert a.tolist() == [b[3], b[2], b[1], b[0]]
    assert len(set(a.tolist())) == 4
    assert counter_uniforms([-1], [0], [0])[0] == counter_uniforms([2**64 - 1], [0], [0])[0]


def test_uniforms_are_uniform() -> None:
    n = 20000
    u = counter_uniforms([12345] * n, [0] * n, list(range(n)))
    assert ((u > 0) & (u < 1)).all()
    counts = Counter((u * 20).astype(int).tolist())
    expected = n / 20
    chi2 = sum((counts[b] - expected) ** 2 / expected for b in range(20))
    assert chi2 < 45, chi2  # 19 degrees of freedom: p < 0.001 above ~43.8


def test_draws_follow_the_softmax_of_the_scaled_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0] + [-30.0] * (VOCAB - 5)])
    params = SamplingParams(temperature=0.8, seed=3)
    n = 6000
    seqs = [_seq(params, seed=3, outputs=k, seq_id=k) for k in range(n)]
    tokens = [t for t, _ in sample(logits.expand(n, -1).contiguous(), seqs, [])]
    probs = torch.softmax(logits[0] / 0.8, dim=-1)
    counts = Counter(tokens)
    for tok in range(4):
        expected = n * probs[tok].item()
        assert abs(counts[tok] - expected) < 5 * math.sqrt(expected), (tok, counts, expected)
    assert set(counts) <= {0, 1, 2, 3, 4}


def test_each_row_is_drawn_as_if_it_were_alone() -> None:
    logits = _logits(6)
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1),
             SamplingParams(temperature=0.7, top_k=5, seed=2),
             SamplingParams(temperature=1.3, top_p=0.6, seed=3),
             SamplingParams(temperature=1.0, min_p=0.2, repetition_penalty=1.5, seed=4),
             SamplingParams(temperature=1.0, frequency_penalty=1.0, presence_penalty=0.5,
                            logprobs=3, seed=5)]
    seqs = [_seq(p, seed=p.seed or 0, outputs=4, seq_id=i) for i, p in enumerate(mixed)]
    together = sample(logits.clone(), seqs, eos_ids=[0])  # (the sampler works in place)
    alone = [sample(logits[i:i + 1].clone(), [s], eos_ids=[0])[0]
             for i, s in enumerate(seqs)]
    assert together == alone


@pytest.mark.parametrize("filt", [{"top_k": 7}, {"top_p": 0.5}, {"min_p": 0.1},
                                  {"top_k": 10, "top_p": 0.8, "min_p": 0.05}])
def test_filters_keep_exactly_the_tokens_they_define(filt: dict) -> None:
    row = _logits(1, seed=11)[0]
    params = SamplingParams(temperature=1.0, seed=9, **filt)
    allowed = _reference_kept(row, params)
    n = 3000
    seqs = [_seq(params, seed=9, outputs=k, seq_id=k) for k in range(n)]
    drawn = {t for t, _ in sample(row.expand(n, -1).contiguous(), seqs, [])}
    assert drawn == allowed


def _reference_kept(row: torch.Tensor, p: SamplingParams) -> set[int]:
    """The definition: top-k, then min-p relative to the best, then the smallest set of the
    most likely tokens whose mass reaches top_p."""
    order = torch.argsort(row, descending=True).tolist()
    kept = order[:p.top_k] if p.top_k > 0 else order
    probs = torch.softmax(row, dim=-1)
    kept = [t for t in kept if probs[t] >= p.min_p * probs[order[0]]]
    mass = probs[kept].sum()
    out, acc = [], 0.0
    for t in kept:
        if acc >= p.top_p * mass:
            break
        out.append(t)
        acc += probs[t].item()
    return set(out)


def test_bitmask_allows_only_its_tokens_greedy_and_sampled() -> None:
    logits = _logits(2, seed=5)
    allowed = {3, 17, 40, 63}
    mask = torch.zeros(2, (VOCAB + 31) // 32, dtype=torch.int32)
    for t in allowed:
        mask[:, t // 32] |= (1 << (t % 32)) if t % 32 < 31 else -(1 << 31)
    masked = logits.clone()
    apply_bitmask(masked, mask)
    assert {int(t) for t in torch.isfinite(masked[0]).nonzero().flatten()} == allowed

    class Masks:
        def bitmask(self, seqs, device):
            return mask[:len(seqs)].to(device)

        def settle(self):
            return []

    greedy = sample(logits.clone(), [_seq(SamplingParams(temperature=0.0)),
                             _seq(SamplingParams(temperature=0.0), seq_id=1)], [], Masks())
    best = max(allowed, key=lambda t: logits[0, t].item())
    assert greedy[0][0] == best
    n = 400
    seqs = [_seq(SamplingParams(temperature=2.0, seed=1), seed=1, outputs=k, seq_id=k)
            for k in range(n)]

    class Wide:
        def bitmask(self, seqs, device):
            return mask[:1].expand(len(seqs), -1).contiguous()

        def settle(self):
            return []

    drawn = {t for t, _ in sample(logits[:1].expand(n, -1).contiguous(), seqs, [], Wide())}
    assert drawn == allowed


def test_greedy_rows_equal_argmax_and_logprobs_are_the_raw_log_softmax() -> None:
    logits = _logits(3, seed=2)
    seqs = [_seq(SamplingParams(temperature=0.0, logprobs=2), seq_id=i) for i in range(3)]
    out = sample(logits, seqs, [])
    ref = torch.log_softmax(logits, dim=-1)
    for i, (tok, lp) in enumerate(out):
        assert tok == int(torch.argmax(logits[i]))
        assert lp is not None and lp.logprob == pytest.approx(ref[i, tok].item(), abs=1e-5)
        assert [t for t, _ in lp.top] == torch.topk(ref[i], 2).indices.tolist()


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _ops_for(batch: int) -> int:
    rng = random.Random(batch)
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.01,
                            repetition_penalty=1.2, frequency_penalty=0.3, logprobs=2,
                            min_tokens=8)
    seqs = [_seq(params, seed=rng.randrange(1000), index=i % 3, outputs=4, seq_id=i)
            for i in range(batch)]
    logits = _logits(batch)
    with _CountOps() as counter:
        sample(logits, seqs, eos_ids=[0])
    return counter.ops


def test_a_batch_costs_the_same_number_of_tensor_ops_whatever_its_size() -> None:
    assert _ops_for(1) == _ops_for(64) == _ops_for(256)

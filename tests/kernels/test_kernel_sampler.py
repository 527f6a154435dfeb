"""The Triton sampler of plain rows (kernels.triton_sampler) draws what its reference draws.

The reference (kernels.reference.sample_plain) is the torch path's draw -- masks, argmax,
softmax, cumsum and searchsorted -- in float64, on the same logits, masks, temperatures and
uniforms. Logits are rounded to
bf16 so rows hold exact ties (greedy must pick the first, as torch.argmax does); vocabularies
span one block and several, with a partial last block.
"""

from __future__ import annotations

import pytest
import torch

from engine.sampler import draw
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from kernels import ops, reference, triton_sampler


def _case(gen: torch.Generator, rows: int, vocab: int, masked: bool
          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(torch.bfloat16).float()
    bitmask = None
    if masked:
        words = (vocab + 31) // 32 + 1  # wider than needed, as llguidance's can be
        bitmask = torch.randint(-2**31, 2**31, (rows, words), generator=gen,
                                dtype=torch.int64).to(torch.int32)
        bitmask[1] = 0  # allows nothing: drawn unmasked
        bitmask[2] = 0
        bitmask[2, 0] = 1 << 5  # allows one token
    temperature = torch.tensor([0.0 if i % 3 == 0 else 0.5 + 0.25 * i for i in range(rows)])
    uniform = torch.rand(rows, generator=gen).clamp(1e-6, 1 - 1e-6)
    return logits, bitmask, temperature, uniform


@pytest.mark.parametrize("masked", [False, True], ids=["free", "masked"])
@pytest.mark.parametrize(("rows", "vocab"), [(6, 700), (7, 9000), (4, 20001)])
def test_plain_rows_draw_the_torch_paths_tokens(gen, rows, vocab, masked):
    logits, bitmask, temperature, uniform = _case(gen, rows, vocab, masked)
    out = triton_sampler.sample_plain(logits, bitmask, temperature, uniform)
    expected = reference.sample_plain(logits, bitmask, temperature, uniform)[0]
    margin = reference.distance_to_cdf_step(logits, bitmask, temperature, uniform)
    # sums run in another order: a row may differ only within rounding of a CDF step
    differ = (out[0] != expected) & ~((temperature > 0) & (margin < 1e-5))
    assert not differ.any(), (out[0].tolist(), expected.tolist())
    assert out[1].tolist() == [0] * rows
    if masked:
        assert out[0, 2] == 5


def test_greedy_picks_the_first_of_tied_maxima_across_blocks(gen):
    vocab = 3 * triton_sampler.BLOCK + 17
    logits = torch.zeros(2, vocab)
    logits[0, [9000, 4100, vocab - 1]] = 2.0  # ties in two blocks: the lowest index wins
    logits[1, [5, 6]] = 1.0
    out = triton_sampler.sample_plain(logits, None, torch.zeros(2), torch.full((2,), 0.5))
    assert out[0].tolist() == [4100, 5]


def test_one_uniform_per_token_walks_the_whole_distribution(gen):
    """200 rows of the same logits with uniforms spread over (0, 1): each row's token is
    the torch path's, so the kernel's draws follow the softmax wherever u falls."""
    row = (torch.randn(1, 300, generator=gen) * 2).to(torch.bfloat16).float()
    logits = row.expand(200, -1).contiguous()
    uniform = (torch.arange(200, dtype=torch.float32) + 0.5) / 200
    temperature = torch.full((200,), 0.8)
    out = triton_sampler.sample_plain(logits, None, temperature, uniform)
    expected = reference.sample_plain(logits, None, temperature, uniform)[0]
    margin = reference.distance_to_cdf_step(logits, None, temperature, uniform)
    assert not ((out[0] != expected) & (margin >= 1e-5)).any()
    assert len(set(out[0].tolist())) > 20


def test_nan_rows_are_flagged_and_only_they():
    logits = torch.randn(3, 500)
    logits[1, 77] = float("nan")
    out = triton_sampler.sample_plain(logits, None, torch.tensor([0.0, 1.0, 1.0]),
                                      torch.full((3,), 0.3))
    assert out[1].tolist() == [0, 1, 0]


def _seq(params: SamplingParams, seq_id: int, outputs: int = 2) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=f"r{seq_id}", index=0, params=params,
                    seed=100 + seq_id, token_ids=[1, 2, 3] + [4] * outputs,
                    num_prompt_tokens=3, max_tokens=1000)


def test_a_plain_row_is_drawn_the_same_whatever_its_batch(gen):
    """In the engine's sampler (Triton on here) a plain row goes through the kernel whether
    its batch is all plain or holds top-p and min_tokens rows (drawn by the torch path)."""
    vocab = 5000
    logits = torch.randn(4, vocab, generator=gen) * 2
    assert ops.use_triton(logits)
    plain = [SamplingParams(temperature=0.9, seed=1), SamplingParams(temperature=0.0)]
    other = [SamplingParams(temperature=0.7, top_p=0.9, seed=2),
             SamplingParams(temperature=1.0, min_tokens=5, seed=3)]
    alone = draw(logits[:2].clone(), [_seq(p, i) for i, p in enumerate(plain)], [0]).result()
    mixed = draw(logits.clone(), [_seq(p, i) for i, p in enumerate(plain + other)],
                 [0]).result()
    assert [t for t, _ in mixed[:2]] == [t for t, _ in alone]
    assert mixed[3][0] != 0  # min_tokens: eos banned

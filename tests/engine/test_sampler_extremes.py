"""Every value SamplingParams accepts samples sanely, and the values it must not accept
(NaN, inf, what float32 cannot carry) are refused with a 400-style error.

Issue 11: a temperature of 1e-40, tiny or huge penalties, or min_tokens with stop ids
covering the vocabulary made the sampler produce inf/NaN probabilities. Here each extreme
row shares its batch with ordinary rows, which must come out exactly as if alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.sampler import RowSamplingError, sample
from engine.sampling_params import SAMPLING_EPS, SamplingParams
from engine.sequence import Sequence

VOCAB = 64


def _seq(params: SamplingParams, seq_id: int = 0, outputs: int = 3) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=f"r{seq_id}", index=0, params=params,
                    seed=seq_id + 1, token_ids=[1, 2, 3, 4] + [7] * outputs,
                    num_prompt_tokens=4, max_tokens=1000)


def _logits(rows: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(4)) * 3


EXTREME = [
    SamplingParams(temperature=1e-40, seed=1),
    SamplingParams(temperature=SAMPLING_EPS / 10, top_p=0.5, seed=1),
    SamplingParams(temperature=SAMPLING_EPS, seed=1),
    SamplingParams(temperature=3e38, seed=1),
    SamplingParams(temperature=1.0, repetition_penalty=1e-40, seed=1),
    SamplingParams(temperature=1e-4, repetition_penalty=1e-40, top_k=3, seed=1),
    SamplingParams(temperature=1.0, repetition_penalty=3e38, seed=1),
    SamplingParams(temperature=0.0, repetition_penalty=1e-40),
    SamplingParams(temperature=0.7, frequency_penalty=2.0, presence_penalty=-2.0,
                   repetition_penalty=1e-30, min_p=1.0, seed=1),
    SamplingParams(temperature=1.0, min_tokens=5, max_tokens=9,
                   stop_token_ids=list(range(VOCAB)), seed=1),
    SamplingParams(temperature=0.0, min_tokens=5, max_tokens=9,
                   stop_token_ids=list(range(VOCAB))),
    SamplingParams(temperature=1e-30, min_tokens=5, max_tokens=9, top_p=1e-9,
                   stop_token_ids=list(range(1, VOCAB)), seed=1),
]
ORDINARY = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=8, seed=5),
            SamplingParams(temperature=1.1, top_p=0.8, repetition_penalty=1.3, seed=6)]


@pytest.mark.parametrize("extreme", EXTREME, ids=lambda p: repr(
    {k: getattr(p, k) for k in ("temperature", "repetition_penalty", "min_tokens")}))
def test_an_extreme_row_gives_a_real_token_and_leaves_its_batch_untouched(
        extreme: SamplingParams) -> None:
    params = [*ORDINARY, extreme]
    seqs = [_seq(p, seq_id=i) for i, p in enumerate(params)]
    logits = _logits(len(seqs))
    together = sample(logits.clone(), seqs, eos_ids=[0])
    alone = [sample(logits[i:i + 1].clone(), [s], eos_ids=[0])[0] for i, s in enumerate(seqs)]
    assert together == alone
    token = together[-1][0]
    assert 0 <= token < VOCAB


def test_a_temperature_below_the_epsilon_is_exactly_greedy() -> None:
    logits = _logits(4)
    for t in (1e-40, 1e-20, SAMPLING_EPS / 2):
        seqs = [_seq(SamplingParams(temperature=t, seed=9), seq_id=i) for i in range(4)]
        tokens = [tok for tok, _ in sample(logits.clone(), seqs, [])]
        assert tokens == torch.argmax(logits, dim=-1).tolist()
    assert SamplingParams(temperature=1e-40).greedy
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy


def test_a_tiny_repetition_penalty_makes_a_seen_token_win_without_nan() -> None:
    logits = _logits(1)
    logits[0, 2] = 1.0  # seen in the prompt, positive: divided by 1e-40 it is the best
    for temperature in (0.0, 1e-4, 1.0):
        params = SamplingParams(temperature=temperature, repetition_penalty=1e-40, top_k=1,
                                seed=3)
        (token, _), = sample(logits.clone(), [_seq(params)], [])
        assert token in {1, 2, 3, 4, 7}


def test_min_tokens_with_every_token_a_stop_id_samples_among_them() -> None:
    """Nothing is left once every token is banned: the row falls back to its unbanned
    logits (the engine keeps going until min_tokens anyway)."""
    logits = _logits(2)
    every = list(range(VOCAB))
    seqs = [_seq(SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=every)),
            _seq(SamplingParams(temperature=0.8, min_tokens=4, stop_token_ids=every,
                                seed=2), seq_id=1)]
    out = sample(logits.clone(), seqs, eos_ids=[0])
    assert out[0][0] == int(torch.argmax(logits[0]))
    assert 0 <= out[1][0] < VOCAB


def test_min_tokens_with_a_grammar_of_stop_tokens_only_keeps_the_grammar() -> None:
    logits = _logits(1)
    allowed = [0, 5]  # the grammar allows eos and a stop id only

    class Masks:
        def bitmask(self, seqs, device):  # type: ignore[no-untyped-def]
            mask = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
            for t in allowed:
                mask[0, t // 32] |= 1 << t
            return mask

        def settle(self) -> list[int]:
            return []

    seq = _seq(SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[5]))
    (token, _), = sample(logits.clone(), [seq], eos_ids=[0], masks=Masks())
    assert token == max(allowed, key=lambda t: logits[0, t].item())


def test_a_grammar_that_allows_no_token_of_the_vocabulary_leaves_its_row_unmasked() -> None:
    """A row whose mask allows nothing below the vocabulary size (here: only token 55 of a
    50-token vocabulary, a tokenizer entry the model has no logit for) is sampled as if
    unconstrained -- the grammar then refuses the token and ends the sequence -- while the
    next row of the same batch stays masked."""
    vocab = 50
    logits = _logits(2)[:, :vocab].contiguous()

    class Masks:
        def bitmask(self, seqs, device):  # type: ignore[no-untyped-def]
            mask = torch.zeros(2, 2, dtype=torch.int32)
            mask[0, 1] = 1 << (55 - 32)
            mask[1, 0] = 1 << 7
            return mask

        def settle(self) -> list[int]:
            return []

    seqs = [_seq(SamplingParams(temperature=0.0), seq_id=i) for i in range(2)]
    out = sample(logits.clone(), seqs, eos_ids=[0], masks=Masks())
    assert [t for t, _ in out] == [int(torch.argmax(logits[0])), 7]


def test_a_row_of_nan_logits_is_named_and_only_that_row() -> None:
    logits = _logits(3)
    logits[1, 7] = math.nan
    seqs = [_seq(SamplingParams(temperature=0.0), seq_id=i) for i in range(3)]
    with pytest.raises(RowSamplingError) as caught:
        sample(logits, seqs, [])
    assert caught.value.rows == [1]


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", 1e39),
    ("top_p", math.nan), ("min_p", math.nan), ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf), ("repetition_penalty", 1e-50),
    ("repetition_penalty", 1e39), ("frequency_penalty", math.nan),
    ("presence_penalty", -math.inf)])
def test_values_float32_cannot_carry_finitely_are_refused(field: str, value: float) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field

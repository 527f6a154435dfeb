"""The grammar-mask kernels (Triton, and the CPU byte-table path) equal the reference."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_elementwise, cpu_native, reference, triton_bitmask


def _random_case(gen: torch.Generator, batch: int, vocab: int, words: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(batch, vocab, generator=gen)
    bitmask = torch.randint(-2**31, 2**31, (batch, words), generator=gen, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[0] = -1  # a row with everything allowed
    if batch > 2:
        bitmask[2] = 0  # and one with nothing
    return logits, bitmask


@pytest.mark.parametrize(("batch", "vocab"), [(2, 32), (4, 1000), (3, 2051)])
@pytest.mark.parametrize("kernel", [triton_bitmask.apply_token_bitmask,
                                    cpu_elementwise.apply_token_bitmask,
                                    cpu_elementwise.apply_token_bitmask_bytes],
                         ids=["triton", "cpu", "cpu-bytes"])
def test_bitmask_kernels_equal_the_reference(kernel, batch, vocab, gen):
    logits, bitmask = _random_case(gen, batch, vocab, (vocab + 31) // 32)
    expected = logits.clone()
    reference.apply_token_bitmask(expected, bitmask)
    kernel(logits, bitmask)
    assert torch.equal(logits, expected)
    banned = torch.isneginf(expected)
    assert 0 < banned.sum() < banned.numel()  # the case bans some tokens, not all


def test_the_reference_reads_bit_t_of_word_t_over_32():
    logits = torch.zeros(1, 70)
    bitmask = torch.tensor([[0b101, -(1 << 31), 0b10]], dtype=torch.int32)  # wider than needed
    reference.apply_token_bitmask(logits, bitmask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 2, 63, 65]


def test_the_triton_kernel_writes_only_banned_tokens_of_a_strided_batch(gen):
    # rows of a wider buffer (stride > vocab), a bitmask with spare words: the kernel must
    # follow both strides and leave the padding columns alone
    buf = torch.randn(3, 300, generator=gen)
    logits = buf[:, :257]
    _, bitmask = _random_case(gen, 3, 257, 12)
    expected = buf.clone()
    reference.apply_token_bitmask(expected[:, :257], bitmask)
    triton_bitmask.apply_token_bitmask(logits, bitmask)
    assert torch.equal(buf, expected)


@pytest.mark.skipif(cpu_native.library() is None, reason="no C compiler to build the kernel")
def test_the_c_kernel_serves_float32_rows_and_declines_other_dtypes(gen):
    logits, bitmask = _random_case(gen, 3, 1000, 32)
    expected = logits.clone()
    reference.apply_token_bitmask(expected, bitmask)
    assert cpu_native.apply_token_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)
    assert not cpu_native.apply_token_bitmask(logits.to(torch.bfloat16), bitmask)

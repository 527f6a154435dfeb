"""cpu_gemv.c (bf16 projections of one or two rows) equals the float32 product rounded once
to bf16, on random inputs: output counts that are not a multiple of 16, with and without a
bias, rows that are strided views; and ops.linear takes it only for what it fits."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_linear, cpu_native, ops

pytestmark = pytest.mark.skipif(cpu_native.gemv_library() is None,
                                reason="no AVX512-BF16 on this CPU (or no C compiler)")


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = x.float() @ w.float().T
    return (out + b.float() if b is not None else out).to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize(("n", "k"), [(512, 256), (1000, 96), (13, 32), (2048, 1024)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_gemv_matches_the_float32_product_rounded_once(rows, n, k, with_bias, gen):
    # x as rows of a wider tensor (the model passes views of fused projections)
    x = torch.randn(rows, k + 64, generator=gen).to(torch.bfloat16)[:, 64:]
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if with_bias else None
    assert cpu_native.gemv_fits(x, w, b)
    out = cpu_native.gemv(x, w, b)
    ref = _reference(x, w, b)
    # float32 sums in another order than the reference's: at most one bf16 step apart
    step = ref.float().abs().clamp(min=1e-3) * 2 ** -7
    assert ((out.float() - ref.float()).abs() <= step).all()


def test_linear_takes_the_gemv_only_for_one_or_two_rows_of_a_kept_weight(gen):
    w = (torch.randn(96, 64, generator=gen) / 8).to(torch.bfloat16)
    packed = cpu_linear.pack(w)
    assert packed is not None and ops.keeps_row_major(w)
    for rows in (1, 2, 3, 17):
        x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
        out = ops.linear(x, w, None, packed)
        ref = _reference(x, w, None)
        assert out.shape == (rows, 96)
        assert ((out.float() - ref.float()).abs()
                <= ref.float().abs().clamp(min=1e-3) * 2 ** -7).all()
    # a weight dropped after packing (too large to keep) is never read
    x = torch.randn(1, 64, generator=gen).to(torch.bfloat16)
    assert torch.equal(ops.linear(x, w.new_empty(0), None, packed),
                       cpu_linear.linear(x, packed, None))
    # K not a multiple of 32: not taken
    assert not cpu_native.gemv_fits(torch.zeros(1, 48, dtype=torch.bfloat16),
                                    torch.zeros(8, 48, dtype=torch.bfloat16), None)

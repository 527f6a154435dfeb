"""Triton grammar-mask application (twin of reference.apply_token_bitmask): one launch.

A structured-output step bans, in every constrained row, each token whose bit is clear in
the grammar's packed bitmask ([batch, ceil(vocab / 32)] int32, llguidance's layout: token t
is bit t % 32 of word t // 32). The CPU path unpacks the words through a byte table into a
boolean [batch, vocab] mask and then fills; on a GPU that is four launches and two
intermediate tensors the size of the logits for what is one pass: here each lane reads
its word, tests its bit and writes -inf only where the token is banned (logits where
tokens are allowed are not even read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _apply_bitmask_kernel(logits_ptr, mask_ptr, stride_l, stride_m, vocab,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < vocab
    words = tl.load(mask_ptr + row * stride_m + cols // 32, mask=inside, other=-1)
    banned = inside & (((words >> (cols % 32)) & 1) == 0)
    neg_inf = tl.full([BLOCK], float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * stride_l + cols, neg_inf, mask=banned)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: -inf in ``logits`` [batch, vocab] wherever the row's bit is clear.
    ``bitmask``: [batch, >= ceil(vocab / 32)] int32 on the logits' device."""
    batch, vocab = logits.shape
    assert bitmask.dtype == torch.int32 and bitmask.shape[0] == batch \
        and bitmask.shape[1] * 32 >= vocab, (bitmask.dtype, bitmask.shape, logits.shape)
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1
    if batch == 0:
        return
    block = 1024
    _apply_bitmask_kernel[(batch, triton.cdiv(vocab, block))](
        logits, bitmask, logits.stride(0), bitmask.stride(0), vocab, BLOCK=block,
        num_warps=4)

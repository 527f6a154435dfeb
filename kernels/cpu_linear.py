"""Projections for CPU serving in bf16: weights packed once into oneDNN's blocked layout.

``F.linear`` on bf16 CPU tensors hands oneDNN a plain row-major weight, which it reorders
into the AMX/AVX512-BF16 tile layout on every call: for a decode step's few rows that
reorder costs more than the product (measured on this project's CI CPU: a 16 x 256 by
256 x 1024 product took 75 us from a plain weight and 40 us from a packed one;
bench/RESULTS.md, issue 15). Packing once at load time removes it. The result is bit for
bit F.linear's (the same oneDNN kernel, the same accumulation).

Packing uses ``torch.ops.mkldnn`` (the ops torch.compile's CPU backend emits for frozen
linear layers); where they are missing (a torch built without oneDNN) nothing is packed
and F.linear serves.
"""

from __future__ import annotations

import torch

# oneDNN picks the packed layout for a typical number of rows; any count works with it.
_PACK_FOR_ROWS = 16


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and \
        hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The packed form of a [N, K] bf16 CPU weight; None where packing does not apply."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2 \
            or not packing_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(),
                                                   _PACK_FOR_ROWS)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` from ``pack(weight)``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


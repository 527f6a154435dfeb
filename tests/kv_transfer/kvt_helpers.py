"""Helpers of the connector suites: layouts and random caches (import as ``kvt_helpers``;
tests/kv_transfer is on sys.path as pytest's rootless test folders are)."""

from __future__ import annotations

import dataclasses

import torch

from engine.kv_layout import KVLayout


def make_layout(dtype: str = "float32", num_layers: int = 4, **changes: object) -> KVLayout:
    base = KVLayout(model_id="kvtest", dtype=dtype, block_size=4, num_layers=num_layers,
                    num_kv_heads=2, head_dim=8)
    return dataclasses.replace(base, **changes)


def random_caches(layout: KVLayout, num_blocks: int, seed: int) -> list[torch.Tensor]:
    """Per-layer caches of random values that are never zero (so zeros mean 'not written')."""
    gen = torch.Generator().manual_seed(seed)
    shape = layout.layer_shape(num_blocks)
    caches = []
    for _ in range(layout.num_layers):
        magnitude = torch.rand(shape, generator=gen) + 0.25
        sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        caches.append((magnitude * sign).to(layout.torch_dtype))
    return caches


def snapshot(caches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [kv.clone() for kv in caches]


def write_layers(handle, block_ids, layers=None, num_layers: int = 0) -> None:
    """Tell ``handle`` that ``layers`` (default: all ``num_layers``) of ``block_ids`` are
    written, as the forward does."""
    for layer in range(num_layers) if layers is None else layers:
        handle.layer_written(layer, block_ids, None)


def backend_params(device: str) -> list:
    """Every registered backend as a pytest param, skipped (with its reason) where it
    cannot run for KV on ``device`` here."""
    import pytest

    from kv_transfer import all_backends

    params = []
    for name, backend in all_backends().items():
        why = backend.unavailable(device)
        params.append(pytest.param(name, marks=pytest.mark.skip(reason=why)) if why else name)
    return params

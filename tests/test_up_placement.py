"""``pdserve up --device cuda`` puts each pod on a GPU: listed or spread in order, bf16, and
an even share of a GPU's memory for the pods that share it (no GPU needed to check)."""

from __future__ import annotations

import pytest

from engine.errors import PdserveError
from pdserve.up import gpu_placement


def devices(flags: list[list[str]]) -> list[tuple[str, str]]:
    return [(f[f.index("--device") + 1], f[f.index("--gpu-memory-utilization") + 1])
            for f in flags]


def test_pods_spread_over_the_gpus_prefill_first() -> None:
    pre, dec = gpu_placement(1, 1, 2, None, None, 0.8)
    assert devices(pre) == [("cuda:0", "0.8000")] and devices(dec) == [("cuda:1", "0.8000")]
    assert all("bfloat16" in f for f in pre + dec)


def test_pods_sharing_one_gpu_split_its_memory() -> None:
    pre, dec = gpu_placement(1, 1, 1, None, None, 0.8)
    assert devices(pre) == [("cuda:0", "0.4000")] and devices(dec) == [("cuda:0", "0.4000")]


def test_listed_gpus_are_used_as_given() -> None:
    pre, dec = gpu_placement(2, 1, 4, "3,3", "1", 0.9)
    assert devices(pre) == [("cuda:3", "0.4500"), ("cuda:3", "0.4500")]
    assert devices(dec) == [("cuda:1", "0.9000")]


@pytest.mark.parametrize("gpus,pre,dec", [(0, None, None), (2, "0,5", None), (2, "0", None)])
def test_bad_placements_are_clear_errors(gpus: int, pre: str | None, dec: str | None) -> None:
    with pytest.raises(PdserveError):
        gpu_placement(2, 1, gpus, pre, dec, 0.9)

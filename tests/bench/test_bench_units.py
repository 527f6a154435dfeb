"""pdserve bench's pieces that need no server: lengths, prefixes, arrivals, statistics."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from pdserve.bench.arrivals import parse_rates, schedule
from pdserve.bench.client import RequestResult
from pdserve.bench.stats import SLO, percentile, summarize
from pdserve.bench.workload import Vocab, build_workload, parse_length


def test_length_forms() -> None:
    assert parse_length("32").describe() == "32"
    uniform = parse_length("8-16")
    rng = random.Random(0)
    assert {uniform.sample(rng) for _ in range(500)} == set(range(8, 17))
    logn = parse_length("lognormal:100,0.5,10-1000")
    xs = sorted(logn.sample(rng) for _ in range(4001))
    assert 85 <= xs[2000] <= 115  # the median is MEDIAN
    assert xs[0] >= 10 and xs[-1] <= 1000
    assert parse_length("sharegpt", "output").kind == "lognormal"
    for bad in ("0", "9-3", "lognormal:1", "lognormal:-4,1", "x"):
        with pytest.raises(ValueError):
            parse_length(bad)


def test_workload_prefix_turns_and_special_tokens() -> None:
    vocab = Vocab(50, frozenset(range(10)))
    items = build_workload(1, 20, vocab, parse_length("40"), parse_length("5"),
                           shared_prefix_ratio=0.5)
    assert all(len(i.prompt) == 40 and i.max_tokens == 5 for i in items)
    assert all(t >= 10 for i in items for t in i.prompt)  # never a special token
    assert len({tuple(i.prompt[:20]) for i in items}) == 1  # one shared prefix
    assert len({tuple(i.prompt[20:]) for i in items}) == 20
    sessions = build_workload(1, 12, vocab, parse_length("40"), parse_length("5"), turns=3,
                              turn_len=parse_length("7"))
    assert [i.session for i in sessions] == [s for s in range(4) for _ in range(3)]
    assert [len(i.prompt) for i in sessions[:3]] == [40, 7, 7]


def test_arrivals() -> None:
    items = build_workload(0, 2000, Vocab(100), parse_length("4"), parse_length("4"))
    schedule(items, 10.0, "poisson", 0)
    gaps = [b.send_at - a.send_at for a, b in itertools.pairwise(items)]
    assert 0.09 < sum(gaps) / len(gaps) < 0.11  # mean gap 1/rate
    assert min(gaps) < 0.01  # exponential, not even
    schedule(items, 4.0, "fixed", 0)
    assert items[3].send_at == pytest.approx(0.75)
    schedule(items, math.inf, "poisson", 0)
    assert {i.send_at for i in items} == {0.0}
    assert parse_rates("1,2,inf") == [1.0, 2.0, math.inf]
    with pytest.raises(ValueError):
        parse_rates("1,0")


def test_summary_and_goodput() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    fast = RequestResult(10, ok=True, ttft=0.1, e2e=0.1 + 9 * 0.02, itls=[0.02] * 9,
                         output_tokens=10)
    slow_first = RequestResult(10, ok=True, ttft=2.0, e2e=2.18, itls=[0.02] * 9,
                               output_tokens=10)
    slow_decode = RequestResult(10, ok=True, ttft=0.1, e2e=0.1 + 9 * 0.1, itls=[0.1] * 9,
                                output_tokens=10)
    failed = RequestResult(10, ok=False, error="x")
    s = summarize([fast, slow_first, slow_decode, failed], 2.0, SLO(1000, 50))
    assert (s["completed"], s["failed"], s["good_requests"]) == (3, 1, 1)
    assert s["goodput"] == 0.5 and s["goodput_share"] == 0.25
    assert s["output_tokens"] == 30 and s["input_tokens"] == 30
    assert s["p50_tpot_ms"] == pytest.approx(20)
    assert s["p50_itl_ms"] == pytest.approx(20)
    assert summarize([fast, failed], 1.0)["good_requests"] == 1  # no SLO: every success


def test_the_disaggregation_experiments_goal_check() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_disagg.py"
    spec = importlib.util.spec_from_file_location("gpu_disagg", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def run(rate: float, share: float, goodput: float, p50: float = 7.0, p99: float = 9.0):
        return {"rate": rate, "summary": {"goodput_share": share, "goodput": goodput,
                                          "p50_itl_ms": p50, "p99_itl_ms": p99}}

    colo = [run(1.5, 0.98, 1.3), run(3, 1.0, 2.38), run(5, 0.42, 1.21)]
    line = mod.goal_check({"colocated": colo,
                           "disaggregated": [run(1.5, 0.85, 1.16), run(3, 0.55, 1.24, 7.53, 10.0)]})
    assert "at 3 req/s" in line and "1.33 (goal <= 1.3: missed)" in line
    assert "0.52x colocated's (goal >= 2: missed)" in line
    line = mod.goal_check({"colocated": colo, "disaggregated": [run(3, 1.0, 4.9, 7.0, 8.4)]})
    assert "1.20 (goal <= 1.3: met)" in line and "2.06x colocated's (goal >= 2: met)" in line
    assert "not checked" in mod.goal_check({"colocated": [run(2, 0.5, 1.0)],
                                            "disaggregated": [run(2, 1.0, 2.0)]})

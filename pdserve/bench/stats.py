"""Summaries of one run: latency percentiles, throughput and goodput.

Goodput (DistServe's measure) is the rate of requests that met every SLO given: TTFT <=
``slo_ttft_ms`` and TPOT <= ``slo_tpot_ms``; a failed request never counts. With no SLO it
equals the request rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.bench.client import RequestResult

PERCENTILES = (50, 90, 99)
SERIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and r.ttft * 1e3 > self.ttft_ms:
            return False
        return self.tpot_ms is None or tpot_ms(r) <= self.tpot_ms


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def tpot_ms(r: RequestResult) -> float:
    return (r.e2e - r.ttft) * 1e3 / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def series(results: list[RequestResult]) -> dict[str, list[float]]:
    """Per-request (per-gap for ITL) latencies in ms of the successful requests."""
    ok = [r for r in results if r.ok]
    return {
        "ttft_ms": [r.ttft * 1e3 for r in ok],
        "tpot_ms": [tpot_ms(r) for r in ok if r.output_tokens > 1],
        "itl_ms": [x * 1e3 for r in ok for x in r.itls],
        "e2e_ms": [r.e2e * 1e3 for r in ok],
    }


def summarize(results: list[RequestResult], duration: float, slo: SLO = SLO()
              ) -> dict[str, float]:
    """Counts, throughput, goodput and mean/p50/p90/p99 of every latency series."""
    ok = [r for r in results if r.ok]
    duration = max(duration, 1e-9)
    prompt = sum(r.prompt_len for r in ok)
    out = sum(r.output_tokens for r in ok)
    good = sum(1 for r in results if slo.met(r))
    s: dict[str, float] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "input_tokens": prompt, "output_tokens": out,
        "request_throughput": len(ok) / duration,
        "output_throughput": out / duration,
        "total_token_throughput": (prompt + out) / duration,
        "good_requests": good,
        "goodput": good / duration,  # requests/s within SLO
        "goodput_share": good / len(results) if results else float("nan"),
        "first_chunk_tokens_mean": sum(r.first_chunk_tokens for r in ok) / max(len(ok), 1),
    }
    for name, xs in series(results).items():
        s[f"mean_{name}"] = sum(xs) / len(xs) if xs else float("nan")
        for q in PERCENTILES:
            s[f"p{q}_{name}"] = percentile(xs, q)
    return s


ROWS = [
    ("completed / failed", None),
    ("duration (s)", "duration_s"),
    ("request throughput (req/s)", "request_throughput"),
    ("output throughput (tok/s)", "output_throughput"),
    ("total token throughput (tok/s)", "total_token_throughput"),
    ("goodput (req/s)", "goodput"), ("requests within SLO (share)", "goodput_share"),
    *[(f"{stat} {label} (ms)", f"{key}_{name}")
      for name, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                          ("e2e_ms", "E2E"))
      for stat, key in (("mean", "mean"), ("p50", "p50"), ("p90", "p90"), ("p99", "p99"))],
]


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """A markdown table, one column per run."""
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for label, key in ROWS:
        if key is None:
            cells = [f"{int(s['completed'])} / {int(s['failed'])}" for s in columns.values()]
        else:
            cells = [f"{s[key]:.2f}" if key in s else "-" for s in columns.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""When requests are sent: Poisson or evenly spaced arrivals at a rate, or all at once.

A concurrency limit (``--concurrency``) is applied by the client on top: a request whose
time has come waits for a free slot. Rate ``inf`` with a concurrency limit is vLLM's
"fixed concurrency" load. In a multi-turn workload only a session's first turn gets an
arrival time; its later turns follow their predecessor's end.
"""

from __future__ import annotations

import math
import random

from pdserve.bench.workload import WorkItem

ARRIVALS = ("poisson", "fixed")


def parse_rates(text: str) -> list[float]:
    """``1,2,4`` or ``inf`` -> rates in requests/s; ValueError if any is not positive."""
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"bad rates {text!r} (want positive numbers or inf, comma-separated)")
    return rates


def schedule(items: list[WorkItem], rate: float, arrival: str, seed: int) -> list[WorkItem]:
    """Set each item's ``send_at`` (seconds after start); returns ``items``."""
    if arrival not in ARRIVALS:
        raise ValueError(f"unknown arrival process {arrival!r}; choose from {ARRIVALS}")
    rng = random.Random(seed + 104729)  # its own stream: the workload does not move with it
    t = 0.0
    seen: set[int] = set()
    for item in items:
        if item.session is not None:
            if item.session in seen:
                item.send_at = t  # ignored: a later turn waits for the previous one
                continue
            seen.add(item.session)
        item.send_at = t
        if not math.isinf(rate):
            t += rng.expovariate(rate) if arrival == "poisson" else 1.0 / rate
    return items

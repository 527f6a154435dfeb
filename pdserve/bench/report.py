"""Results on disk: the JSON file of a bench run, and PNG plots of one or more runs.

JSON (``--json FILE``)::

    {"format": "pdserve-bench/1", "label": ..., "url": ..., "model": ..., "settings": {...},
     "runs": [{"rate": 4.0 | "inf", "summary": {...}, "requests": [{...}, ...]}, ...]}

one entry of ``runs`` per rate of the sweep. Plots (``--plot DIR``; ``pdserve bench compare
A.json B.json --plot DIR`` draws several files together, one line per file and rate):
``latency_cdf.png`` (CDFs of TTFT, TPOT, ITL, E2E) and ``vs_rate.png`` (TTFT p99, ITL p99
and goodput against the request rate). matplotlib is the ``bench`` extra.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pdserve.bench.client import RequestResult
from pdserve.bench.stats import series

FORMAT = "pdserve-bench/1"


def rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate  # JSON has no inf


def run_record(rate: float, summary: dict[str, float], results: list[RequestResult]
               ) -> dict[str, Any]:
    requests = []
    for r in results:
        d = asdict(r)
        d.pop("output_ids")  # large, and only the client's multi-turn history needs them
        requests.append(d)
    return {"rate": rate_json(rate), "summary": summary, "requests": requests}


def write_json(path: Path, label: str, url: str, model: str, settings: dict[str, Any],
               runs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "label": label, "url": url, "model": model,
           "settings": settings, "runs": runs}
    path.write_text(json.dumps(doc, indent=1, default=str))


def read_json(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pdserve bench result (format {doc.get('format')!r})")
    return doc


def _results(run: dict[str, Any]) -> list[RequestResult]:
    fields = set(RequestResult.__slots__)
    return [RequestResult(**{k: v for k, v in r.items() if k in fields})
            for r in run["requests"]]


def _x(run: dict[str, Any]) -> float:
    """The x of a run against rate: its offered rate, or the achieved one when unpaced."""
    rate = run["rate"]
    return float(run["summary"]["request_throughput"]) if rate == "inf" else float(rate)


def plot(docs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write latency_cdf.png and vs_rate.png for ``docs``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    titles = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "itl_ms": "ITL", "e2e_ms": "E2E latency"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title) in zip(axes.flat, titles.items(), strict=True):
        for doc in docs:
            for run in doc["runs"]:
                xs = sorted(series(_results(run))[key])
                if not xs:
                    continue
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=f"{doc['label']} @ {run['rate']} req/s")
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itl_ms" else "fraction of gaps")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    cdf = out_dir / "latency_cdf.png"
    fig.savefig(cdf, dpi=100)
    plt.close(fig)

    panels = [("p99_ttft_ms", "TTFT p99 (ms)"), ("p99_itl_ms", "ITL p99 (ms)"),
              ("goodput", "goodput (req/s within SLO)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for doc in docs:
            runs = sorted(doc["runs"], key=_x)
            ax.plot([_x(r) for r in runs], [r["summary"][key] for r in runs], marker="o",
                    label=doc["label"])
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    vs_rate = out_dir / "vs_rate.png"
    fig.savefig(vs_rate, dpi=100)
    plt.close(fig)
    return [cdf, vs_rate]

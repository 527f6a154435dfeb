"""``pdserve bench``: measure a running OpenAI-compatible server (shaped like ``vllm bench serve``).

    pdserve bench --url http://127.0.0.1:8000 --num-requests 64 --input-len 64-512 \\
        --output-len 64 --rates 1,2,4 --concurrency 16 --slo-ttft-ms 1000 --slo-tpot-ms 50 \\
        --json out/run.json --plot out/
    pdserve bench compare a.json b.json --plot out/

Every rate of a sweep sends the same seeded workload (only the arrival times change). The
tokenizer whose ordinary tokens make the prompts is ``--tokenizer`` or else the directory
the server names as its model's root (a server on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import math
from pathlib import Path
from typing import Any

from engine.errors import PdserveError
from pdserve.bench.arrivals import ARRIVALS, parse_rates, schedule
from pdserve.bench.client import RequestResult, Target, run_workload, served_model
from pdserve.bench.report import plot, read_json, run_record, write_json
from pdserve.bench.stats import SLO, format_table, summarize
from pdserve.bench.workload import LengthDist, build_workload, parse_length, vocab_of


class BenchError(PdserveError):
    pass


def _length(kind: str):
    def parse(text: str) -> LengthDist:
        try:
            return parse_length(text, kind)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _rates(text: str) -> list[float]:
    try:
        return parse_rates(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("compare", nargs="*", metavar="compare FILE.json",
                   help="`compare A.json B.json ...`: plot earlier runs together (--plot)")
    p.add_argument("--url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to request (default: the "
                   "server's first)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the "
                   "model's root directory, as the server reports it)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=_length("input"), default=parse_length("64-512"),
                   help="N, LO-HI, lognormal:MEDIAN,SIGMA[,LO-HI] or sharegpt (default 64-512)")
    p.add_argument("--output-len", type=_length("output"), default=parse_length("64"),
                   help="like --input-len (default 64)")
    p.add_argument("--shared-prefix-ratio", type=float, default=0.0,
                   help="share of each prompt taken from one common prefix (0-1)")
    p.add_argument("--turns", type=int, default=1, help="turns per session (> 1: multi-turn)")
    p.add_argument("--turn-len", type=_length("input"), default=parse_length("64"),
                   help="new tokens per later turn (like --input-len)")
    p.add_argument("--rate", "--request-rate", dest="rates", type=_rates, default=[math.inf],
                   help="requests/s (inf: all at once, paced only by --concurrency)")
    p.add_argument("--rates", dest="rates", type=_rates,
                   help="a sweep: comma-separated rates, each a run of the same workload")
    p.add_argument("--arrival", choices=ARRIVALS, default="poisson",
                   help="poisson (exponential gaps) or fixed (even gaps) at the rate")
    p.add_argument("--concurrency", "--max-concurrency", dest="concurrency", type=int,
                   default=16, help="most requests in flight")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT target")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT target")
    p.add_argument("--warmup", type=int, default=0,
                   help="unmeasured requests sent first (another seed, all at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="name of this run in tables and plots")
    p.add_argument("--json", type=Path, default=None, help="write results here")
    p.add_argument("--plot", type=Path, default=None, help="write PNG plots into this folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _compare(args: argparse.Namespace) -> int:
    files = [Path(f) for f in args.compare[1:]]
    if args.compare[0] != "compare" or not files:
        raise BenchError("usage: pdserve bench compare A.json [B.json ...] --plot DIR")
    try:
        docs = [read_json(f) for f in files]
    except (OSError, ValueError) as exc:
        raise BenchError(str(exc)) from None
    labels = [d["label"] for d in docs]
    for doc, path in zip(docs, files, strict=True):
        if labels.count(doc["label"]) > 1:  # two runs of one system: tell them apart
            doc["label"] = f"{doc['label']} ({path})"
    for doc in docs:
        print(f"## {doc['label']}")
        print(format_table({f"{r['rate']} req/s": r["summary"] for r in doc["runs"]}))
    if args.plot:
        for path in plot(docs, args.plot):
            print(f"wrote {path}")
    return 0


def _check(args: argparse.Namespace) -> None:
    if not args.url:
        raise BenchError("--url is required (or: pdserve bench compare A.json B.json)")
    if min(args.num_requests, args.concurrency, args.turns) < 1:
        raise BenchError("--num-requests, --concurrency and --turns must be positive")
    if not 0 <= args.shared_prefix_ratio <= 1:
        raise BenchError("--shared-prefix-ratio must lie in 0..1")


def run(args: argparse.Namespace) -> int:
    if args.compare:
        return _compare(args)
    _check(args)
    url = args.url.rstrip("/").removesuffix("/v1")
    try:
        model, root = asyncio.run(served_model(url, args.api_key))
    except Exception as exc:
        raise BenchError(f"cannot list models at {url}/v1/models: {exc}") from None
    model = args.model or model
    tokenizer = args.tokenizer or root
    if not (Path(tokenizer) / "tokenizer_config.json").is_file() and not (
            Path(tokenizer) / "tokenizer.json").is_file():
        raise BenchError(f"no tokenizer in {tokenizer!r}: pass --tokenizer DIR")
    vocab = vocab_of(tokenizer)
    items = build_workload(args.seed, args.num_requests, vocab, args.input_len,
                           args.output_len, args.shared_prefix_ratio, args.turns,
                           args.turn_len)
    target = Target(url, model, args.api_key)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    label = args.label or url
    print(f"pdserve bench: {url} model {model}; {len(items)} requests, input "
          f"{args.input_len.describe()}, output {args.output_len.describe()}, shared prefix "
          f"{args.shared_prefix_ratio}, turns {args.turns}; {args.arrival} arrivals at "
          f"{args.rates} req/s, concurrency {args.concurrency}, seed {args.seed}", flush=True)
    if args.warmup:
        warm = build_workload(args.seed + 1, args.warmup, vocab, args.input_len,
                              LengthDist("fixed", 8, 8))
        asyncio.run(run_workload(target, warm, args.concurrency))
    runs: list[dict[str, Any]] = []
    columns: dict[str, dict[str, float]] = {}
    failed = 0
    for rate in args.rates:
        schedule(items, rate, args.arrival, args.seed)
        progress = "" if args.no_progress else f"rate {rate}"
        results, duration = asyncio.run(run_workload(target, items, args.concurrency,
                                                     progress))
        summary = summarize(results, duration, slo)
        runs.append(run_record(rate, summary, results))
        columns[f"{rate} req/s"] = summary
        failed += _report_failures(results)
    print(format_table(columns), flush=True)
    settings = {k: (v.describe() if isinstance(v, LengthDist) else v)
                for k, v in vars(args).items() if k not in ("compare", "api_key")}
    settings["rates"] = [("inf" if math.isinf(r) else r) for r in args.rates]
    if args.json:
        write_json(args.json, label, url, model, settings, runs)
        print(f"wrote {args.json}")
    if args.plot:
        doc = {"label": label, "runs": runs}
        for path in plot([doc], args.plot):
            print(f"wrote {path}")
    return 1 if failed else 0


def _report_failures(results: list[RequestResult]) -> int:
    bad = [r.error for r in results if not r.ok]
    for err in bad[:5]:
        print(f"    failed: {err}", flush=True)
    if len(bad) > 5:
        print(f"    ... and {len(bad) - 5} more failures", flush=True)
    return len(bad)

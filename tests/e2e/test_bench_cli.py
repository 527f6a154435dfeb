"""`pdserve bench` against a running `pdserve up`: JSON and PNGs, checked against the server.

The bench's figures (requests, prompt and output tokens) must equal what the router's own
/metrics counted over the same interval; the plots must be real PNGs of some size.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
from e2e_helpers import REPO_ROOT, Stack
from PIL import Image

# the router's counters (vLLM's names)
REQUESTS = "vllm:request_success_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
TTFT_COUNT = "vllm:time_to_first_token_seconds_count"


def router_counters(stack: Stack) -> dict[str, float]:
    text = httpx.get(stack.url + "/metrics", timeout=10).text
    out = dict.fromkeys((REQUESTS, PROMPT_TOKENS, GENERATION_TOKENS, TTFT_COUNT), 0.0)
    for line in text.splitlines():
        m = re.match(r"^([a-z_:]+)(\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) in out:
            out[m.group(1)] += float(m.group(3))
    return out


def bench(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def check_png(path: Path) -> None:
    assert path.stat().st_size > 10_000, path
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        width, height = img.size
        assert width >= 600 and height >= 300
        assert len(img.convert("L").getcolors(1 << 16) or []) > 16  # drawn, not blank


def test_bench_json_and_plots_match_server_metrics(stack: Stack, tmp_path: Path) -> None:
    before = router_counters(stack)
    out = tmp_path / "run.json"
    proc = bench("--url", stack.url, "--num-requests", "10", "--input-len", "8-48",
                  "--output-len", "4-10", "--rates", "20,inf", "--concurrency", "4",
                  "--shared-prefix-ratio", "0.25", "--slo-ttft-ms", "60000",
                  "--slo-tpot-ms", "60000", "--label", "1p1d", "--json", str(out),
                  "--plot", str(tmp_path / "plots"), "--no-progress")
    after = router_counters(stack)
    assert "TTFT" in proc.stdout and "goodput" in proc.stdout
    doc = json.loads(out.read_text())
    assert [r["rate"] for r in doc["runs"]] == [20.0, "inf"]
    total = {"completed": 0, "input_tokens": 0, "output_tokens": 0}
    for run in doc["runs"]:
        s = run["summary"]
        assert (s["completed"], s["failed"]) == (10, 0)
        assert s["good_requests"] == 10 and s["goodput"] > 0
        assert 0 < s["p50_ttft_ms"] <= s["p99_ttft_ms"] < 60_000
        assert s["p99_itl_ms"] > 0 and s["output_throughput"] > 0
        assert len(run["requests"]) == 10
        for key in total:
            total[key] += s[key]
    assert after[REQUESTS] - before[REQUESTS] == total["completed"] == 20
    assert after[TTFT_COUNT] - before[TTFT_COUNT] == 20
    assert after[PROMPT_TOKENS] - before[PROMPT_TOKENS] == total["input_tokens"]
    assert after[GENERATION_TOKENS] - before[GENERATION_TOKENS] == total["output_tokens"]
    for name in ("latency_cdf.png", "vs_rate.png"):
        check_png(tmp_path / "plots" / name)

    # two runs on one plot
    bench("compare", str(out), str(out), "--plot", str(tmp_path / "cmp"))
    for name in ("latency_cdf.png", "vs_rate.png"):
        check_png(tmp_path / "cmp" / name)


def test_bench_reports_bad_usage(stack: Stack, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "compare",
                           str(tmp_path / "missing.json")], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing.json" in proc.stderr


def test_bench_multi_turn_sessions_count_their_history(stack: Stack, tmp_path: Path) -> None:
    """Turn k+1 carries turn k's prompt and answer: the prompt tokens the router counted are
    the bench's, history included; the progress bar goes to stderr."""
    before = router_counters(stack)
    out = tmp_path / "turns.json"
    proc = bench("--url", stack.url + "/v1", "--num-requests", "6", "--turns", "3",
                 "--input-len", "24", "--turn-len", "5", "--output-len", "4", "--rate", "50",
                 "--arrival", "fixed", "--concurrency", "2", "--json", str(out))
    after = router_counters(stack)
    assert "req" in proc.stderr  # tqdm's bar
    (run,) = json.loads(out.read_text())["runs"]
    assert [r["turn"] for r in run["requests"]] == [0, 1, 2, 0, 1, 2]
    assert [r["prompt_len"] for r in run["requests"]] == [24, 33, 42] * 2  # 24+4+5, +4+5
    assert run["summary"]["input_tokens"] == 2 * (24 + 33 + 42)
    assert after[PROMPT_TOKENS] - before[PROMPT_TOKENS] == run["summary"]["input_tokens"]
    assert after[REQUESTS] - before[REQUESTS] == 6

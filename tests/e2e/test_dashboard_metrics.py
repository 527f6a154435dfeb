"""Every metric the Grafana dashboard queries exists on the running services of `pdserve up`
(router, decode pod, prefill pod), under exactly that name; vLLM's names where vLLM has one."""

from __future__ import annotations

import json
import re

import httpx
from e2e_helpers import REPO_ROOT, Stack

DASHBOARD = REPO_ROOT / "k8s" / "monitoring" / "grafana-dashboard.json"
# vLLM's names for what both export (the router and the pods)
VLLM_NAMES = {"vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
              "vllm:e2e_request_latency_seconds_bucket", "vllm:num_requests_running",
              "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
              "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
              "vllm:generation_tokens_total", "vllm:request_success_total"}


def exported_names(text: str) -> set[str]:
    """Series names a /metrics page declares: samples, and # TYPE lines (a labelled family
    has no sample before its first label value) with the suffixes of their type."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name, *(name + s for s in suffixes.get(kind, []))}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_dashboard_queries_only_exported_metrics(stack: Stack) -> None:
    stack.client().completions.create(model=stack.model, prompt=[5, 6, 7, 8] * 8,
                                      max_tokens=4, temperature=0)
    pages = {"router": httpx.get(stack.url + "/metrics", timeout=10).text}
    for pod in stack.pools()["pods"]:
        host = pod["address"].rsplit(":", 1)[0]
        pages[pod["pool"]] = httpx.get(f"http://{host}:{pod['metrics_port']}/metrics",
                                       timeout=10).text
    assert set(pages) == {"router", "decode", "prefill"}
    exported = set().union(*(exported_names(t) for t in pages.values()))

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    wanted = {n for e in exprs for n in re.findall(r"(?:pdserve|vllm):[a-z0-9_]+", e)}
    assert len(wanted) >= 20
    assert not wanted - exported, sorted(wanted - exported)
    assert exported >= VLLM_NAMES, sorted(VLLM_NAMES - exported)
    assert not {n for n in exported if n.startswith("pdserve:") and n.replace(
        "pdserve:", "vllm:") in VLLM_NAMES}  # no pdserve: copy of a vLLM name
    # pdserve's own: KV transfer per request, remote vs local prefill, request phases, tier
    assert {"pdserve:kv_transfer_bytes_total", "pdserve:kv_transfer_seconds_bucket",
            "pdserve:kv_transfer_exposed_seconds_bucket", "pdserve:prefill_decisions_total",
            "pdserve:request_phase_seconds_bucket", "pdserve:kv_tier_hits_total"} <= exported

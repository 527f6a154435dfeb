"""Per-request phase timings across router -> decode -> prefill: histograms on each service
and one access-log line at the router with every phase of the request."""

from __future__ import annotations

import re
import time

import httpx
from e2e_helpers import Stack

ROUTER_PHASES = {"router_queue", "time_to_first_token", "decode", "e2e"}
DECODE_PHASES = {"decode_admission", "remote_prefill", "kv_transfer_wait", "first_token",
                 "decode"}
PREFILL_PHASES = {"prefill_queue", "prefill_compute", "kv_transfer_exposed"}


def phase_counts(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for m in re.finditer(r'^pdserve:request_phase_seconds_count\{phase="([a-z0-9_]+)",'
                         r'role="([a-z]+)"\} (\S+)$', text, re.M):
        out[(m.group(2), m.group(1))] = float(m.group(3))
    return out


def pages(stack: Stack) -> dict[str, str]:
    got = {"router": httpx.get(stack.url + "/metrics", timeout=10).text}
    for pod in stack.pools()["pods"]:
        host = pod["address"].rsplit(":", 1)[0]
        got[pod["pool"]] = httpx.get(f"http://{host}:{pod['metrics_port']}/metrics",
                                     timeout=10).text
    return got


def test_one_request_has_every_phase_in_histograms_and_access_log(stack: Stack) -> None:
    before = {k: phase_counts(v) for k, v in pages(stack).items()}
    stream = stack.client().completions.create(
        model=stack.model, prompt=[7, 8, 9, 10, 11] * 9, max_tokens=6, temperature=0,
        stream=True, extra_body={"ignore_eos": True})
    reply_id = None
    for chunk in stream:
        reply_id = chunk.id
    after = {k: phase_counts(v) for k, v in pages(stack).items()}
    for service, names in (("router", ROUTER_PHASES), ("decode", DECODE_PHASES),
                           ("prefill", PREFILL_PHASES)):
        role = "router" if service == "router" else service
        for name in names:
            grew = after[service].get((role, name), 0) - before[service].get((role, name), 0)
            assert grew == 1, (service, name, after[service])

    # the router's access line of this request: every phase, in milliseconds
    deadline = time.monotonic() + 10
    line = None
    while line is None and time.monotonic() < deadline:
        line = next((ln for ln in stack.log_tail(1 << 20).splitlines()
                     if " access " in ln and reply_id in ln), None)
        time.sleep(0.1)
    assert line is not None, stack.log_tail()
    assert " ok prompt_tokens=45 completion_tokens=6 " in line
    # and the pods it went to: this stack's decode pod, with its prefill pod
    assert re.search(r" pods=127\.0\.0\.1:\d+<-127\.0\.0\.1:\d+$", line), line
    fields = dict(re.findall(r"([a-z0-9_]+)_ms=([0-9.]+)", line))
    assert set(fields) >= ROUTER_PHASES | DECODE_PHASES | PREFILL_PHASES, line
    # phases nest: the prefill pod's work lies inside the decode pod's remote prefill
    assert float(fields["prefill_compute"]) <= float(fields["remote_prefill"])
    assert float(fields["first_token"]) <= float(fields["time_to_first_token"])

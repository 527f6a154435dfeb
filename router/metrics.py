"""The router's Prometheus metrics: vLLM's names (``vllm:``) where vLLM has the metric, so
dashboards and autoscalers written for vLLM read pdserve; ``pdserve:`` for the rest.

One registry per app (not the process-global default), so two routers in one process (tests)
never collide. Latencies are measured where the router sees them: time to first token from
the request's arrival to its first generated token, inter-token latency between successive
streamed steps of a sequence batch, end-to-end latency to the last token.
"""

from __future__ import annotations

import contextlib

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from router.pools import Pod

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class RouterMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry
        self._ttft = Histogram("vllm:time_to_first_token_seconds",
                               "Time from request arrival to its first generated token.",
                               labels, buckets=_LATENCY_BUCKETS, registry=reg)
        self._itl = Histogram("vllm:inter_token_latency_seconds",
                              "Time between successive streamed steps of a request.",
                              labels, buckets=_ITL_BUCKETS, registry=reg)
        self._e2e = Histogram("vllm:e2e_request_latency_seconds",
                              "Time from request arrival to its last token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=reg)
        self._prompt_hist = Histogram("vllm:request_prompt_tokens",
                                      "Prompt tokens per request.", labels,
                                      buckets=_TOKEN_BUCKETS, registry=reg)
        self._gen_hist = Histogram("vllm:request_generation_tokens",
                                   "Generated tokens per request (all choices).", labels,
                                   buckets=_TOKEN_BUCKETS, registry=reg)
        self._prompt_total = Counter("vllm:prompt_tokens", "Prompt tokens processed.",
                                     labels, registry=reg)
        self._gen_total = Counter("vllm:generation_tokens", "Tokens generated.", labels,
                                  registry=reg)
        self._running = Gauge("vllm:num_requests_running",
                              "Requests the router is generating now.", labels, registry=reg)
        self._success = Counter("vllm:request_success",
                                "Finished choices (sequences), by finish reason.",
                                [*labels, "finished_reason"], registry=reg)
        self._errors = Counter("pdserve:request_errors",
                               "Requests answered with an error, by HTTP status.",
                               [*labels, "status"], registry=reg)
        self._phases = Histogram("pdserve:request_phase_seconds",
                                 "Seconds of each phase of a request, as the router saw it",
                                 ["role", "phase"], buckets=_LATENCY_BUCKETS, registry=reg)
        self._pod_healthy = Gauge("pdserve:pod_healthy", "1 if the pod's last poll succeeded.",
                                  ["pool", "address"], registry=reg)
        self._pod_running = Gauge("pdserve:pod_num_requests_running",
                                  "Running requests the pod reported.", ["pool", "address"],
                                  registry=reg)
        self._pod_free = Gauge("pdserve:pod_free_kv_blocks", "Free KV blocks the pod reported.",
                               ["pool", "address"], registry=reg)

    def request_started(self) -> None:
        self._running.labels(self.model_name).inc()

    def request_finished(self, prompt_tokens: int, generation_tokens: int,
                         e2e_seconds: float | None, finish_reasons: list[str]) -> None:
        m = self.model_name
        self._running.labels(m).dec()
        self._prompt_hist.labels(m).observe(prompt_tokens)
        self._gen_hist.labels(m).observe(generation_tokens)
        self._prompt_total.labels(m).inc(prompt_tokens)
        self._gen_total.labels(m).inc(generation_tokens)
        if e2e_seconds is not None:
            self._e2e.labels(m).observe(e2e_seconds)
        for reason in finish_reasons:
            self._success.labels(m, reason).inc()

    def request_failed(self, status: int) -> None:
        self._errors.labels(self.model_name, str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self._ttft.labels(self.model_name).observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.labels(self.model_name).observe(seconds)

    def phase(self, name: str, seconds: float) -> None:
        self._phases.labels("router", name).observe(max(seconds, 0.0))

    def update_pods(self, pods: list[Pod]) -> None:
        for pod in pods:
            key = (pod.role.value, pod.address)
            self._pod_healthy.labels(*key).set(1 if pod.healthy else 0)
            if pod.report is not None:
                self._pod_running.labels(*key).set(pod.report.running)
                self._pod_free.labels(*key).set(pod.report.free_blocks)

    def forget_pod(self, pod: Pod) -> None:
        """A pod left its pool: its series go too."""
        key = (pod.role.value, pod.address)
        for gauge in (self._pod_healthy, self._pod_running, self._pod_free):
            with contextlib.suppress(KeyError):
                gauge.remove(*key)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

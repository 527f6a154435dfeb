"""The cpu overlay's pods, run on this machine as kubelet would run them (tests/k8s/kubelet.py
says how, and its few liberties): Redis, a prefill, a decode and a router pod, each on a
loopback address of its own, with exactly the command, args and env the rendered manifests
give them -- their init containers first, the ConfigMap's flags, the Secret's API key as a
file and Redis password as env -- probed with their own gRPC, HTTP and exec probes. The
router finds the pods through a real DNS server answering for the headless Services, as
cluster DNS would once their readiness probes pass; then a chat completion goes through.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis
import yaml
from dns_server import dns_server
from k8s_helpers import K8S, NAMESPACE, one, pod_templates, render
from kubelet import LocalPod, _secret_data, http_get

pytestmark = pytest.mark.timeout(420)


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def _metric_names(text: str) -> set[str]:
    """Every series name a /metrics page declares (labelled families have no sample until
    a label value is seen: their # TYPE line counts)."""
    names = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name, *(name + s for s in suffixes.get(kind, []))}
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[dict]:
    _, objs = render("overlays/cpu")
    templates = pod_templates(objs)
    base = f"127.{random.randint(2, 250)}.{random.randint(2, 250)}."
    pods = {role: LocalPod(f"pdserve-{role}-0", templates[f"pdserve-{role}"], objs,
                           base + str(i + 1), tmp_path / role)
            for i, role in enumerate(["redis", "prefill", "decode", "router"])}
    for pod in pods.values():
        pod.root.mkdir()
    try:
        yield {"objs": objs, "pods": pods}
    finally:
        for pod in pods.values():
            pod.stop()


def test_cpu_overlay_pods_run_as_the_manifests_say_and_serve_a_chat(cluster: dict) -> None:
    objs, pods = cluster["objs"], cluster["pods"]
    secrets = _secret_data(objs, "pdserve-secrets")
    domain = one(objs, "ConfigMap", "pdserve-config")["data"]["CLUSTER_DOMAIN"]

    def service(name: str) -> str:
        return f"{name}.{NAMESPACE}.svc.{domain}"

    with dns_server() as (records, dns_port):
        pods["router"].extra_args["router"] = ["--dns-server", f"127.0.0.1:{dns_port}"]

        # Redis: a bounded LRU cache, no persistence, AUTH with the Secret's password.
        pods["redis"].start()
        pods["redis"].wait_started()
        assert pods["redis"].ready() and pods["redis"].live()
        records.set(service("pdserve-redis"), [pods["redis"].ip])
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=pods["redis"].ip, port=6379).ping()
        r = redis.Redis(host=pods["redis"].ip, port=6379,
                        password=secrets["redis-password"].decode())
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
        assert int(r.config_get("maxmemory")["maxmemory"]) == 128 * 1024 * 1024
        assert r.config_get("save")["save"] == "" and r.config_get("appendonly")["appendonly"] \
            == "no"

        for role in ("prefill", "decode"):  # their --kv-tier names Redis's Service
            pods[role].hosts[service("pdserve-redis")] = pods["redis"].ip

        # The pods: init containers (make-model) in parallel, then their servers.
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(LocalPod.start, [pods[r] for r in ("prefill", "decode", "router")]))
        digests = {role: _tree_digest(pods[role].volumes["model"])
                   for role in ("prefill", "decode", "router")}
        assert len(set(digests.values())) == 1, digests  # make-model gave every pod one model

        for role in ("prefill", "decode"):
            pods[role].wait_started()
            assert pods[role].ready() and pods[role].live(), pods[role].log(role)
            records.set(service(f"pdserve-{role}"), [pods[role].ip])  # EndpointSlice: ready
        pods["router"].wait_started()
        router_url = f"http://{pods['router'].ip}:8000"
        for _ in range(100):  # readiness: a healthy decode pod, found by DNS
            if pods["router"].ready():
                break
            assert pods["router"].procs["router"].poll() is None, pods["router"].log("router")
            time.sleep(0.2)
        assert pods["router"].ready(), pods["router"].log("router")
        assert pods["router"].live()

        key = secrets["api-key"].decode()
        assert http_get(router_url + "/pools")[0] == 401  # the pool view needs the API key
        status, view = http_get(router_url + "/pools", {"Authorization": f"Bearer {key}"})
        view = json.loads(view)
        assert status == 200
        assert sorted(p["address"] for p in view["pods"]) == sorted(
            [f"{pods['decode'].ip}:50061", f"{pods['prefill'].ip}:50051"])
        assert all(d["last_error"] is None for d in view["discovery"])

        # A chat completion with the Secret's API key (the router read it from its file).
        client = openai.OpenAI(base_url=router_url + "/v1", api_key=key, max_retries=0,
                               timeout=60)
        reply = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
            temperature=0, extra_body={"ignore_eos": True})
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=router_url + "/v1", api_key="wrong", max_retries=0
                          ).models.list()

        # The shared KV tier is the Redis pod: a prompt longer than one 256-token chunk
        # leaves its first chunk there once prefilled.
        client.completions.create(model="default", prompt=[(7 * i) % 1000 + 3
                                                           for i in range(300)],
                                  max_tokens=2, temperature=0)
        deadline = time.monotonic() + 20
        while not r.keys("pdserve:kv:v1:*"):
            assert time.monotonic() < deadline, (pods["prefill"].log("prefill")[-2000:],
                                                 pods["decode"].log("decode")[-2000:])
            time.sleep(0.2)

        # What the autoscalers and the dashboard read is what the pods export.
        exported = {role: _metric_names(http_get(f"http://{pods[role].ip}:9090/metrics")[1])
                    for role in ("prefill", "decode")}
        exported["router"] = _metric_names(http_get(router_url + "/metrics")[1])
        assert "pdserve:kv_transfer_bytes_total" in exported["decode"]  # the KV really moved
        rules = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml")
                               .read_text())["rules"]["custom"]
        adapter = {rule["seriesQuery"].split("{")[0] for rule in rules}
        assert adapter <= exported["prefill"] | exported["decode"]
        assert "pdserve:outstanding_prefill_tokens" in exported["prefill"]
        assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= \
            exported["decode"]
        dashboard = (K8S / "monitoring" / "grafana-dashboard.json").read_text()
        wanted = set(re.findall(r"(?:pdserve|vllm):[a-z0-9_]+", dashboard))
        everything = set().union(*exported.values())
        missing = {w for w in wanted if w not in everything and f"{w}_bucket" not in everything}
        assert len(wanted) >= 15
        assert not missing, missing

    # Kubelet's stop: SIGTERM, SIGKILL after the grace period. Everyone leaves in time.
    for role in ("router", "decode", "prefill", "redis"):
        grace = pods[role].spec.get("terminationGracePeriodSeconds", 30)
        took = pods[role].stop()
        assert all(t < grace for t in took.values()), (role, took)
        assert all(p.returncode in (0, -15) for p in pods[role].procs.values()), role

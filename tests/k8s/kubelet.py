"""A stand-in for kubelet on this machine: run a rendered pod template's containers as local
processes with exactly their command, args and env, and probe them as kubelet does.

What kubelet does that is reproduced here: the environment (``envFrom`` ConfigMaps, then
``env`` in order with ``valueFrom`` fieldRef/ConfigMap/Secret keys, ``$(VAR)`` expanded from
what is defined before, ``$$`` for a literal ``$``), ``$(VAR)`` in command and args, volumes
(ConfigMap and Secret keys as files, emptyDir shared by the pod's containers), init
containers in order before the main ones, gRPC/HTTP/exec probes against the pod's IP.
The liberties, all of them: the pod's filesystem paths (its mount paths) are folders of the
test, so every mount path in args, env values and mounted files is rewritten to its folder;
a pod's own network namespace is a loopback address of its own (127.x.y.z), so a wildcard
listen address 0.0.0.0 in the same places becomes that address; the image is this checkout's
environment (PATH gets .venv/bin, where ``pdserve`` lives). Cluster DNS is the caller's.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8s_helpers import NAMESPACE, VENV_BIN, find, one

VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """kubelet's $(VAR) expansion: defined names are replaced, others left as written."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return VAR.sub(sub, text)


@dataclass
class LocalPod:
    """One pod: its template, its IP, its volumes' folders, its running containers."""

    name: str
    template: dict
    objs: list[dict]
    ip: str
    root: Path
    extra_args: dict[str, list[str]] = field(default_factory=dict)  # container -> args
    # Service names -> addresses, for the names the pod's own processes look up: cluster
    # DNS comes through the resolv.conf kubelet writes, which a test cannot.
    hosts: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    volumes: dict[str, Path] = field(default_factory=dict)

    @property
    def spec(self) -> dict:
        return self.template["spec"]

    # -- volumes and paths -----------------------------------------------------------------

    def _mounts(self, container: dict) -> list[tuple[str, Path]]:
        mounts = [(m["mountPath"], self.volumes[m["name"]])
                  for m in container.get("volumeMounts", [])]
        return sorted(mounts, key=lambda m: -len(m[0]))  # the longest path wins

    def localize(self, text: str, container: dict) -> str:
        """Mount paths -> their folders (one pass, so a folder is never rewritten again),
        and the wildcard address -> the pod's own."""
        mounts = dict(self._mounts(container))
        if mounts:
            pattern = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, mounts)) +
                                 r")(?=/|$|[^\w.-])")
            text = pattern.sub(lambda m: str(mounts[m.group(1)]), text)
        for name, address in self.hosts.items():
            text = text.replace(name, address)
        return text.replace("0.0.0.0", self.ip)

    def make_volumes(self) -> None:
        for volume in self.spec.get("volumes", []):
            folder = self.root / "volumes" / volume["name"]
            folder.mkdir(parents=True)
            self.volumes[volume["name"]] = folder
            if "emptyDir" in volume:
                continue
            if "configMap" in volume:
                data = one(self.objs, "ConfigMap", volume["configMap"]["name"])["data"]
                files = {k: v.encode() for k, v in data.items()}
                items = volume["configMap"].get("items")
            elif "secret" in volume:
                files = _secret_data(self.objs, volume["secret"]["secretName"])
                items = volume["secret"].get("items")
            else:
                raise AssertionError(f"volume {volume['name']}: a kind this test cannot run")
            for item in items or [{"key": k, "path": k} for k in files]:
                (folder / item["path"]).write_bytes(files[item["key"]])

    def _localize_files(self) -> None:
        """Paths and the wildcard address inside mounted config files (redis.conf)."""
        for volume in self.spec.get("volumes", []):
            if "configMap" not in volume:
                continue
            user = next(c for c in self._all_containers()
                        if any(m["name"] == volume["name"] for m in c.get("volumeMounts", [])))
            for path in self.volumes[volume["name"]].iterdir():
                path.write_text(self.localize(path.read_text(), user))

    def _all_containers(self) -> list[dict]:
        return [*self.spec.get("initContainers", []), *self.spec["containers"]]

    # -- environment ------------------------------------------------------------------------

    def env(self, container: dict) -> dict[str, str]:
        """The process environment: the container's, localized, and the image's PATH."""
        local = {k: self.localize(v, container) for k, v in self._raw_env(container).items()}
        return {**local, "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"}

    def _raw_env(self, container: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(one(self.objs, "ConfigMap", source["configMapRef"]["name"])["data"])
            else:
                env.update({k: v.decode() for k, v in _secret_data(
                    self.objs, source["secretRef"]["name"]).items()})
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = expand(item["value"], env)
                continue
            ref = item["valueFrom"]
            if "fieldRef" in ref:
                env[item["name"]] = {"status.podIP": self.ip, "metadata.namespace": NAMESPACE,
                                     "metadata.name": self.name}[ref["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in ref:
                key = ref["secretKeyRef"]
                env[item["name"]] = _secret_data(self.objs, key["name"])[key["key"]].decode()
            else:
                key = ref["configMapKeyRef"]
                env[item["name"]] = one(self.objs, "ConfigMap", key["name"])["data"][key["key"]]
        return env

    def argv(self, container: dict) -> list[str]:
        env = self._raw_env(container)
        words = [*container.get("command", []), *container.get("args", [])]
        argv = [self.localize(expand(w, env), container) for w in words]
        return [*argv, *self.extra_args.get(container["name"], [])]

    # -- running ----------------------------------------------------------------------------

    def start(self, timeout: float = 300) -> None:
        """Volumes, then each init container to its end, then the main containers."""
        self.make_volumes()
        self._localize_files()
        for container in self.spec.get("initContainers", []):
            proc = self._spawn(container)
            code = proc.wait(timeout=timeout)
            assert code == 0, f"{self.name}: init container {container['name']} exited " \
                              f"{code}\n{self.log(container['name'])}"
        for container in self.spec["containers"]:
            self.procs[container["name"]] = self._spawn(container)

    def _spawn(self, container: dict) -> subprocess.Popen:
        log = open(self.root / f"{container['name']}.log", "wb")  # noqa: SIM115
        argv = self.argv(container)
        return subprocess.Popen(argv, env=self.env(container), cwd=self.root, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, container: str) -> str:
        return (self.root / f"{container}.log").read_text(errors="replace")[-4000:]

    def stop(self, container: str | None = None) -> dict[str, float]:
        """SIGTERM (kubelet's stop), then SIGKILL after the grace period: seconds each took."""
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        took = {}
        for name, proc in self.procs.items():
            if container is not None and name != container:
                continue
            start = time.monotonic()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            took[name] = time.monotonic() - start
        return took

    # -- probes -----------------------------------------------------------------------------

    def probe(self, container: dict, kind: str) -> bool:
        """One run of ``container``'s probe ``kind`` (startupProbe, ...), as kubelet runs it."""
        spec = container[kind]
        timeout = spec.get("timeoutSeconds", 1)
        try:
            if "grpc" in spec:
                with grpc.insecure_channel(f"{self.ip}:{spec['grpc']['port']}") as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=spec["grpc"].get("service", "")),
                        timeout=timeout)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
            if "httpGet" in spec:
                port = self._port(container, spec["httpGet"]["port"])
                url = f"http://{self.ip}:{port}{spec['httpGet'].get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as reply:
                    return 200 <= reply.status < 400
            if "exec" in spec:
                argv = [self.localize(w, container) for w in spec["exec"]["command"]]
                return subprocess.run(argv, env=self.env(container), timeout=timeout + 5,
                                      capture_output=True).returncode == 0
        except (grpc.RpcError, OSError, subprocess.TimeoutExpired):
            return False
        raise AssertionError(f"{kind}: a probe kind this test cannot run")

    def _port(self, container: dict, port: int | str) -> int:
        if isinstance(port, int):
            return port
        return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)

    def wait_started(self) -> float:
        """Run each container's startup probe at its period until it succeeds, within the
        budget kubelet allows (initialDelay + period x failureThreshold); seconds taken."""
        start = time.monotonic()
        for container in self.spec["containers"]:
            spec = container["startupProbe"]
            budget = spec.get("initialDelaySeconds", 0) + \
                spec.get("periodSeconds", 10) * spec.get("failureThreshold", 3)
            deadline = start + budget
            while not self.probe(container, "startupProbe"):
                proc = self.procs[container["name"]]
                assert proc.poll() is None, f"{self.name} exited:\n{self.log(container['name'])}"
                assert time.monotonic() < deadline, \
                    f"{self.name}: startup probe failed for {budget} s\n" \
                    f"{self.log(container['name'])}"
                time.sleep(min(spec.get("periodSeconds", 10), 0.5))
        return time.monotonic() - start

    def ready(self) -> bool:
        return all(self.probe(c, "readinessProbe") for c in self.spec["containers"])

    def live(self) -> bool:
        return all(self.probe(c, "livenessProbe") for c in self.spec["containers"])


def _secret_data(objs: list[dict], name: str) -> dict[str, bytes]:
    (secret,) = find(objs, "Secret", name)
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()

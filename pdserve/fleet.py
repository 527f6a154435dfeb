"""``pdserve up``'s processes: start the pods and the router, supervise them, stop them.

Every pod listens on a port ``up`` chose for it at start, and keeps it across restarts, so
the router (which polls its pods and reconnects within a second) finds a restarted pod
where it was and never needs to learn a new address. A pod that dies -- a crash, kill -9,
the OOM killer -- is restarted after a backoff that doubles from ``--restart-backoff`` (up
to 30 s); after ``--restart-limit`` restarts in a row (a pod that ran for a minute has its
count reset) ``up`` gives up and stops everything, saying why. Meanwhile the router serves
from the survivors. A pod that exits cleanly (it was sent SIGTERM and drained) is not
restarted: as in a Kubernetes Deployment scaled down, the others go on while a decode pod
is left. The router's exit stops everything.
"""

from __future__ import annotations

import http.client
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import IO

from engine.errors import PdserveError

READY = re.compile(r"ready on (\S+:\d+)")
START_TIMEOUT_S = 600.0  # an 8B model on a GPU loads and captures its graphs for minutes
RESET_AFTER_S = 60.0  # a pod that ran this long before dying starts its restart count anew
MAX_BACKOFF_S = 30.0


@dataclass(slots=True, frozen=True)
class RestartPolicy:
    limit: int = 5  # restarts in a row before `up` gives up (0: never restart)
    backoff_s: float = 1.0  # before the first restart; doubles for each next one

    def delay(self, restarts: int) -> float:
        return min(self.backoff_s * 2 ** restarts, MAX_BACKOFF_S)


@dataclass(slots=True)
class PodProcess:
    name: str
    argv: list[str]  # the full command, its fixed --port included
    proc: subprocess.Popen
    started: float  # time.monotonic() of its last (re)start
    address: queue.Queue[str]  # its ready line's host:port, put by the relay thread
    restarts: int = 0  # in a row, see RESET_AFTER_S
    restart_at: float | None = None  # set while it is dead and waits for its restart
    announced: bool = False  # its ready line was reported


def free_port(host: str) -> int:
    """A port free on ``host`` now, for a pod to keep for the life of ``up``: drawn below
    the kernel's ephemeral range, which ``bind(port=0)`` and outgoing connections use, so
    that no other socket takes it while the pod starts or lies dead between restarts."""
    # 10000-19999 by default: also clear of 20000-32767, where the tests draw theirs
    top = min(ephemeral_low(), 20000) - 1
    return free_port_between(host, max(1024, top - 9999), top)


def free_port_between(host: str, low: int, high: int) -> int:
    """A port in [low, high] that ``host`` can bind now, drawn at random."""
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise PdserveError(f"no free port on {host} between {low} and {high}")


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass(slots=True)
class Fleet:
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    pods: dict[str, PodProcess] = field(default_factory=dict)
    router: subprocess.Popen | None = None

    def launch(self, name: str, argv: list[str]) -> None:
        """Start a pod (``argv`` after ``pdserve``); ``wait_ready`` gives its address."""
        found: queue.Queue[str] = queue.Queue(maxsize=1)
        self.pods[name] = PodProcess(name, argv, _spawn(argv, found), time.monotonic(), found)

    def wait_ready(self, name: str) -> str:
        pod = self.pods[name]
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                address = pod.address.get(timeout=0.5)
            except queue.Empty:
                if pod.proc.poll() is not None:
                    break
                continue
            pod.announced = True
            print(f"pdserve up: {name} (pid {pod.proc.pid}) on {address}", flush=True)
            return address
        raise PdserveError(f"{name} did not start (exit code {pod.proc.poll()})")

    def start_router(self, argv: list[str], url: str) -> None:
        proc = subprocess.Popen([*_pdserve(), "router", *argv])
        self.router = proc
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PdserveError(f"the router exited with code {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    return
            except (OSError, http.client.HTTPException):
                # HTTPException: something that is not our router answers on the port
                time.sleep(0.2)
        raise PdserveError(f"the router did not become healthy at {url}/health (is the port "
                           "taken by another server?)")

    def supervise(self, now: float) -> str | None:
        """One round: restart the pods whose backoff is over, schedule a restart for those
        that died, report those that came back. Returns why everything must stop, if so."""
        if self.router is not None and self.router.poll() is not None:
            return f"the router exited ({describe_exit(self.router.returncode)})"
        for pod in list(self.pods.values()):
            if pod.restart_at is not None:
                if now >= pod.restart_at:
                    self._restart(pod, now)
                continue
            code = pod.proc.poll()
            if code is None:
                if not pod.announced and not pod.address.empty():
                    pod.announced = True
                    print(f"pdserve up: {pod.name} (pid {pod.proc.pid}) on "
                          f"{pod.address.get()} again", flush=True)
                continue
            if code == 0:
                stop = self._drained(pod)
                if stop is not None:
                    return stop
                continue
            if now - pod.started >= RESET_AFTER_S:
                pod.restarts = 0
            how = describe_exit(code)
            if pod.restarts >= self.policy.limit:
                return (f"{pod.name} (pid {pod.proc.pid}) {how}, and it was restarted "
                        f"{pod.restarts} time(s) in a row (--restart-limit "
                        f"{self.policy.limit}): giving up")
            delay = self.policy.delay(pod.restarts)
            pod.restart_at = now + delay
            print(f"pdserve up: {pod.name} (pid {pod.proc.pid}) {how}; restarting it in "
                  f"{delay:g} s (restart {pod.restarts + 1} of at most "
                  f"{self.policy.limit})", flush=True)
        return None

    def _restart(self, pod: PodProcess, now: float) -> None:
        pod.restarts += 1
        pod.restart_at = None
        pod.announced = False
        pod.started = now
        pod.address = queue.Queue(maxsize=1)
        pod.proc = _spawn(pod.argv, pod.address)
        print(f"pdserve up: restarting {pod.name} (pid {pod.proc.pid})", flush=True)

    def _drained(self, pod: PodProcess) -> str | None:
        del self.pods[pod.name]
        decode_left = sum(1 for p in self.pods.values()
                          if p.name.startswith("decode") and p.proc.poll() is None)
        if decode_left == 0:
            return f"{pod.name} drained and exited, and no decode pod is left"
        print(f"pdserve up: {pod.name} (pid {pod.proc.pid}) drained and exited; "
              f"{decode_left} decode pod(s) left", flush=True)
        return None

    def stop(self, drain_timeout: float) -> None:
        procs = [p.proc for p in self.pods.values()]
        if self.router is not None:
            procs.append(self.router)
        for proc in reversed(procs):  # the router first: no new work reaches the pods
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + drain_timeout + 10
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _spawn(argv: list[str], found: queue.Queue[str]) -> subprocess.Popen:
    """One thread per pod reads its stdout line by line and relays it: ``select`` on a
    buffered pipe misses a ready line that arrived in the same read as an earlier line."""
    proc = subprocess.Popen([*_pdserve(), *argv], stdout=subprocess.PIPE, stderr=None,
                            text=True, bufsize=1)
    stream: IO[str] | None = proc.stdout
    assert stream is not None
    threading.Thread(target=_relay, args=(stream, found), daemon=True).start()
    return proc


def _relay(stream: IO[str], found: queue.Queue[str]) -> None:
    """Copy a pod's stdout to ours (so a chatty pod never blocks on a full pipe) and put the
    address of its first ready line into ``found``."""
    for line in stream:
        match = READY.search(line)
        if match and found.empty():
            found.put(match.group(1))
            continue
        sys.stdout.write(line)


def _pdserve() -> list[str]:
    return [sys.executable, "-m", "pdserve.cli"]

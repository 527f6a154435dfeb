"""DNS discovery against a real DNS server on 127.0.0.1 whose answers change during the run.

First the router's discovery on its own (the resolver, the endpoint syntax, what a failed
look-up does to a pool), then a real router process with ``--decode dns:NAME:PORT`` in
front of two real decode pods that share one port on two loopback addresses, as pods of a
headless Service do: a pod added to the answer takes requests without a restart, a pod
taken out of the answer and sent SIGTERM finishes its streams while no request fails.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from dns_server import Records, dns_server

from router.discovery import Discovery as RouterDiscovery
from router.discovery import DnsEndpoint, DnsResolver, LookupFailed, parse_endpoint, parse_endpoints
from router.pools import Pools, Role

pytestmark = pytest.mark.timeout(240)

NAME = "pdserve-decode.test.svc.cluster.local"
READY = re.compile(r"ready on (\S+:\d+)")
# Streams that outlast the moment a pod leaves: nearly all of the default model's context,
# a second or more even with the C attention kernels (600 tokens could end before all four
# streams were seen in flight).
LONG = 1900


# -- discovery on its own --------------------------------------------------------------

def test_endpoints_are_host_port_or_dns_name_port() -> None:
    assert parse_endpoint("10.0.0.7:50061") == "10.0.0.7:50061"
    assert parse_endpoint(f"dns:{NAME}:50061") == DnsEndpoint(NAME, 50061)
    assert str(DnsEndpoint(NAME, 50061)) == f"dns:{NAME}:50061"
    assert parse_endpoints(f"a:1, dns:{NAME}:2") == ["a:1", DnsEndpoint(NAME, 2)]
    for bad in ("dns:", f"dns:{NAME}", f"dns:{NAME}:port", "dns:///x:1", "host", "h:0",
                "h:70000"):
        with pytest.raises(ValueError, match="dns:NAME:PORT"):
            parse_endpoint(bad)


def test_resolver_returns_every_a_and_aaaa_record_and_tells_nxdomain_from_failure() -> None:
    async def main(records: Records, port: int) -> None:
        resolver = DnsResolver(("127.0.0.1", port), timeout=1.0)
        records.set(NAME, ["10.1.0.2", "10.1.0.1", "fd00::5"])
        assert await resolver.lookup(NAME) == ["10.1.0.1", "10.1.0.2", "fd00::5"]
        records.set(NAME, [])  # the name exists, no pod is ready
        assert await resolver.lookup(NAME) == []
        records.set(NAME, None)  # no such name
        assert await resolver.lookup(NAME) == []
        records.failing = True
        with pytest.raises(LookupFailed, match=r"NoNameservers|SERVFAIL"):
            await resolver.lookup(NAME)

    with dns_server() as (records, port):
        asyncio.run(main(records, port))


def test_pools_follow_the_dns_answer_and_keep_it_through_a_dns_outage() -> None:
    async def main(records: Records, port: int) -> None:
        pools = Pools()  # real channels, opened lazily: nothing is dialled here
        discovery = RouterDiscovery(
            pools, {Role.DECODE: [DnsEndpoint(NAME, 50061), "10.9.9.9:50061"],
                    Role.PREFILL: []},
            DnsResolver(("127.0.0.1", port), timeout=0.5), interval=0.05)

        def decode() -> list[str]:
            return sorted(p.address for p in pools.decode)

        records.set(NAME, ["10.1.0.1"])
        await discovery.start()
        try:
            assert decode() == ["10.1.0.1:50061", "10.9.9.9:50061"]  # fixed ones stay
            records.set(NAME, ["10.1.0.1", "10.1.0.2", "fd00::7"])
            await _until(lambda: len(decode()) == 4)
            assert "[fd00::7]:50061" in decode()
            leaving = next(p for p in pools.decode if p.address == "10.1.0.1:50061")
            lease = pools.lease(leaving, None, 1)  # a request still runs there
            records.set(NAME, ["10.1.0.2"])
            await _until(lambda: len(decode()) == 2)
            assert leaving.leaving and leaving.channel is not None  # open until it ends
            pools.release(lease)
            assert leaving.channel is None

            records.failing = True  # DNS down: the pool keeps what it had
            asked = records.queries
            await _until(lambda: records.queries > asked + 4)
            assert decode() == ["10.1.0.2:50061", "10.9.9.9:50061"]
            assert "SERVFAIL" in (discovery.describe()[0]["last_error"] or "") or \
                "NoNameservers" in (discovery.describe()[0]["last_error"] or "")
            records.failing = False
            records.set(NAME, None)  # the Service is gone: its pods leave the pool
            await _until(lambda: decode() == ["10.9.9.9:50061"])
        finally:
            await discovery.close()
            await pools.close()

    with dns_server() as (records, port):
        asyncio.run(main(records, port))


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- a real router and real pods ---------------------------------------------------------

def _port_free_on(hosts: list[str]) -> int:
    """A port free on every one of ``hosts`` (pods of one Service share their port)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no common free port on {hosts}")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - closed with the process by the fixture
    return subprocess.Popen([sys.executable, "-m", "pdserve.cli", *args], stdout=out,
                            stderr=subprocess.STDOUT, text=True)


def _wait_line(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text()):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


@pytest.fixture()
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_router_follows_a_headless_service_and_loses_no_request_when_a_pod_drains(
        default_model_dir: Path, tmp_path: Path, procs: list[subprocess.Popen]) -> None:
    hosts = ["127.0.0.2", "127.0.0.3"]  # two pods, one port, as behind a headless Service
    port = _port_free_on(hosts)
    pods = {}
    for i, host in enumerate(hosts):
        log = tmp_path / f"decode-{i}.log"
        procs.append(_start(["decode", "--model", str(default_model_dir), "--host", host,
                             "--port", str(port), "--metrics-port", "0",
                             "--kv-connector", "none", "--num-kv-blocks", "512",
                             "--drain-timeout", "30"], log))
        pods[host] = (procs[-1], log)
    for proc, log in pods.values():
        _wait_line(log, "ready on", proc)

    with dns_server() as (records, dns_port):
        records.set(NAME, [hosts[0]])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            http_port = s.getsockname()[1]
        router_log = tmp_path / "router.log"
        procs.append(_start(["router", "--model", str(default_model_dir), "--host",
                             "127.0.0.1", "--port", str(http_port),
                             "--decode", f"dns:{NAME}:{port}",
                             "--dns-server", f"127.0.0.1:{dns_port}",
                             "--discovery-interval", "0.2", "--poll-interval", "0.2"],
                            router_log))
        url = f"http://127.0.0.1:{http_port}"
        router = procs[-1]
        deadline = time.monotonic() + 120
        while True:
            assert router.poll() is None, router_log.read_text()[-3000:]
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, router_log.read_text()[-3000:]
            time.sleep(0.2)
        asyncio.run(_scenario(url, records, hosts, port, pods))


def _members(url: str) -> list[str]:
    view = httpx.get(url + "/pools", timeout=10).json()
    return sorted(p["address"] for p in view["pods"])


def _served(url: str, address: str) -> float:
    """Decode requests a pod has finished (its own metrics, found through /pools)."""
    pod = next(p for p in httpx.get(url + "/pools", timeout=10).json()["pods"]
               if p["address"] == address)
    host = address.rsplit(":", 1)[0]
    text = httpx.get(f"http://{host}:{pod['metrics_port']}/metrics", timeout=10).text
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key.startswith("pdserve:requests_total{") and 'outcome="ok"' in key:
            return float(value)
    return 0.0


async def _wait_members(url: str, want: list[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := await asyncio.to_thread(_members, url)) != sorted(want):
        assert time.monotonic() < deadline, f"pool {got}, expected {want}"
        await asyncio.sleep(0.1)


async def _scenario(url: str, records: Records, hosts: list[str], port: int,
                    pods: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    a, b = (f"{h}:{port}" for h in hosts)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = (await client.models.list()).data[0].id

    async def short(i: int) -> str | None:
        reply = await client.completions.create(model=model, prompt=f"n = {i}", max_tokens=4,
                                                extra_body={"ignore_eos": True})
        return reply.choices[0].finish_reason

    assert await asyncio.to_thread(_members, url) == [a]
    assert await short(0) == "length"

    # A pod joins the answer: the router takes it in without a restart and uses it.
    records.set(NAME, hosts)
    await _wait_members(url, [a, b])
    b_before = await asyncio.to_thread(_served, url, b)
    assert all(r == "length" for r in await asyncio.gather(*(short(i) for i in range(6))))
    assert await asyncio.to_thread(_served, url, b) > b_before

    # Pod a leaves as Kubernetes takes a pod away: out of the DNS answer and SIGTERM at
    # once, with streams running on both pods and requests arriving all along.
    async def stream(i: int) -> tuple[int, str | None]:
        s = await client.completions.create(model=model, prompt=f"def f{i}():", max_tokens=LONG,
                                            stream=True, extra_body={"ignore_eos": True,
                                                                     "return_token_ids": True})
        tokens, finish = 0, None
        async for chunk in s:
            c = chunk.choices[0]
            tokens += len((c.model_extra or {}).get("token_ids") or [])
            finish = c.finish_reason or finish
        return tokens, finish

    streams = [asyncio.create_task(stream(i)) for i in range(4)]
    deadline = time.monotonic() + 60
    while True:  # both pods hold streams before a leaves
        view = (await asyncio.to_thread(httpx.get, url + "/pools", timeout=10)).json()
        held = {p["address"]: p["router_in_flight"] for p in view["pods"]}
        if held.get(a, 0) >= 1 and sum(held.values()) == 4:
            break
        assert time.monotonic() < deadline, held
        await asyncio.sleep(0.02)
    proc_a = pods[hosts[0]][0]
    records.set(NAME, [hosts[1]])
    proc_a.send_signal(signal.SIGTERM)
    left_at = time.monotonic()
    meanwhile = [await short(100 + i) for i in range(10)]  # one after another, during it
    assert meanwhile == ["length"] * 10
    assert await asyncio.gather(*streams) == [(LONG, "length")] * 4
    await _wait_members(url, [b])
    assert await asyncio.to_thread(proc_a.wait, 30) == 0
    assert time.monotonic() - left_at < 30  # within its drain timeout

    # DNS down: the router keeps the pool it has and goes on serving.
    records.failing = True
    asked = records.queries
    while records.queries < asked + 4:
        await asyncio.sleep(0.1)
    assert await asyncio.to_thread(_members, url) == [b]
    assert await short(200) == "length"
    records.failing = False

    # The name disappears (the Service has no pod): no decode pod, a clean 503 ...
    records.set(NAME, None)
    await _wait_members(url, [])
    with pytest.raises(openai.APIStatusError) as err:
        await short(300)
    assert err.value.status_code == 503
    # ... and it comes back without a restart.
    records.set(NAME, [hosts[1]])
    await _wait_members(url, [b])
    deadline = time.monotonic() + 10
    while httpx.get(url + "/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert await short(301) == "length"

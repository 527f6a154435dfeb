"""Service discovery: which pods are in each pool, from fixed addresses and DNS names.

An endpoint is either one pod, ``host:port``, or a DNS name that stands for many,
``dns:NAME:PORT`` -- in Kubernetes the name of a headless Service, whose A/AAAA records are
the addresses of its ready pods (``dns:pdserve-decode.NAMESPACE.svc.cluster.local:50061``).
Every ``interval`` seconds each name is resolved again (all its A and AAAA records) and the
pool is set to the fixed addresses plus what the names resolve to (``Pools.set_members``):
new pods join, pods that left the answer take no new request and are closed once their last
request is over. A name that does not exist or has no records (NXDOMAIN, no answer) means
no pods; a lookup that fails (timeout, SERVFAIL, refused) keeps that name's last answer, so
a DNS hiccup never empties a pool. Whether a pod in the pool takes requests is still its
health's say (``router.pools``): DNS decides membership, health decides use.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from router.pools import Pools, Role

DNS_SCHEME = "dns:"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DnsEndpoint:
    """``dns:NAME:PORT``: every address NAME resolves to, on PORT."""

    name: str
    port: int

    def __str__(self) -> str:
        return f"{DNS_SCHEME}{self.name}:{self.port}"


Endpoint = str | DnsEndpoint  # a str is one pod's host:port


def parse_endpoint(text: str) -> Endpoint:
    """``host:port`` or ``dns:NAME:PORT``; ValueError with the reason otherwise."""
    spec = text.strip()
    rest = spec[len(DNS_SCHEME):] if spec.startswith(DNS_SCHEME) else spec
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port or dns:NAME:PORT, got {text!r}")
    if spec.startswith(DNS_SCHEME):
        if host.startswith("/") or "[" in host:
            raise ValueError(f"{text!r}: write dns:NAME:PORT with a DNS name, e.g. "
                             "dns:pdserve-decode.default.svc.cluster.local:50061")
        return DnsEndpoint(host, int(port))
    return spec


def parse_endpoints(text: str) -> list[Endpoint]:
    """A comma-separated list of endpoints (what --decode and --prefill take)."""
    return [parse_endpoint(part) for part in text.split(",") if part.strip()]


def address(ip: str, port: int) -> str:
    """host:port as gRPC dials it (IPv6 in brackets)."""
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


class LookupFailed(Exception):
    """The DNS server could not answer (not "no such name": that is an empty answer)."""


@dataclass(slots=True)
class DnsResolver:
    """A/AAAA look-ups, through the system's resolver configuration (/etc/resolv.conf, its
    search list too, as kubelet writes it into a pod) or a given server."""

    server: tuple[str, int] | None = None  # None: /etc/resolv.conf
    timeout: float = 2.0
    _resolver: dns.asyncresolver.Resolver | None = field(default=None, init=False)

    def _configured(self) -> dns.asyncresolver.Resolver:
        """Built on first use: a router with fixed endpoints only never reads resolv.conf."""
        if self._resolver is None:
            if self.server is None:
                try:
                    resolver = dns.asyncresolver.Resolver(configure=True)
                except dns.exception.DNSException as exc:  # no usable /etc/resolv.conf
                    raise LookupFailed(f"no DNS configuration: {exc}") from None
            else:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [dns.nameserver.Do53Nameserver(*self.server)]
            resolver.lifetime = resolver.timeout = self.timeout
            resolver.cache = None  # every round asks afresh (headless answers have TTL 30s)
            self._resolver = resolver
        return self._resolver

    async def lookup(self, name: str) -> list[str]:
        """Every IPv4 and IPv6 address of ``name``, sorted; [] if it has none."""
        results = await asyncio.gather(*(self._query(name, rdtype) for rdtype in ("A", "AAAA")))
        return sorted({ip for ips in results for ip in ips})

    async def _query(self, name: str, rdtype: str) -> list[str]:
        try:
            answer = await self._configured().resolve(name, rdtype,
                                                      search=self.server is None)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise LookupFailed(f"{rdtype} {name}: {type(exc).__name__}: {exc}") from None
        return [rr.address for rr in answer]


@dataclass(slots=True)
class _NameState:
    addresses: list[str] | None = None  # the last answer (None: none yet)
    last_error: str = ""
    resolved_at: float = 0.0  # time.monotonic() of the last answer


@dataclass(slots=True)
class Discovery:
    """Keeps ``pools`` equal to what each role's endpoints stand for, one round every
    ``interval`` seconds."""

    pools: Pools
    endpoints: dict[Role, list[Endpoint]]
    resolver: DnsResolver = field(default_factory=DnsResolver)
    interval: float = 2.0
    _names: dict[DnsEndpoint, _NameState] = field(default_factory=dict, init=False)
    _task: asyncio.Task | None = field(default=None, init=False)

    @property
    def dynamic(self) -> bool:
        return any(isinstance(e, DnsEndpoint) for es in self.endpoints.values() for e in es)

    async def refresh(self) -> None:
        """One round: resolve every name (concurrently), then set each pool."""
        names = list(dict.fromkeys(e for es in self.endpoints.values() for e in es
                                   if isinstance(e, DnsEndpoint)))
        await asyncio.gather(*(self._resolve(n) for n in names))
        for role, endpoints in self.endpoints.items():
            self.pools.set_members(role, self._addresses(endpoints))

    async def _resolve(self, endpoint: DnsEndpoint) -> None:
        state = self._names.setdefault(endpoint, _NameState())
        try:
            ips = await self.resolver.lookup(endpoint.name)
        except LookupFailed as exc:
            if state.last_error != str(exc):
                log.warning("discovery: %s: %s (keeping the last answer)", endpoint, exc)
            state.last_error = str(exc)
            return
        state.addresses = [address(ip, endpoint.port) for ip in ips]
        state.last_error, state.resolved_at = "", time.monotonic()

    def _addresses(self, endpoints: Iterable[Endpoint]) -> list[str]:
        out: list[str] = []
        for endpoint in endpoints:
            if isinstance(endpoint, DnsEndpoint):
                out += self._names.get(endpoint, _NameState()).addresses or []
            else:
                out.append(endpoint)
        return out

    async def start(self) -> None:
        """The first round now, then one every ``interval`` seconds if any name is given."""
        await self.refresh()
        if self.dynamic:
            self._task = asyncio.create_task(self._run(), name="pdserve-router-discovery")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:  # a bug must not end discovery for the router's lifetime
                log.exception("discovery round failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def describe(self) -> list[dict]:
        now = time.monotonic()
        return [{"endpoint": str(e), "addresses": s.addresses, "last_error": s.last_error or None,
                 "seconds_since_answer": round(now - s.resolved_at, 3) if s.resolved_at else None}
                for e, s in self._names.items()]

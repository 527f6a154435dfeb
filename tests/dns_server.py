"""A real DNS server on 127.0.0.1 for discovery tests (dnslib), whose answers a test changes
while it runs -- what a Kubernetes headless Service's records do as pods come and go.

``records[name]`` is the list of addresses of ``name`` (A for IPv4, AAAA for IPv6, TTL 0);
a name that is absent is NXDOMAIN; ``failing = True`` answers SERVFAIL to everything (a DNS
outage). UDP and TCP on the same port, as a resolver may use either. ``queries`` counts
questions, so a test can wait for the router to have asked again.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


@dataclass
class Records(BaseResolver):
    records: dict[str, list[str]] = field(default_factory=dict)
    failing: bool = False
    queries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, name: str, addresses: list[str] | None) -> None:
        """Answer ``name`` with ``addresses`` from now on (None: NXDOMAIN)."""
        with self.lock:
            if addresses is None:
                self.records.pop(name.rstrip("."), None)
            else:
                self.records[name.rstrip(".")] = list(addresses)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".")
        with self.lock:
            self.queries += 1
            if self.failing:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            addresses = self.records.get(qname)
        if addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for ip in addresses:
            v6 = ipaddress.ip_address(ip).version == 6
            if request.q.qtype == (QTYPE.AAAA if v6 else QTYPE.A):
                reply.add_answer(RR(request.q.qname, request.q.qtype,
                                    rdata=AAAA(ip) if v6 else A(ip), ttl=0))
        return reply


def _free_udp_and_tcp_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as t:
                t.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port for the DNS server")


@contextmanager
def dns_server() -> Iterator[tuple[Records, int]]:
    """A running server: (its records, its port on 127.0.0.1)."""
    records = Records()
    port = _free_udp_and_tcp_port()
    quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    servers = [DNSServer(records, address="127.0.0.1", port=port, tcp=tcp, logger=quiet)
               for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    try:
        yield records, port
    finally:
        for server in servers:
            server.stop()
            server.server.server_close()

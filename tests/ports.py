"""Free TCP ports for the servers tests start.

A port is drawn below Linux's ephemeral range, where the kernel never hands out ports for
``bind(port=0)`` or outgoing connections: a port the test has chosen but whose server has
not bound it yet cannot be taken meanwhile by a socket that asked for any free port. The
band sits above the one ``pdserve up`` draws its pods' ports from (pdserve/fleet.py).
"""

from __future__ import annotations

from pdserve.fleet import ephemeral_low, free_port_between

LOW = 20000


def free_port() -> int:
    return free_port_between("127.0.0.1", LOW, max(LOW, ephemeral_low() - 1))

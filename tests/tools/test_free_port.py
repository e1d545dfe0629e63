"""The private stacks' ports: distinct, and never ones an outgoing connection can take."""

from __future__ import annotations

import socket
from pathlib import Path

from tools import devstack


def _ephemeral_range() -> range:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return range(int(low), int(high) + 1)


def test_free_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    # A private stack takes 13 at once; 100 is well past what one test ever needs.
    ports = [devstack.free_port() for _ in range(100)]
    assert len(set(ports)) == len(ports)
    ephemeral = _ephemeral_range()
    assert not [p for p in ports if p in ephemeral]


def test_a_port_something_listens_on_is_never_handed_out() -> None:
    listeners = []
    try:
        for port in devstack.FREE_PORTS[:200]:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            s.listen()
            listeners.append(s)
        taken = {s.getsockname()[1] for s in listeners}
        assert not taken & {devstack.free_port() for _ in range(100)}
    finally:
        for s in listeners:
            s.close()

"""Ports for child processes come from below the kernel's ephemeral range."""

from __future__ import annotations

import random
import socket

from heteroscale.net import ephemeral_low, free_ports


def test_ports_are_distinct_bindable_and_never_ephemeral():
    low = ephemeral_low()
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(1024 <= p < low for p in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_taken_port_is_skipped():
    # hold a port from the range and make the rng offer it first
    taken = free_ports(1)[0]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()

        class FirstTaken(random.Random):
            calls = 0

            def randrange(self, start, stop=None, step=1):
                FirstTaken.calls += 1
                return taken if FirstTaken.calls == 1 else super().randrange(start, stop)

        (port,) = free_ports(1, rng=FirstTaken(7))
        assert port != taken and FirstTaken.calls >= 2

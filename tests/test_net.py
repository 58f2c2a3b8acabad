"""Ports for child processes come from below the kernel's ephemeral range."""

from __future__ import annotations

import random
import re
import socket

import pytest

from heteroscale.net import ephemeral_low, free_ports, parse_host_port


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


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9400", ("127.0.0.1", 9400)),
    (":9400", ("0.0.0.0", 9400)),                  # empty host: the default
    ("[::1]:9500", ("::1", 9500)),                 # IPv6 in brackets
    ("0.0.0.0:0", ("0.0.0.0", 0)),                 # port 0: any free port
])
def test_parse_host_port_accepts(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text, kwargs, words", [
    ("nowhere", {}, "must be HOST:PORT, got 'nowhere'"),
    ("host:http", {}, "must be HOST:PORT"),
    ("host:70000", {}, "port in 0..65535"),
    ("host:0", {"allow_port_zero": False}, "port in 1..65535"),
    (":9400", {"require_host": True}, "with a host"),
])
def test_parse_host_port_names_the_problem(text, kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_host_port(text, **kwargs)

"""``parallel.free_port``: a port a rendezvous can bind, outside the range the kernel gives outgoing connections."""

import random
import socket

from megatron_elastic.parallel import _first_ephemeral_port, free_port


def test_free_ports_lie_below_the_ephemeral_range_and_can_be_bound():
    first_ephemeral = _first_ephemeral_port()
    with socket.socket() as outgoing_like:  # what the kernel hands out: the range free_port keeps away from
        outgoing_like.bind(("127.0.0.1", 0))
        assert outgoing_like.getsockname()[1] >= first_ephemeral
    for _ in range(20):
        port = free_port()
        assert port < first_ephemeral
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_processes_seeded_alike_draw_different_ports():
    """Every test process seeds Python's generator alike; the draw must not follow it."""
    ports = []
    for _ in range(5):
        random.seed(1234)
        ports.append(free_port())
    assert len(set(ports)) > 1, ports


def test_a_port_in_use_is_drawn_again(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        taken = held.getsockname()[1]
        draws = iter([taken, taken, taken + 1 if taken + 1 < _first_ephemeral_port() else taken - 1])
        monkeypatch.setattr(random.SystemRandom, "randrange", lambda self, lo, hi: next(draws))
        port = free_port()
        assert port != taken and abs(port - taken) == 1

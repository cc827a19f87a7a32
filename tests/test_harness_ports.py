"""The test harness's ports: a server started a moment after `free_port()` must be able to bind it.

CI once failed with "cannot listen on port …: Address already in use": the port came from bind(0), i.e. from the
kernel's ephemeral range, and an outgoing connection was given it as its local port before the gateway bound it.
"""
from __future__ import annotations

import socket

from tests.harness import _bindable, _ephemeral_range, free_port


def test_ports_come_from_outside_the_ephemeral_range_and_are_never_repeated() -> None:
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(not (low <= port <= high) for port in ports), [p for p in ports if low <= p <= high]
    assert all(1024 <= port <= 65535 for port in ports)


def test_a_port_someone_listens_on_is_not_bindable() -> None:
    port = free_port()
    assert _bindable(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        assert not _bindable(port)
    assert _bindable(port)


def test_outgoing_connections_never_get_a_handed_out_port() -> None:
    """Many outgoing connections (the thing that took the gateway's port in CI) land only in the ephemeral
    range, so none of them can sit on a port free_port() hands out."""
    low, high = _ephemeral_range()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        address = listener.getsockname()
        clients = [socket.create_connection(address, timeout=5) for _ in range(200)]
        try:
            local_ports = {c.getsockname()[1] for c in clients}
        finally:
            for c in clients:
                c.close()
    assert all(low <= p <= high for p in local_ports)
    handed_out = {free_port() for _ in range(50)}
    assert not handed_out & local_ports


def test_a_machine_whose_ephemeral_range_covers_every_port_still_gets_ports(monkeypatch) -> None:
    import tests.harness as harness
    monkeypatch.setattr(harness, "_ephemeral_range", lambda: (1024, 65535))
    assert len(harness._listen_candidates()) == 0
    ports = [harness.free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    assert all(harness._bindable(p) for p in ports)

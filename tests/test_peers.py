"""The kernel's word for who is calling (agent.peers), on real sockets."""

from __future__ import annotations

import os
import socket
import time

import pytest

from agent.peers import AccountGroups, identify, unix_peer

HOSTS = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]


@pytest.mark.parametrize(("family", "host"), HOSTS)
def test_tcp_peer_is_the_client_sockets_owner(family: int, host: str) -> None:
    with socket.create_server((host, 0), family=family) as server:
        client = socket.create_connection(server.getsockname()[:2])
        accepted, _ = server.accept()
        with client, accepted:
            peer = identify(accepted, AccountGroups())
    assert (peer.listener, peer.uid) == ("tcp", os.geteuid())


@pytest.mark.parametrize(("family", "host"), HOSTS)
def test_a_client_that_closed_its_socket_is_nobody(family: int, host: str) -> None:
    """After close() the kernel keeps a time-wait entry for the client's end, which reports
    uid 0: it must never pass for root (a request sent, then the socket closed)."""
    with socket.create_server((host, 0), family=family) as server:
        client = socket.create_connection(server.getsockname()[:2])
        accepted, _ = server.accept()
        with accepted:
            client.sendall(b"POST /login HTTP/1.1\r\n\r\n")
            client.close()
            deadline = time.monotonic() + 5
            while True:  # the kernel finishes the close asynchronously (it is quick on loopback)
                peer = identify(accepted, AccountGroups())
                if peer.uid is None or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
    assert peer.uid is None, peer


def test_half_closed_client_keeps_its_identity() -> None:
    """shutdown(SHUT_WR) leaves the socket open in its process: still the same owner."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2])
        accepted, _ = server.accept()
        with client, accepted:
            client.shutdown(socket.SHUT_WR)
            assert accepted.recv(1) == b""  # the FIN has arrived
            assert identify(accepted, AccountGroups()).uid == os.geteuid()


def test_unix_peer_has_pid_and_groups() -> None:
    left, right = socket.socketpair()
    with left, right:
        peer = unix_peer(left)
    assert (peer.uid, peer.gid, peer.pid) == (os.geteuid(), os.getegid(), os.getpid())
    assert set(os.getgroups()) | {os.getegid()} <= peer.groups

"""bench/peers.py's helpers: the drops of a UDP socket, read while it lives (what reached iperf3's server), and the
machine its table names."""

from __future__ import annotations

import os
import socket
import time

import pytest

from bench.peers import machine, socket_drops
from overlay._fast import GCM

SENT = 400


@pytest.mark.parametrize("family,address", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_socket_drops_counts_what_a_full_receive_buffer_dropped_and_keeps_it_after_the_socket_closes(
    family: socket.AddressFamily, address: str
) -> None:
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel's minimum: a few datagrams fit
        rx.bind((address, 0))
        port = rx.getsockname()[1]
        with socket_drops(os.getpid(), port) as drops:
            for _ in range(SENT):
                tx.sendto(b"x" * 64, (address, port))
            rx.setblocking(False)
            kept = 0
            with pytest.raises(BlockingIOError):
                while True:
                    rx.recv(2048)
                    kept += 1
            deadline = time.monotonic() + 5.0
            while drops[0] != SENT - kept and time.monotonic() < deadline:
                time.sleep(0.01)
            assert 0 < kept < SENT
            assert drops[0] == SENT - kept
            rx.close()  # as iperf3 closes the test's socket when the test ends
            time.sleep(0.2)
        assert drops[0] == SENT - kept
    finally:
        rx.close()
        tx.close()


def test_socket_drops_says_none_when_no_socket_was_on_the_port() -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # a port nothing listens on now
    with socket_drops(os.getpid(), port) as drops:
        time.sleep(0.2)
    assert drops[0] is None


def test_machine_names_the_cpu_and_the_features_the_link_cipher_runs_on() -> None:
    avx2_only = (
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 aes pclmulqdq avx avx2 bmi2\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 aes pclmulqdq avx avx2 bmi2\n"
    )
    host = machine(avx2_only)
    assert host["cpu"] == "AMD EPYC"
    assert host["cpu_features"] == ["aes", "pclmulqdq", "avx2"]
    assert host["cipher"] == GCM  # what a node started from this environment runs (overlay/status.py's "cipher")
    vaes = machine("model name : Xeon\nflags : aes avx2 avx512f vaes vpclmulqdq pclmulqdq\n")
    assert vaes["cpu_features"] == ["aes", "pclmulqdq", "avx2", "avx512f", "vaes", "vpclmulqdq"]
    assert machine("")["cpu_features"] == []

"""The namespace lab itself: connectivity, UDP blocking, and that it leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.netlab import Host, NetLab

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

PORT = 40404
# Receives for at most 2 s and prints how many datagrams arrived: bounded whatever the network does.
RECEIVER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
deadline, got = time.monotonic() + 2.0, 0
while (left := deadline - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        s.recv(2048)
    except TimeoutError:
        break
    got += 1
    if got == 3:
        break
print(got, flush=True)
"""
SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    s.sendto(b"probe", (sys.argv[1], int(sys.argv[2])))
print("sent", flush=True)
"""


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def udp_datagrams_received(lab: NetLab, sender: Host, receiver: Host) -> int:
    rx = lab.popen(
        receiver,
        sys.executable,
        "-c",
        RECEIVER,
        receiver.address,
        str(PORT),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert rx.stdout is not None
    assert rx.stdout.readline().strip() == "ready"
    sent = lab.run(sender, sys.executable, "-c", SENDER, receiver.address, str(PORT), timeout=10)
    assert sent.stdout.strip() == "sent", "a silent drop must not fail the send (INPUT, not OUTPUT, chain)"
    out, _ = rx.communicate(timeout=10)
    return int(out.strip())


def test_two_hosts_ping_each_other() -> None:
    with NetLab() as lab:
        lab.add_hub()
        a, b = lab.add_host("a"), lab.add_host("b")
        assert a.address != b.address
        assert a.address.startswith("198.18.")
        lab.run(a, "ping", "-c", "1", "-W", "2", b.address, timeout=10)
        lab.run(b, "ping", "-c", "1", "-W", "2", a.address, timeout=10)


def test_block_udp_drops_udp_both_ways_but_not_ping() -> None:
    with NetLab() as lab:
        lab.add_hub()
        a, b, c = lab.add_host("a"), lab.add_host("b"), lab.add_host("c")
        assert udp_datagrams_received(lab, a, b) == 3
        lab.block_udp(a, b)
        assert udp_datagrams_received(lab, a, b) == 0
        assert udp_datagrams_received(lab, b, a) == 0
        assert udp_datagrams_received(lab, c, b) == 3, "only the a<->b pair is blocked"
        lab.run(a, "ping", "-c", "1", "-W", "2", b.address, timeout=10)


def test_lab_removes_namespaces_and_processes_even_after_an_exception() -> None:
    with pytest.raises(RuntimeError), NetLab() as lab:
        lab.add_hub()
        a = lab.add_host("a")
        sleeper = lab.popen(a, "sleep", "60")
        assert lab.prefix in namespaces()
        raise RuntimeError("test body failed")
    assert lab.prefix not in namespaces()
    assert sleeper.poll() is not None, "the process the lab started must be stopped"


def test_lab_refuses_subnets_outside_the_benchmarking_range() -> None:
    with NetLab() as lab, pytest.raises(ValueError):
        lab.add_hub("10.0.0.0/24")
    assert lab.prefix not in namespaces()

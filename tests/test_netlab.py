"""The namespace lab itself: connectivity, NAT clusters, UDP blocking, and that it leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path

import pytest

from tests.support.natlab import NatAgent
from tests.support.netlab import LAB_RANGE, Host, NetLab

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


# -- NAT clusters ------------------------------------------------------------------------------------------


def ip_forward(lab: NetLab, host: Host) -> str:
    return lab.run(host, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip()


def test_cluster_hosts_get_private_addresses_behind_a_router_that_forwards_only_in_its_namespace() -> None:
    root_forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    with NetLab() as lab:
        lab.add_hub()
        public = lab.add_host("pub")
        cone = lab.add_cluster("a", "cone")
        symmetric = lab.add_cluster("s", "symmetric")
        a, s = lab.add_host("ha", cluster="a"), lab.add_host("hs", cluster="s")
        assert ip_address(a.address) in cone.subnet and ip_address(s.address) in symmetric.subnet
        assert not cone.subnet.overlaps(symmetric.subnet) and not cone.subnet.overlaps(lab.public_subnet)
        assert cone.subnet.subnet_of(LAB_RANGE) and symmetric.subnet.subnet_of(LAB_RANGE)
        assert ip_address(cone.public_address) in lab.public_subnet
        assert lab.seen_address(a, public) == cone.public_address
        assert f"default via {cone.gateway}" in lab.run(a, "ip", "route").stdout
        assert ip_forward(lab, cone.router) == ip_forward(lab, symmetric.router) == "1"
        assert ip_forward(lab, a) == ip_forward(lab, public) == "0"
        assert "--random-fully" in lab.run(symmetric.router, "iptables", "-t", "nat", "-S").stdout
        assert "--random-fully" not in lab.run(cone.router, "iptables", "-t", "nat", "-S").stdout
        lab.run(a, "ping", "-c", "1", "-W", "2", public.address, timeout=10)
        lab.run(s, "ping", "-c", "1", "-W", "2", public.address, timeout=10)
        # Even with a route to the LAN, nothing from outside reaches it unsolicited: the router drops it.
        lab.run(public, "ip", "route", "add", str(cone.subnet), "via", cone.public_address)
        assert lab.run(public, "ping", "-c", "1", "-W", "1", a.address, check=False, timeout=10).returncode != 0
        # The second LAN host reaches the first directly, without NAT.
        b = lab.add_host("hb", cluster="a")
        assert lab.seen_address(b, a) == b.address
        lab.run(b, "ping", "-c", "1", "-W", "2", a.address, timeout=10)
        routers = [cone.router.netns, symmetric.router.netns]
        assert all(r in namespaces() for r in routers)
    assert lab.prefix not in namespaces(), "routers and cluster hosts must be removed too"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == root_forwarding


def test_add_address_gives_a_host_a_second_reachable_address() -> None:
    with NetLab() as lab:
        lab.add_hub()
        a, b = lab.add_host("a"), lab.add_host("b")
        second = lab.add_address(a)
        assert second not in (a.address, b.address) and lab.addresses(a) == [a.address, second]
        lab.run(b, "ping", "-c", "1", "-W", "2", second, timeout=10)


def test_lab_refuses_cluster_kinds_and_subnets_it_cannot_build() -> None:
    with NetLab() as lab:
        lab.add_hub()
        with pytest.raises(ValueError, match="NAT kind"):
            lab.add_cluster("a", "full-cone")
        with pytest.raises(ValueError, match="outside"):
            lab.add_cluster("a", "cone", subnet="192.168.1.0/24")
        with pytest.raises(ValueError, match="overlaps"):
            lab.add_cluster("a", "cone", subnet="198.18.0.0/24")
        with pytest.raises(ValueError, match="no cluster"):
            lab.add_host("h", cluster="nope")


def test_block_udp_across_a_nat_drops_both_ways_at_the_router() -> None:
    with NetLab() as lab:
        lab.add_hub()
        public, other = lab.add_host("pub"), lab.add_host("other")
        lab.add_cluster("a", "cone")
        lab.add_cluster("b", "cone")
        inside, elsewhere = lab.add_host("ha", cluster="a"), lab.add_host("hb", cluster="b")
        with NatAgent(lab, inside) as host, NatAgent(lab, public) as far, NatAgent(lab, other) as near:
            host.send(far.local, b"before")
            (first,) = far.recv(2.0, count=1)
            lab.block_udp(inside, public)
            host.send(far.local, b"after", count=3)
            assert far.recv(0.5) == [], "outbound UDP crossed the block"
            far.send(first.source, b"inbound", count=3)
            assert host.recv(0.5) == [], "inbound UDP on an established mapping crossed the block"
            host.send(near.local, b"other pair")
            (got,) = near.recv(2.0, count=1)
            near.send(got.source, b"still open")
            assert [d.data for d in host.recv(2.0, count=1)] == [b"still open"], "only the blocked pair is cut"
        with pytest.raises(ValueError, match="two NATs"):
            lab.block_udp(inside, elsewhere)

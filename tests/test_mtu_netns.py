"""An underlay whose MTU is below 1,500 bytes (a VXLAN or cloud network: 1,450, 1,460): every link of the lab
is 1,400 bytes. Full-size packets and TCP super-frames cross direct, through a relay, from and to a member on the
Python data path, and no node's kernel makes an IP fragment: each path's chunks are cut for its route's MTU
(overlay/transport/chunks.py), where fixed 1,500-byte chunks were refused by the kernel and every super-frame
went whole, as ~45 IP fragments, at a third of the throughput (docs/datapath.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.support.group import Group, missing_prerequisites
from tests.support.netlab import HOST_IFNAME

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(missing_prerequisites() is not None, reason=str(missing_prerequisites())),
    pytest.mark.timeout(300),
]

MTU = 1400
SIZE = 4
PYTHON_PATH = 2  # [vnic] fast_path = false: its underlay cuts its own chunks
BLOCKED = (0, 3)  # their traffic crosses a relay
IPERF_S = 2
# A ping whose IPv4 packet fills the TAP's MTU (1,400 bytes: 20 of IP, 8 of ICMP), not to be fragmented inside.
FULL_PING = 1400 - 28


@pytest.fixture(scope="module")
def group() -> Iterator[Group]:
    with Group(SIZE, prefix="ipm", python_path=[PYTHON_PATH], mtu=MTU) as g:
        g.block_udp(*BLOCKED)
        g.join_all()
        yield g


def fragments_made(group: Group) -> dict[int, int]:
    """IP fragments each member's kernel has made so far (its namespace's Ip FragCreates)."""
    made = {}
    for i, m in enumerate(group.members):
        lines = [line.split() for line in group.lab.run(m.host, "cat", "/proc/net/snmp").stdout.splitlines()]
        names, values = [line for line in lines if line[0] == "Ip:"][:2]
        made[i] = int(values[names.index("FragCreates")])
    return made


def test_the_lab_is_a_small_mtu_underlay(group: Group) -> None:
    out = group.lab.run(group.members[0].host, "ip", "-j", "link", "show", HOST_IFNAME).stdout
    assert json.loads(out)[0]["mtu"] == MTU


def test_full_size_packets_cross_without_ip_fragments(group: Group) -> None:
    pairs = [(0, 1), (0, PYTHON_PATH), (PYTHON_PATH, 0), BLOCKED]
    failed = [p for p, t in group.wait_for_pings(pairs, timeout=60.0).items() if t is None]
    assert failed == [], f"no reply: {failed}"
    assert not group.direct_link(group.status(BLOCKED[0]), BLOCKED[1])
    before = fragments_made(group)
    for i, j in pairs:
        out = group.lab.run(
            group.members[i].host, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-M", "do",
            "-s", str(FULL_PING), group.members[j].ip, check=False,
        )  # fmt: skip
        assert " 0% packet loss" in out.stdout, f"node{i} -> node{j}: {out.stdout[-300:]}"
    assert fragments_made(group) == before


@pytest.mark.parametrize(
    "a, b",
    [(0, 1), (0, PYTHON_PATH), (PYTHON_PATH, 0), BLOCKED],
    ids=["compiled-compiled", "compiled-python", "python-compiled", "relayed"],
)
def test_tcp_super_frames_cross_as_chunks_for_the_path(group: Group, a: int, b: int) -> None:
    before = fragments_made(group)
    received = group.iperf3(a, b, IPERF_S)["end"]["sum_received"]
    assert received["bytes"] > 1_000_000
    print(f"TCP node{a} -> node{b} over a {MTU}-byte underlay: {received['bits_per_second'] / 1e6:.0f} Mbit/s")
    made = fragments_made(group)
    assert made == before, f"IP fragments made during the run: { {i: made[i] - before[i] for i in made} }"
    if a != PYTHON_PATH:
        counters = group.status(a)["counters"]
        assert counters.get("fast path: frames sent", 0) > 100, counters


def test_chunks_that_arrive_one_by_one_are_rebuilt_by_the_receiving_engine(group: Group) -> None:
    """With its UDP segmentation done in software (as for a NIC without it), node 0's chunk trains reach node 1
    as single datagrams, not coalesced by GRO: node 1's Engine rebuilds the messages itself rather than passing
    every chunk up to Python (docs/datapath.md)."""
    host = group.members[0].host
    group.lab.run(host, "ethtool", "-K", HOST_IFNAME, "tx-udp-segmentation", "off")
    try:
        before = group.status(1)["counters"]
        received = group.iperf3(0, 1, IPERF_S)["end"]["sum_received"]
        after = group.status(1)["counters"]
    finally:
        group.lab.run(host, "ethtool", "-K", HOST_IFNAME, "tx-udp-segmentation", "on")
    assert received["bytes"] > 1_000_000

    def grew(name: str) -> int:
        return int(after.get(name, 0) - before.get(name, 0))

    assert grew("fast path: chunks: messages rebuilt") > 100, after
    assert grew("fast path: datagrams passed up") < 50, after

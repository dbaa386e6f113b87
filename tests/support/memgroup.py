"""A group of real nodes in one process: memory underlay, memory XMPP room, memory TAPs.

Everything above the sockets is the node's own code (links, crypto, routing, maintenance, DHT, VirtualNic);
only the underlay, the XMPP server and the TAP device are the in-memory twins.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import struct
import time
from dataclasses import dataclass, field

from overlay.configvalues import resolve_address6
from overlay.dht.records import make_record
from overlay.identity import Identity
from overlay.node import Node, NodeSettings
from overlay.remembered import Remembered
from overlay.routing.maintenance import DEAD_GRACE
from overlay.routing.ring import RingParams, SortedRing
from overlay.tap.device import MemoryTap
from overlay.tap.frames import ETH_P_IP, ETH_P_IPV6, ethernet_frame, internet_checksum
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC
from overlay.transport.memory import MemoryNetwork, MemoryUnderlay
from overlay.trust.groupkey import GroupKey
from overlay.trust.issuer import Issuer, make_request
from overlay.trust.members import GroupTrust
from xmpp_bootstrap import MemoryBootstrap, MemoryRoom

ROOM = "group1@conference.example.test"


def udp_packet(src: str, dst: str, payload: bytes) -> bytes:
    """A valid IPv4/UDP packet (checksummed header) as the kernel would hand it to the TAP."""
    total = 20 + 8 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0x4000,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return header + struct.pack("!HHHH", 4000, 4000, 8 + len(payload), 0) + payload


def udp6_packet(src: str, dst: str, payload: bytes) -> bytes:
    """A valid IPv6/UDP packet (UDP checksum over the RFC 8200 §8.1 pseudo-header) as the kernel would send it."""
    addresses = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", 4000, 4000, length, 0) + payload
    checksum = internet_checksum(addresses + struct.pack("!I3xB", length, 17) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", checksum) + udp[8:]
    return struct.pack("!IHBB", 6 << 28, length, 17, 64) + addresses + udp


def vaddr(i: int) -> str:
    return str(ipaddress.IPv4Address("10.254.0.1") + i)


@dataclass
class MemoryGroup:
    seed: int = 1
    stabilize_interval: float = 0.5
    # A link silent this long is pinged (overlay/routing/maintenance.py PING_INTERVAL) and declared dead DEAD_GRACE
    # later; None: the production timers, scaled for 10 s rounds. Tests about failure detection pass a value
    # that fits the rounds above, so a crash or a cut is noticed in seconds rather than 19-32 s.
    ping_interval: float | None = None
    params: RingParams = field(default_factory=RingParams)
    on_demand_rate: float = 0.0  # off unless a test is about it: small groups relay through few nodes
    network: MemoryNetwork = field(default_factory=MemoryNetwork)
    nodes: list[Node] = field(default_factory=list)
    taps: list[MemoryTap] = field(default_factory=list)
    # A group with certificates: each node gets one from `issuer` (the group key's holder) before it starts;
    # the XMPP side of issuing is tested with a real server (tests/test_trust_netns.py).
    group_key: GroupKey | None = None
    issuer: Issuer | None = None
    cert_lifetime: float = 3600.0
    issuer_node: int | None = None  # this node runs the issuer (renewals through the overlay go to it)
    address6: str | None = None  # an IPv6 prefix ("fd00:1::/64"): each node's address is derived from its key

    def __post_init__(self) -> None:
        self.room = MemoryRoom(ROOM, [f"user{i}@example.test" for i in range(100_000)])
        self.rng = random.Random(self.seed)
        if self.group_key is not None:
            self.issuer = Issuer(self.group_key, ROOM, ipaddress.IPv4Network("10.254.0.0/16"), self.cert_lifetime)
            self.issuer.set_members({f"user{i}@example.test": "member" for i in range(1000)}, time.time())

    def trust_for(self, identity: Identity, i: int) -> GroupTrust | None:
        """Node i's trust, with the certificate the issuer gives it for vaddr(i)."""
        if self.issuer is None:
            return None
        assert self.group_key is not None
        trust = GroupTrust(self.group_key.public_key, identity.public_key, time.time)
        request = make_request(identity, ROOM, time.time(), ipaddress.IPv4Address(vaddr(i)))
        trust.set_certificate(self.issuer.issue(request, f"user{i}@example.test", time.time()))
        if self.issuer_node is not None and self.issuer_node < len(self.nodes):
            trust.issuers.add(self.nodes[self.issuer_node].id)
        return trust

    async def add_node(self) -> Node:
        return await self._start_node(len(self.nodes), Identity.from_seed(self.rng.randbytes(32)))

    async def form_ring(self, count: int, timeout: float) -> bool:
        """Add `count` nodes one after another; whether every live node's ring neighbours are right within
        `timeout` seconds after the last."""
        for _ in range(count):
            await self.add_node()
        return await self.wait_for(lambda: not self.ring_correct(), timeout)

    async def restart_node(self, i: int, remembered: list[Remembered] | None = None, *, crash: bool = False) -> Node:
        """Stop node i and start a new process of it: same key, same address, nothing else remembered but
        `remembered` (what the CLI passes when the XMPP server is unreachable, overlay/remembered.py). With
        `crash` the old process says no goodbye (its peers still hold their links to it) and the new one
        listens on the same endpoint, as a member that crashed and came back on its configured port."""
        old = self.nodes[i]
        endpoint = None
        if crash:
            old.underlay.close()  # what it sends while stopping goes nowhere
            endpoint = old.underlay.local_endpoint
        await old.stop()
        self.taps[i].close()
        return await self._start_node(i, old.identity, remembered, endpoint)

    async def _start_node(
        self,
        i: int,
        identity: Identity,
        remembered: list[Remembered] | None = None,
        endpoint: tuple[str, int] | None = None,
    ) -> Node:
        settings = NodeSettings(
            room=ROOM,
            address=f"{vaddr(i)}/16",
            address6=resolve_address6(self.address6, identity.node_id) if self.address6 else None,
            ring=self.params,
            stabilize_interval=self.stabilize_interval,
            on_demand_rate=self.on_demand_rate,
        )
        boot = MemoryBootstrap(self.room, f"user{i}@example.test/node", f"{identity.node_id:016x}")
        tap = MemoryTap(name=f"mem{i}", mac=bytes([2, 0, 0, 0, i >> 8 & 255, i & 255]))
        node = Node(
            identity,
            settings,
            MemoryUnderlay(self.network, endpoint),
            bootstrap=boot,
            tap=tap,
            rng=random.Random(self.rng.random()),
            trust=self.trust_for(identity, i),
            issuer=self.issuer if i == self.issuer_node else None,
        )
        if self.ping_interval is not None:
            node.maintenance.ping_interval = self.ping_interval
            node.maintenance.dead_after = self.ping_interval + DEAD_GRACE
        if i == len(self.nodes):
            self.nodes.append(node)
            self.taps.append(tap)
        else:
            self.nodes[i], self.taps[i] = node, tap
        await node.start(remembered)
        return node

    def ring_correct(self) -> list[int]:
        """Indices of live nodes whose successors and predecessors differ from the sorted-ID truth."""
        live = [n for n in self.nodes if not n.stopped]
        ring = SortedRing(n.id for n in live)
        k = self.params.ring_size
        return [
            i
            for i, n in enumerate(self.nodes)
            if not n.stopped
            and (
                n.table.successors() != ring.successors(n.id, k) or n.table.predecessors() != ring.predecessors(n.id, k)
            )
        ]

    async def wait_for(self, predicate, timeout: float, step: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            if predicate():
                return True
            await asyncio.sleep(step)
        return bool(predicate())

    def send(self, a: int, b: int, payload: bytes, src: str | None = None) -> bytes:
        """Node a's kernel sends a UDP packet to node b's virtual address (from `src`, default a's own address:
        another one is a spoofed source); returns the packet."""
        packet = udp_packet(src or vaddr(a), vaddr(b), payload)
        self.taps[a].inject(ethernet_frame(DEFAULT_GATEWAY_MAC, self.taps[a].mac, ETH_P_IP, packet))
        return packet

    def vaddr6(self, i: int) -> str:
        address = self.nodes[i].address6
        assert address is not None, "build the group with address6"
        return address

    def send6(self, a: int, b: int, payload: bytes, src: str | None = None) -> bytes:
        """`send` over IPv6: node a's kernel sends a UDP packet to node b's IPv6 address."""
        packet = udp6_packet(src or self.vaddr6(a), self.vaddr6(b), payload)
        self.taps[a].inject(ethernet_frame(DEFAULT_GATEWAY_MAC, self.taps[a].mac, ETH_P_IPV6, packet))
        return packet

    def received(self, b: int, packet: bytes) -> bool:
        return any(frame[14:] == packet for frame in self.taps[b].written)

    async def reach(
        self, pairs: list[tuple[int, int]], timeout: float, every: float = 2.0, v6: bool = False
    ) -> list[tuple[int, int]]:
        """Send a packet for each pair every `every` seconds until each has arrived once, as an application
        retransmits while addresses resolve; the pairs that never got through within `timeout`."""
        send = self.send6 if v6 else self.send
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        sent: dict[tuple[int, int], list[bytes]] = {pair: [] for pair in pairs}
        while True:
            waiting = [(a, b) for (a, b), ps in sent.items() if not any(self.received(b, p) for p in ps)]
            if not waiting or loop.time() >= end:
                return waiting
            for a, b in waiting:
                sent[(a, b)].append(send(a, b, f"reach {a}->{b} {len(sent[(a, b)])}".encode()))
            await asyncio.sleep(every)

    async def tunnelled_pair(self, size: int = 10) -> tuple[Node, Node]:
        """Form a group of `size`, then block the underlay between node 2 and its successor and make them link
        again: (node 2, its successor), linked through a tunnel via a neighbour both share."""
        for _ in range(size):
            await self.add_node()
        assert await self.wait_for(lambda: not self.ring_correct(), 30.0)
        a = self.nodes[2]
        b = next(n for n in self.nodes if n.id == a.table.successors()[0])
        self.network.block(a.underlay.local_endpoint, b.underlay.local_endpoint)
        a.links.close(b.id, "test")
        assert await self.wait_for(lambda: b.id in a.links.links and a.links.links[b.id].relay is not None, 30.0)
        return a, b

    async def stop(self) -> None:
        for n in self.nodes:
            await n.stop()
        for t in self.taps:
            t.close()


async def linked_pair(
    vnet_a: bool, vnet_b: bool, net: MemoryNetwork | None = None
) -> tuple[Node, Node, MemoryTap, MemoryTap]:
    """Two nodes at vaddr(0) and vaddr(1), linked directly, a with b's address record cached; on a network
    that carries big datagrams, returned once the fragment probe has passed both ways."""
    net = net or MemoryNetwork()
    nodes, taps = [], []
    for i, (address, vnet) in enumerate(((vaddr(0), vnet_a), (vaddr(1), vnet_b))):
        tap = MemoryTap(name=f"mem{i}", mac=bytes([2, 0, 0, 0, 0, i + 1]), vnet_hdr=vnet)
        node = Node(
            Identity.from_seed(bytes([i + 7]) * 32), NodeSettings(room=ROOM, address=f"{address}/16"),
            MemoryUnderlay(net), tap=tap,
        )  # fmt: skip
        await node.start()
        nodes.append(node)
        taps.append(tap)
    a, b = nodes
    a.links.connect(b.identity.public_key, b.underlay.local_endpoint)
    for _ in range(200):
        if b.id in a.links.links and a.id in b.links.links:
            break
        await asyncio.sleep(0.01)
    assert b.id in a.links.links, "the two nodes did not link"
    if net.max_datagram is None:
        for _ in range(200):
            if a.links.links[b.id].fragments_ok and b.links.links[a.id].fragments_ok:
                break
            await asyncio.sleep(0.01)
        assert a.links.links[b.id].fragments_ok, "the fragment probe did not pass"
    now = time.time()
    a.dht.cache.put(make_record(b.identity, ROOM, vaddr(1), now), now)
    return a, b, taps[0], taps[1]

"""Data between members that are not linked is sealed for the destination alone: relays forward it on the routed
header, cannot read it, cannot change it unnoticed, and cannot replay it. Whole nodes in one process."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.node import Node
from overlay.routing.ring import RingParams
from overlay.trust.groupkey import GroupKey
from overlay.wire import DecodeError, Kind, LinkMsg, Routed, decode_transport_header
from tests.support.memgroup import MemoryGroup
from tests.test_session import handshake

AUTH_DROP = "drop: end-to-end packet fails authentication"


# Ring links only: with long links a 12-node group links most pairs and redraws its long links as it settles,
# so the pair chosen as "not linked" could become linked while the test runs.
RING_ONLY = RingParams(long_links=0)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def relayed_pair(g: MemoryGroup) -> tuple[int, int]:
    assert await g.form_ring(12, 30.0)
    # With the ring whole and no long links (nor on-demand links) nothing opens links any more; the ones a
    # joiner made on its way in only close. A pair unlinked now stays unlinked.
    for a in range(12):
        for b in range(12):
            if a != b and g.nodes[b].id not in g.nodes[a].links.links and g.nodes[a].id not in g.nodes[b].links.links:
                return a, b
    raise AssertionError("every pair is linked")


def record_everything(nodes: list[Node]) -> list[bytes]:
    """What every given node decrypts from its links: link messages and sealed packets' visible parts."""
    seen: list[bytes] = []
    for n in nodes:
        cb = n.links.callbacks
        message, sealed = cb.message, cb.sealed

        def on_message(link: Any, msg: bytes, message: Any = message) -> None:
            seen.append(bytes(msg))
            message(link, msg)

        def on_sealed(link: Any, header: bytes, payload: memoryview, sealed: Any = sealed) -> None:
            seen.append(header + bytes(payload))
            sealed(link, header, payload)

        cb.message, cb.sealed = on_message, on_sealed
    return seen


def test_relays_see_no_plaintext_of_what_they_forward() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=31, params=RING_ONLY, group_key=GroupKey.from_seed(bytes([31]) * 32))
        try:
            a, b = await relayed_pair(g)
            others = [n for i, n in enumerate(g.nodes) if i not in (a, b)]
            seen = record_everything(others)
            marker = b"the secret payload 7f3a9c"
            sent = [g.send(a, b, marker + bytes([k])) for k in range(5)]
            assert await g.wait_for(lambda: any(g.received(b, p) for p in sent), 10.0)
            sealed = [m for m in seen if len(m) > 28 and m[0] == LinkMsg.ROUTED and m[27] == Kind.SEALED]
            assert sealed, "nothing sealed crossed a relay"
            assert not any(marker in m for m in seen)
            assert g.nodes[a].e2e.status()["sessions"] == 1
        finally:
            await g.stop()

    run(scenario())


def test_a_relay_that_flips_bits_cannot_get_a_changed_payload_accepted() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=32, params=RING_ONLY)
        try:
            a, b = await relayed_pair(g)
            assert await g.reach([(a, b)], 10.0) == []
            tampered = 0
            for relay in (n for i, n in enumerate(g.nodes) if i not in (a, b)):
                original = relay.router._pass_on

                def flip(link: Any, pkt: Routed, ttl: int, watermark: int, original: Any = original) -> None:
                    nonlocal tampered
                    if pkt.kind == Kind.SEALED:
                        body = bytearray(pkt.body)
                        body[len(body) // 2] ^= 0x01  # inside the ciphertext, not the tag: the link check passes
                        pkt = replace(pkt, body=bytes(body))
                        tampered += 1
                    original(link, pkt, ttl, watermark)

                relay.router._pass_on = flip  # type: ignore[method-assign]
            before = g.nodes[b].counters.get(AUTH_DROP, 0)
            changed = [g.send(a, b, f"changed in flight {k}".encode()) for k in range(4)]
            assert await g.wait_for(lambda: g.nodes[b].counters.get(AUTH_DROP, 0) >= before + 4, 10.0)
            assert tampered >= 4
            assert not any(g.received(b, p) for p in changed)
        finally:
            await g.stop()

    run(scenario())


def test_a_captured_sealed_packet_replayed_by_a_relay_is_dropped() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=33, params=RING_ONLY)
        try:
            a, b = await relayed_pair(g)
            captured: list[tuple[Node, Routed]] = []
            for relay in (n for i, n in enumerate(g.nodes) if i not in (a, b)):
                original = relay.router._pass_on

                def keep(
                    link: Any, pkt: Routed, ttl: int, watermark: int, original: Any = original, r: Node = relay
                ) -> None:
                    if pkt.kind == Kind.SEALED:
                        captured.append((r, replace(pkt, body=bytes(pkt.body))))
                    original(link, pkt, ttl, watermark)

                relay.router._pass_on = keep  # type: ignore[method-assign]
            p = g.send(a, b, b"only once")
            assert await g.wait_for(lambda: g.received(b, p), 10.0)
            assert captured
            relay, pkt = captured[-1]
            before = g.nodes[b].counters.get(AUTH_DROP, 0)
            written = len(g.taps[b].written)
            relay.router.on_routed(None, pkt)  # sent again, on a fresh link counter: only end to end can tell
            assert await g.wait_for(lambda: g.nodes[b].counters.get(AUTH_DROP, 0) == before + 1, 5.0)
            assert len(g.taps[b].written) == written
        finally:
            await g.stop()

    run(scenario())


def test_a_restarted_member_is_reached_again_at_once_though_its_peers_held_sessions_with_its_old_self() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=34, params=RING_ONLY)
        try:
            a, b = await relayed_pair(g)
            assert await g.reach([(a, b), (b, a)], 10.0) == []
            assert g.nodes[a].e2e.status()["sessions"] == 1
            await g.restart_node(b)
            assert await g.wait_for(lambda: g.nodes[b].first_link.is_set(), 10.0)
            # a still holds a session with b's old process; b says it knows no such session, a calls again.
            loop = asyncio.get_running_loop()
            start = loop.time()
            assert await g.reach([(a, b)], 15.0, every=0.5) == []
            assert loop.time() - start < 10.0
        finally:
            await g.stop()

    run(scenario())


class Wire:
    """Two EndToEnd endpoints whose routed packets reach each other at once (the overlay in between)."""

    def __init__(self) -> None:
        from overlay.identity import Identity

        a, b = Identity.from_seed(bytes([1]) * 32), Identity.from_seed(bytes([2]) * 32)
        self.a, self.b = a.node_id, b.node_id
        self.ids = {a.node_id: a, b.node_id: b}
        self.delivered: dict[int, list[bytes]] = {self.a: [], self.b: []}
        self.counters: dict[int, dict[str, int]] = {}
        self.ends: dict[int, Any] = {}
        for me in self.ids:
            self.restart(me)

    def restart(self, me: int) -> None:
        """A new EndToEnd for `me`: the same key, no sessions (a restarted process)."""
        from overlay.e2e import EndToEnd
        from overlay.transport.session import Handshaker

        other = self.b if me == self.a else self.a
        counters: dict[str, int] = {}
        self.counters[me] = counters
        e = EndToEnd(
            Handshaker(self.ids[me]),
            lambda dst, kind, body: self.ends[dst].on_routed(me, bytes(body)),
            lambda dst, packet: self._deliver(dst, me, packet),
            counters,
            time.time,
        )
        e.key_of = lambda node_id: self.ids[node_id].public_key if node_id == other else None
        self.ends[me] = e

    def _deliver(self, dst: int, src: int, packet: bytes) -> None:
        opened = self.ends[dst].open(src, packet)
        if opened is not None and opened[0] != 0:
            self.delivered[dst].append(bytes(opened[1]))


def test_a_peer_that_lost_its_sessions_says_so_and_the_sender_calls_again() -> None:
    w = Wire()
    a, b = w.a, w.b
    w.ends[a].send(b, Kind.DATA, b"before")
    assert w.delivered[b] == [b"before"]
    w.restart(b)  # b forgets every session; a still holds its own
    w.ends[a].send(b, Kind.DATA, b"lost")
    assert w.counters[b].get("drop: unknown end-to-end session") == 1
    assert w.counters[a].get("end-to-end sessions the peer no longer holds") == 1
    w.ends[a].send(b, Kind.DATA, b"after")
    assert w.delivered[b] == [b"before", b"after"]
    # A notice naming an index a does not send on changes nothing (an old one, or a forgery).
    w.ends[a].on_routed(b, bytes([4]) + (12345).to_bytes(4, "big"))
    assert w.counters[a].get("end-to-end sessions the peer no longer holds") == 1


def test_the_responder_sends_only_once_the_initiator_confirmed_the_keys() -> None:
    w = Wire()
    a, b = w.a, w.b
    w.ends[a].send(b, Kind.DATA, b"hello")
    assert w.delivered[b] == [b"hello"]
    w.ends[b].send(a, Kind.DATA, b"reply")  # on the session a started, confirmed by its keepalive
    assert w.delivered[a] == [b"reply"]
    assert w.counters[b].get("end-to-end handshakes started") is None


def test_the_link_authenticates_the_header_and_the_end_to_end_tag_and_leaves_the_body_to_the_destination() -> None:
    link_a, link_b = handshake()
    e2e_a, e2e_b = handshake()
    header = bytes(range(28))
    body = e2e_a.seal(b"\x01" + b"payload" * 20)
    size = len(link_a.seal_header(header, body))
    for i in range(size):
        # Each try on a packet of its own (a new counter): an accepted one would make the next a replay.
        packet = link_a.seal_header(header, body)
        _, counter = decode_transport_header(packet)
        bad = bytearray(packet)
        bad[i] ^= 0x80
        in_body = 13 + 44 <= i < len(packet) - 16
        try:
            opened = link_b.open_header(bytes(bad), counter)
        except DecodeError:
            assert not in_body, f"byte {i}: the body is the destination's to check, not the link's"
            continue
        assert in_body and opened == header, f"byte {i} changed without the link noticing"
        with pytest.raises(DecodeError):
            e2e_b.open(bytes(bad)[13 + 44 :], decode_transport_header(bytes(bad)[13 + 44 :])[1])
    packet = link_a.seal_header(header, body)
    _, counter = decode_transport_header(packet)
    assert link_b.open_header(packet, counter) == header
    with pytest.raises(DecodeError, match="replayed"):
        link_b.open_header(packet, counter)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_as_an_end_to_end_packet_are_dropped_and_counted(data: bytes) -> None:
    from overlay.e2e import EndToEnd
    from overlay.identity import Identity
    from overlay.transport.session import Handshaker

    counters: dict[str, int] = {}
    e2e = EndToEnd(
        Handshaker(Identity.from_seed(bytes([9]) * 32)), lambda *a: None, lambda *a: None, counters, time.time
    )
    assert e2e.open(1, data) is None
    assert sum(counters.values()) == 1
    try:
        e2e.on_routed(1, data)
    except DecodeError:
        pass

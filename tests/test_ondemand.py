"""On-demand direct links: the rules with literal times, and two in-memory nodes whose traffic moves to a link
of its own."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time

import pytest

from overlay import ondemand
from overlay.node import Node
from overlay.ondemand import HYSTERESIS, MAX_ON_DEMAND, OPEN_AFTER, RETRY_AFTER, OnDemand, Open, Release
from overlay.routing.ring import Role
from overlay.ticker import IDLE_TIMER_MAX, TIMER_MAX
from overlay.transport.signals import Signal, SignalType
from tests.support.fakeice import FakeAgent
from tests.support.group import Group, missing_prerequisites, printed_id
from tests.support.memgroup import MemoryGroup, linked_pair
from tests.support.views import one_ring, overlays, statuses

RATE = 10_000.0


def feed(od: OnDemand, now: float, peer: int, nbytes: int, links: dict[int, int] | None = None) -> list:
    od.relayed[peer] = od.relayed.get(peer, 0) + nbytes
    return od.tick(now, lambda p: (links or {}).get(p))


def test_a_pair_above_the_rate_for_a_while_is_asked_for_a_link_once() -> None:
    od = OnDemand(RATE)
    od.tick(0.0, lambda p: None)
    actions = []
    t = 0.0
    while t < OPEN_AFTER + 1:
        t += 1.0
        actions += feed(od, t, 7, int(RATE * 2))
    assert actions == [Open(7)]
    assert feed(od, t + 1, 7, int(RATE * 2)) == []  # asked already: not again before RETRY_AFTER
    assert Open(7) in feed(od, t + RETRY_AFTER + 1, 7, int(RATE * 2 * (RETRY_AFTER + 1)))


def test_a_burst_below_the_time_or_a_slow_pair_gets_nothing() -> None:
    od = OnDemand(RATE)
    od.tick(0.0, lambda p: None)
    assert feed(od, 1.0, 7, int(RATE * 5)) == []  # one hot second
    assert feed(od, 2.0, 7, int(RATE / 2)) == []  # then slow: the clock starts again
    assert feed(od, 3.0, 7, int(RATE * 5)) == []
    assert OnDemand(0).tick(1.0, lambda p: None) == []  # rate 0: disabled


def test_an_idle_on_demand_link_is_released_after_the_idle_time_and_busy_ones_are_kept() -> None:
    od = OnDemand(RATE, idle=10.0)
    od.tick(0.0, lambda p: None)
    for t in (1.0, 2.0, 3.0):
        feed(od, t, 7, int(RATE * 2))
    assert od.linked(7, 0)
    traffic = {7: 0}
    t = 3.0
    for _ in range(20):  # busy: above rate / HYSTERESIS
        t += 1.0
        traffic[7] += int(RATE / HYSTERESIS * 2)
        assert od.tick(t, traffic.get) == []
    released = []
    for _ in range(15):  # quiet: nothing moves
        t += 1.0
        released += od.tick(t, traffic.get)
    assert released == [Release(7)] and 7 not in od.links


def test_a_link_nobody_asked_for_is_not_on_demand() -> None:
    assert not OnDemand(RATE).linked(9, 0)


def test_a_link_made_meanwhile_to_a_hot_destination_is_taken_as_on_demand_up_to_the_cap() -> None:
    od = OnDemand(RATE, idle=10.0)
    od.tick(0.0, lambda p: None)
    od.relayed = {7: int(RATE * 2), 8: int(RATE / 2)}  # 7 above the rate (not asked yet: OPEN_AFTER), 8 below
    assert od.tick(1.0, lambda p: None) == []
    assert od.linked(7, 0) and 7 in od.links
    assert not od.linked(8, 0) and 8 not in od.links
    # Taken as on demand, it is watched like one it asked for: released once quiet for the idle time.
    assert [a for t in range(2, 14) for a in od.tick(float(t), {7: 0}.get)] == [Release(7)]
    full = OnDemand(RATE)
    full.links = {p: -1.0 for p in range(100, 100 + MAX_ON_DEMAND)}
    full.tick(0.0, lambda p: None)
    feed(full, 1.0, 7, int(RATE * 2), {p: 0 for p in full.links})
    assert not full.linked(7, 0)  # at the cap: the link keeps the role it was made for


async def ring_of_twelve(g: MemoryGroup) -> list[tuple[int, int]]:
    """Twelve nodes in `g` with their ring formed; every ordered pair of them, in one fixed shuffled order."""
    assert await g.form_ring(12, 30.0)
    pairs = [(i, j) for i in range(12) for j in range(12) if i != j]
    random.Random(5).shuffle(pairs)
    return pairs


def test_traffic_between_two_relayed_nodes_moves_to_a_direct_link() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=23, on_demand_rate=2_000.0)
        try:
            pairs = await ring_of_twelve(g)
            for a, b in pairs:
                if g.nodes[b].id in g.nodes[a].links.links:
                    continue
                assert await g.reach([(a, b)], 15.0) == []
                payload = b"x" * 1000
                for _ in range(80):  # ~4 KB/s for a few seconds, twice the rate
                    g.send(a, b, payload)
                    await asyncio.sleep(0.25)
                    if g.nodes[b].id in g.nodes[a].links.links:
                        break
                link = g.nodes[a].links.links.get(g.nodes[b].id)
                assert link is not None and link.relay is None, "no on-demand link"
                if g.nodes[a].counters.get("on-demand switches"):
                    break
                # Maintenance linked the pair meanwhile (a long link drawn while the group settles): the traffic
                # took that link and nothing was asked on demand. Try another pair.
            assert g.nodes[a].counters.get("on-demand switches") == 1
            before = g.nodes[b].data_hops[0], g.nodes[b].data_hops[1]
            p = g.send(a, b, b"direct now")
            assert await g.wait_for(lambda: g.received(b, p), 5.0)
            assert g.nodes[b].data_hops[1] - before[1] == 1  # one hop: the direct link
        finally:
            await g.stop()

    asyncio.run(scenario())


def test_the_first_data_through_a_relay_brings_an_idle_nodes_tick_within_a_second() -> None:
    # Rates are measured per tick, and a settled node rests up to IDLE_TIMER_MAX between ticks: without the wake a
    # stream that starts then is asked a link for only when the idle timer runs (seen: 6.7 s instead of ~3).
    async def scenario() -> None:
        g = MemoryGroup(seed=23, on_demand_rate=2_000.0)
        try:
            pairs = await ring_of_twelve(g)
            a, b = next((a, b) for a, b in pairs if g.nodes[b].id not in g.nodes[a].links.links)
            assert await g.reach([(a, b)], 15.0) == []
            node, dst = g.nodes[a], g.nodes[b].id
            for payload in (b"first", b"again"):  # the second: the first bytes after a tick measured the others
                node.tick()
                node.ticker.schedule(node.clock() + IDLE_TIMER_MAX)  # as a settled node rests
                # Under a stream the links are busy already: the first hop's silence watch, put off by the stream's
                # answers, does not bring the tick nearer (overlay/ticker.py).
                for link in node.links.links.values():
                    link.busy = True
                assert node.ticker.due > node.clock() + IDLE_TIMER_MAX / 2
                p = g.send(a, b, payload)
                assert await g.wait_for(lambda p=p: g.received(b, p), 5.0)
                assert node.ticker.due <= node.clock() + TIMER_MAX, "relayed data left the tick at the idle timer"
                assert dst not in node.links.links  # through a relay, still
        finally:
            await g.stop()

    asyncio.run(scenario())


def test_an_on_demand_link_whose_direct_path_fails_is_no_tunnel_at_either_end_and_is_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The answering side calls back too. Before DIRECT_ONLY its call fell back to a tunnel through a shared
    # neighbour when the direct handshakes went unanswered for 3 s: a link still relayed and on demand at
    # neither end. (CI once saw a direct link that neither end counted as on demand; such a tunnel, moved onto
    # the direct path by a late handshake, would show just that.) A shorter retry keeps the test short.
    monkeypatch.setattr(ondemand, "RETRY_AFTER", 4.0)

    def maintenance_link(na: Node, nb: Node) -> bool:
        """A link between the pair that maintenance made: a long link drawn by either, or a ring neighbour."""
        maintained = Role.LONG_OUT | Role.LONG_IN | Role.PEER_RING
        return bool(
            na.table.role(nb.id) & maintained
            or nb.table.role(na.id) & maintained
            or nb.id in na.table.ring_peers()
            or na.id in nb.table.ring_peers()
        )

    async def scenario() -> None:
        g = MemoryGroup(seed=23, on_demand_rate=2_000.0)
        try:
            for a, b in await ring_of_twelve(g):
                na, nb = g.nodes[a], g.nodes[b]
                if nb.id in na.links.links:
                    continue
                assert await g.reach([(a, b)], 15.0) == []
                asked = na.counters.get("on-demand links asked for", 0)
                g.network.block(na.underlay.local_endpoint, nb.underlay.local_endpoint)
                around = False
                for _ in range(32):  # 8 s at twice the rate: an ask, its direct handshakes lost, a second ask
                    g.send(a, b, b"x" * 1000)
                    await asyncio.sleep(0.25)
                    if nb.id in na.links.links or na.id in nb.links.links:
                        # Maintenance may link the pair around the block (a long link drawn while the group
                        # settles, as a tunnel); an on-demand call must not.
                        assert maintenance_link(na, nb), "linked around the block, and not by maintenance"
                        around = True
                        break
                if not around:
                    break
                g.network.unblock(na.underlay.local_endpoint, nb.underlay.local_endpoint)  # try another pair
            assert not around, "maintenance linked every pair around the block"
            assert na.counters.get("on-demand links asked for", 0) > asked
            g.network.unblock(na.underlay.local_endpoint, nb.underlay.local_endpoint)
            for _ in range(60):
                g.send(a, b, b"x" * 1000)
                await asyncio.sleep(0.25)
                if na.counters.get("on-demand switches"):
                    break
            link = na.links.links.get(nb.id)
            assert link is not None and link.relay is None and na.counters.get("on-demand switches") == 1
        finally:
            await g.stop()

    asyncio.run(scenario())


def test_only_an_on_demand_offer_says_direct_only_with_or_without_ice() -> None:
    # A joiner's offer over XMPP may end in a tunnel; an ICE restart is for a link the peer already has, where
    # the flag means nothing (and a peer from before it would drop the offer as malformed).
    async def scenario() -> None:
        a, b, _, _ = await linked_pair(False, False)
        try:
            setup = a.links.setup
            sent: list[Signal] = []
            assert setup.offer(0x1111, sent.append, xmpp=False) is not None  # no ICE: "link to me"
            setup.agent = FakeAgent()  # type: ignore[assignment]
            assert setup.offer(0x2222, sent.append, xmpp=False) is not None
            hello = setup.offer(0x3333, sent.append, xmpp=True)  # travels in an XMPP hello, not through `sent`
            setup.restart(b.identity.public_key, sent.append)
            assert hello is not None and not hello.direct_only
            assert [(s.type, s.ice is not None, s.direct_only) for s in sent] == [
                (SignalType.OFFER, False, True),
                (SignalType.OFFER, True, True),
                (SignalType.OFFER, True, False),
            ]
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


# -- end to end: real processes, an iperf3 stream across the switch -------------------------------------------

IPERF_PORT = 5201
SWITCH_S = 5.0  # from the requirement: the link appears within 5 s after the pair passes the rate


@pytest.mark.integration
@pytest.mark.skipif(missing_prerequisites() is not None, reason=str(missing_prerequisites()))
@pytest.mark.timeout(300)
def test_an_iperf3_stream_moves_to_an_on_demand_link_within_5_s_and_completes() -> None:
    # Ring links only (no long links), so most pairs are several hops apart.
    with Group(8, prefix="iod", node_extra="[overlay]\nlong_links = 0\n") as g:
        for i in range(8):
            g.join(i)
        assert g.wait_until(lambda: one_ring(g), 30.0), overlays(statuses(g))

        def any_link(sts: dict[int, dict], i: int, j: int) -> bool:
            # Any link counts, a tunnel too: its traffic is not relayed data, and ICE may upgrade it meanwhile.
            return g.link_row(sts[i], j) is not None or g.link_row(sts[j], i) is not None

        def unlinked_pair() -> tuple[int, int] | None:
            # Links made while joining close once no end uses them (30 s idle), so a pair apart may take a while.
            sts = statuses(g)
            return next(((i, j) for i in range(8) for j in range(8) if i != j and not any_link(sts, i, j)), None)

        pair = None
        for _ in range(3):  # a pair may be linked while its pings resolve addresses (a ring repair, an upgrade)
            assert g.wait_until(lambda: unlinked_pair() is not None, 60.0, 1.0), "every pair is linked"
            pair = unlinked_pair()
            assert pair is not None
            assert g.wait_for_pings([pair], 20.0)[pair] is not None
            if not any_link(statuses(g), *pair):
                break
        else:
            raise AssertionError(f"every pair tried was linked before its stream: {overlays(statuses(g))}")
        a, b = pair
        server = g.lab.popen(
            g.members[b].host, "iperf3", "-s", "-1", "-p", str(IPERF_PORT),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
        client = g.lab.popen(
            g.members[a].host, "iperf3", "-c", g.members[b].ip, "-p", str(IPERF_PORT), "-t", "12", "-b", "20M",
            "-J", "--connect-timeout", "3000", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        started = time.monotonic()
        linked = g.wait_until(lambda: g.direct_link(g.status(a), b), SWITCH_S + 2.0, interval=0.2)
        switched_after = time.monotonic() - started
        out, err = client.communicate(timeout=40)
        server.wait(timeout=10)
        assert linked, f"no direct link {a}->{b} within {SWITCH_S + 2:.0f} s of the stream starting"
        # The stream passes the rate within its first second; the link must follow within SWITCH_S of that.
        assert switched_after <= SWITCH_S + 1.0, f"the on-demand link took {switched_after:.1f} s"
        report = json.loads(out)
        assert "error" not in report, report.get("error")
        received = report["end"]["sum_received"]["bytes"]
        assert client.returncode == 0 and received >= 0.9 * report["end"]["sum_sent"]["bytes"] > 0, err
        # Either end may ask first: the stream's ACKs pass the rate from b to a too. One end switched, once.
        ends = [g.status(i) for i in (a, b)]
        switches = [st["counters"].get("on-demand switches", 0) for st in ends]
        seen = [
            (
                {k: v for k, v in st["counters"].items() if "on-demand" in k or "tunnel" in k or "path" in k},
                [row for row in st["links"] if printed_id(row["peer_id"]) == g.members[other].node_id],
            )
            for st, other in zip(ends, (b, a), strict=True)
        ]
        assert 1 <= sum(switches) and max(switches) == 1, seen

"""A join that never splits the group, with real processes, Prosody and namespaces:
- a joiner that cannot reach any anchor (UDP to all of them blocked, open to the others) gets into the one
  overlay, every time;
- two overlays formed apart (every anchor killed at once, a newcomer founds a second one) find each other
  through the room and merge into one ring;
- a joiner's XMPP cost (ICE signalling included) is the same with 10 and 30 members, and its later link set-ups
  cost no stanza at all.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from overlay.beacon import NO_OVERLAY
from overlay.membership import HELLO_TIMEOUT, RECRUIT_INTERVAL
from tests.support.group import Group, missing_prerequisites
from tests.support.views import one_ring, overlays, statuses
from xmpp_bootstrap.protocol import DEFAULT_ANCHORS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(missing_prerequisites() is not None, reason=str(missing_prerequisites())),
]

ROUNDS = 10  # from the requirement: the unreachable joiner gets in every time, run 10 times
# Our choice: a join through introductions takes a few seconds; the ring settles a few gossip rounds later.
JOIN_S = 30.0
# From the requirement: overlays that see each other through the room merge within 60 s.
MERGE_S = 60.0
# Beacons stop when every anchor is gone; the survivors notice after 60 s (+ up to 10 s of jitter).
NOTICE_S = 75.0
NO_OVERLAY_ID = f"{NO_OVERLAY:016x}"  # what status says before a node has taken an overlay's ID


# -- a joiner that cannot reach the anchors ------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_a_joiner_that_cannot_reach_any_anchor_joins_the_one_overlay_every_time() -> None:
    with Group(7, prefix="ija") as g:
        for i in range(6):
            g.join(i)
        assert g.wait_until(lambda: one_ring(g), JOIN_S), statuses(g)
        anchors = [i for i, st in statuses(g).items() if st["anchor"]]
        assert len(anchors) == 3, f"anchors: {anchors}"
        g.block_udp_all(6, anchors)
        others = [i for i in range(6) if i not in anchors]
        for n in range(ROUNDS):
            if n == 0:
                g.join(6, timeout=JOIN_S)
            else:
                g.restart_node(6, timeout=JOIN_S)
            assert g.wait_until(lambda: one_ring(g), JOIN_S), f"round {n}: {overlays(statuses(g))}"
            # Its status says so once its visit to the room notices the links: within a hello exchange
            # (HELLO_TIMEOUT) of the ring closing when they came while it was waiting for the anchors' answers.
            joined = g.wait_until(lambda: g.status(6)["membership"]["state"] == "member", HELLO_TIMEOUT * 2)
            assert joined, f"round {n}: {g.status(6)['membership']}"
            st = g.status(6)
            assert not any(row["peer_id"] in {g.members[a].node_id for a in anchors} and row["relay"] is None
                           for row in st["links"]), "a direct link to an anchor whose UDP is blocked"  # fmt: skip
            target = others[n % len(others)]
            answered = g.wait_for_pings([(6, target), (6, anchors[n % len(anchors)])], JOIN_S)
            assert all(t is not None for t in answered.values()), f"round {n}: {answered}"
            g.stop_node(6)
        assert "founding overlay" not in g.members[6].log.read_text()


# -- two overlays merge ------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_two_overlays_formed_apart_merge_into_one_ring() -> None:
    with Group(8, prefix="ijm") as g:
        for i in range(5):
            g.join(i)

        def settled() -> bool:
            sts = statuses(g)
            return one_ring(g) and all(st["anchor"] or not st["membership"]["in_room"] for st in sts.values())

        assert g.wait_until(settled, JOIN_S)
        first = statuses(g)
        old = next(iter(overlays(first)))
        anchors = [i for i, st in first.items() if st["anchor"]]
        for i in anchors:  # every anchor lost at once (a remaining one would recruit): the room is empty
            proc = g.members[i].process
            assert proc is not None
            os.kill(proc.pid, signal.SIGKILL)
        for i in anchors:
            g.members[i].process.wait(timeout=10)  # type: ignore[union-attr]
        g.join(5, min_links=0)  # finds no anchor in the room and founds a second overlay
        g.join(6)
        g.join(7)
        # A joiner takes its overlay's ID from the first beacon after its first link: wait until every node has one.
        assert g.wait_until(lambda: NO_OVERLAY_ID not in overlays(statuses(g)), JOIN_S), overlays(statuses(g))
        apart = overlays(statuses(g))
        assert len(apart) == 2 and old in apart, f"expected two overlays: {apart}"
        # The survivors of the first overlay notice the beacon has stopped, go back to the room and find the
        # younger overlay's anchors there: from that moment both sides see each other.
        seen: list[float] = []

        def both_in_room() -> bool:
            sts = statuses(g)
            ok = any(st["anchor"] and st["overlay"]["id"] == old for st in sts.values())
            if ok and not seen:
                seen.append(time.monotonic())
            return ok or one_ring(g)

        assert g.wait_until(both_in_room, NOTICE_S + 15, interval=0.5), overlays(statuses(g))
        start = seen[0] if seen else time.monotonic()
        assert g.wait_until(lambda: one_ring(g), MERGE_S, interval=0.5), (
            f"{time.monotonic() - start:.0f} s after both overlays were in the room: {overlays(statuses(g))}"
        )
        merged = overlays(statuses(g))
        assert list(merged) == [old], f"the older overlay should absorb the younger: {merged}"
        running = g.running_pairs()
        answered = g.wait_for_pings(running, 30.0)
        assert all(t is not None for t in answered.values()), [p for p, t in answered.items() if t is None]


# -- XMPP cost of a join -----------------------------------------------------------------------------------


def xmpp_stanzas(st: dict[str, Any]) -> int:
    x = st["membership"]["xmpp"]
    return int(x["stanzas_in"] + x["stanzas_out"])


def links_up(st: dict[str, Any]) -> int:
    return sum(v for k, v in st["counters"].items() if k.startswith("links up"))


def room_is_quiet(g: Group) -> bool:
    """Only the group's anchors are in the room: no earlier joiner still visiting, no anchor coming or going."""
    sts = statuses(g)
    anchors = sum(1 for st in sts.values() if st["anchor"])
    visitors = sum(1 for st in sts.values() if st["membership"]["in_room"] and not st["anchor"])
    return anchors == DEFAULT_ANCHORS and visitors == 0


def settle_joiner(g: Group, i: int) -> dict[str, Any]:
    # A presence from an anchor recruited, or an earlier joiner leaving, while this one visits is a stanza more:
    # measure the joiner alone against a room that holds just the anchors.
    assert g.wait_until(lambda: room_is_quiet(g), RECRUIT_INTERVAL + JOIN_S), statuses(g)
    g.join(i)

    def visited() -> bool:
        # Out of the room is not yet logged out: the room's answer to our leaving comes after, so read the
        # counts once the visit is over.
        st = g.status(i)
        return bool(st["anchor"] or not (st["membership"]["in_room"] or st["membership"]["visiting"]))

    assert g.wait_until(visited, JOIN_S)
    return g.status(i)


@pytest.fixture(scope="module")
def big_group() -> Iterator[Group]:
    with Group(32, prefix="ijs") as g:
        yield g


@pytest.mark.timeout(600)
def test_a_joiner_costs_the_same_stanzas_with_10_and_30_members_and_later_links_cost_none(big_group: Group) -> None:
    g = big_group
    for i in range(10):
        g.join(i)
    small = settle_joiner(g, 10)
    for i in range(11, 31):
        g.join(i)
    big = settle_joiner(g, 31)
    assert not small["anchor"] and not big["anchor"], "the joiners measured must not be anchors"
    assert xmpp_stanzas(small) == xmpp_stanzas(big), (small["membership"]["xmpp"], big["membership"]["xmpp"])
    # From here on every link the joiner sets up is signalled through the overlay: restart members it is
    # linked to, so it repairs its ring and long links (at least 10 set-ups), and count its XMPP stanzas.
    before = g.status(31)
    assert not before["membership"]["in_room"]
    by_id = {m.node_id: m.index for m in g.members}
    deadline = time.monotonic() + 240
    while links_up(g.status(31)) < links_up(before) + 10 and time.monotonic() < deadline:
        now = g.status(31)
        up = links_up(now)
        peers = [by_id[row["peer_id"]] for row in now["links"] if by_id.get(row["peer_id"], 0) > 2]
        if peers:
            g.stop_node(peers[0])
            g.restart_node(peers[0])
        # Let the joiner set up its next link before another peer goes.
        g.wait_until(lambda up=up: links_up(g.status(31)) > up, 10.0)
    after = g.status(31)
    assert links_up(after) >= links_up(before) + 10, (links_up(before), links_up(after))
    assert xmpp_stanzas(after) == xmpp_stanzas(before), (before["membership"]["xmpp"], after["membership"]["xmpp"])

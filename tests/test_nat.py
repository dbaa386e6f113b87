"""Through NATs, end to end: members in three clusters behind NAT routers (two endpoint-independent, one
symmetric), one member on the public segment, Prosody and coturn there too, every node the real CLI in its own
namespace with ICE configured. Every ordered pair pings; each link says how it was made; TURN carries only the
pairs nothing else can (the symmetric cluster toward the other NATs); a NATed member that restarts is back
within 60 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from overlay.transport.ice import ALLOCATE_TIMEOUT, ALLOCATION_CHECK_TIMEOUT, SRFLX_REFRESH, TURN_RETRY
from overlay.upgrades import UPGRADE_AFTER
from tests.support.group import Group, missing_prerequisites
from tests.support.views import ring_errors, statuses

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(missing_prerequisites() is not None, reason=str(missing_prerequisites())),
    pytest.mark.timeout(300),
]

CLUSTERS = {"a": "cone", "b": "cone", "s": "symmetric"}
PLACEMENT: list[str | None] = [None, "a", "a", "b", "b", "s", "s"]
# Our choice: joins here take 1-3 s each; pings need the ring and the DHT records, ~5 s after the last join.
WARM_UP_S = 60.0
# From the requirement: a restarted NATed member and every pair with it ping again within 60 s.
REJOIN_S = 60.0
# Our choice: a silent link is pinged after 2 s, which re-asks STUN; ICE again takes ~1 s per link. Pairs through
# TURN also need a new allocation from the new mapping: on a loaded 2-core CI box that once took over 30 s.
ROAM_S = 45.0
# From overlay/upgrades.py: a link that fell back to a tunnel is offered ICE again UPGRADE_AFTER seconds on, then
# after twice that; each try takes up to ~12 s (ICE_TIMEOUT, then RELAY_ICE_TIMEOUT with relays).
UPGRADE_S = 3 * UPGRADE_AFTER + 15.0


@pytest.fixture(scope="module")
def nat_group() -> Iterator[Group]:
    with Group(len(PLACEMENT), clusters=CLUSTERS, placement=PLACEMENT, turn=True, ice=True, prefix="int") as g:
        for i in range(len(PLACEMENT)):
            g.join(i, timeout=40)
        yield g


def links_by_peer(g: Group, i: int) -> dict[int, dict[str, Any]]:
    by_id = {m.node_id: m.index for m in g.members}
    return {by_id[row["peer_id"]]: row for row in g.status(i)["links"] if row["peer_id"] in by_id}


def expected_kinds(i: int, j: int) -> set[str]:
    """What ICE may choose between members i and j, from where they sit."""
    a, b = PLACEMENT[i], PLACEMENT[j]
    if a is not None and a == b:
        return {"host"}  # same LAN
    if a is None or b is None:
        return {"host", "srflx", "prflx"}  # the public member answers whatever mapping reaches it
    if CLUSTERS[a] == "symmetric" or CLUSTERS[b] == "symmetric":
        return {"relay"}  # a symmetric NAT maps each destination anew: no pair punches through
    return {"srflx", "prflx"}  # two endpoint-independent NATs: hole punching


def test_every_pair_across_the_nats_pings(nat_group: Group) -> None:
    g = nat_group
    pairs = g.running_pairs()
    answered = g.wait_for_pings(pairs, WARM_UP_S)
    failed = [p for p, t in answered.items() if t is None]
    assert not failed, f"pairs without a reply: {failed}"
    again = g.ping_many(pairs, count=2, timeout=2.0)
    assert all(again.values()), [p for p, ok in again.items() if not ok]


def kinds_seen(g: Group) -> dict[tuple[int, int], str]:
    seen: dict[tuple[int, int], str] = {}
    for i in range(len(PLACEMENT)):
        for j, row in links_by_peer(g, i).items():
            assert row["kind"] in ("host", "srflx", "prflx", "relay", "tunnel"), row
            seen[(i, j)] = row["kind"]
    return seen


def unfit(seen: dict[tuple[int, int], str]) -> dict[tuple[int, int], str]:
    return {pair: kind for pair, kind in seen.items() if kind not in expected_kinds(*pair)}


def test_each_member_tells_its_nats_mapping_from_the_two_stun_servers(nat_group: Group) -> None:
    """`status` says what the STUN servers' answers show of each member's NAT: none for the public member, an
    endpoint-independent mapping behind the cone NATs, an address-dependent one behind the symmetric NAT."""
    expected = {None: "none: a public address", "cone": "endpoint-independent", "symmetric": "address-dependent"}
    for i, place in enumerate(PLACEMENT):
        want = expected[CLUSTERS[place] if place else None]
        assert nat_group.wait_until(lambda i=i, want=want: nat_group.status(i)["ice"]["mapping"].startswith(want),
                                    30.0, 1.0), (i, nat_group.status(i)["ice"]["mapping"])  # fmt: skip


def test_links_say_how_they_were_made_and_turn_only_where_nothing_else_works(nat_group: Group) -> None:
    g = nat_group
    g.wait_for_pings(g.running_pairs(), WARM_UP_S)
    # A link made while ICE could not work (a TURN allocation slow on a loaded host) is a tunnel for a while;
    # it is offered ICE again (overlay/upgrades.py) and must end on the path expected where its members sit.
    g.wait_until(lambda: not unfit(kinds_seen(g)), UPGRADE_S, 1.0)
    seen = kinds_seen(g)
    assert seen, "no links at all"
    assert not unfit(seen), f"links whose kind does not fit where the members sit: {unfit(seen)}"
    # The symmetric cluster did need TURN for some pair, and TURN allocations and ICE checks were counted.
    assert any(kind == "relay" for kind in seen.values()), seen
    st = g.status(5)
    assert st["ice"]["counters"].get("turn allocations", 0) >= 1
    assert st["ice"]["counters"].get("ice checks succeeded", 0) >= 1

    # TURN links are offered ICE again too, without relays (overlay/upgrades.py: a joiner's first links may take
    # a relay pair where hole punching works). These pairs need TURN: the member with the lower node ID of each
    # tries, finds no pair, and the link stays on TURN and carries pings.
    ids = {m.index: int(m.node_id, 16) for m in g.members}
    turn = sorted((i, j) for (i, j), kind in seen.items() if kind == "relay" and ids[i] < ids[j])
    assert turn, seen

    def tried() -> bool:
        return all(g.status(i)["counters"].get("relay upgrades failed", 0) >= 1 for i, _ in turn)

    assert g.wait_until(tried, UPGRADE_AFTER + 30.0, 1.0), [(i, g.status(i)["counters"]) for i, _ in turn]
    kinds = kinds_seen(g)
    assert all(kinds.get(pair) == "relay" for pair in turn), kinds
    assert all(g.ping_many(turn + [(j, i) for i, j in turn], count=2, timeout=2.0).values())

    # Both ends of a TURN link carry super-frames: the member that holds the allocation sends its fragment probe
    # as chunks, each in a ChannelData of its own (sent whole, coturn relayed none and every super-frame was
    # cut), and the other end's chunks to the relayed address, which coturn reads with a 128 KB socket buffer
    # that drops some trains, get there within the first retries (overlay/probes.py: 1, 2, 4, ... s; with a
    # minute's wait, in 2 of 3 runs not every end had them 40 s after this point).
    def link_of(a: int, b: int) -> dict[str, Any] | None:
        return g.link_row(g.status(a), b)

    ends = [(a, b) for i, j in turn for a, b in ((i, j), (j, i))]

    # One allocation per link: the cone member's side is reached at its server-reflexive address through the
    # symmetric member's relay, and sends to that relay from its own socket (with relays on both sides aioice
    # often nominated relay to relay, every datagram crossing coturn twice).
    def via_turn(a: int, b: int) -> bool:
        return " via turn:" in ((link_of(a, b) or {}).get("endpoint") or "")

    assert all(via_turn(i, j) != via_turn(j, i) for i, j in turn), [(a, b, link_of(a, b)) for a, b in ends]
    assert g.wait_until(lambda: all((link_of(a, b) or {}).get("superframes") for a, b in ends), 30.0, 1.0), [
        (a, b, link_of(a, b)) for a, b in ends
    ]


def test_links_made_as_tunnels_while_turn_was_lost_move_onto_relays_when_it_is_back(nat_group: Group) -> None:
    """Member 6, behind the symmetric NAT, restarts while everything it sends to coturn is lost: it has no
    server-reflexive or relayed candidates, and cannot reach its peers' relays either, so its links to the cone
    clusters (at least two of its four ring links: only members 0 and 5 are elsewhere) can only be tunnels.
    Once coturn answers again those links are offered ICE again and move onto TURN while they stay up."""
    g = nat_group
    g.wait_for_pings(g.running_pairs(), WARM_UP_S)
    assert g.turn_host is not None
    g.stop_node(6)
    restore = g.lab.lose_to(g.members[6].host, g.lab.addresses(g.turn_host))
    try:
        g.restart_node(6, timeout=REJOIN_S)

        def tunnels() -> set[int]:
            return {j for j, row in links_by_peer(g, 6).items() if row["kind"] == "tunnel"}

        assert g.wait_until(lambda: bool(tunnels()), REJOIN_S, 1.0), f"no tunnel links: {links_by_peer(g, 6)}"
        made = tunnels()
    finally:
        restore()
    g.say(f"coturn reachable again; member 6's tunnel links: {sorted(made)}")

    # Member 6 gathers again within TURN_RETRY; a tunnel's next ICE try is at most UPGRADE_S away after that.
    def moved() -> bool:
        kinds = {j: row["kind"] for j, row in links_by_peer(g, 6).items()}
        return all(kinds.get(j, "gone") not in ("tunnel", "gone") for j in made)

    assert g.wait_until(moved, TURN_RETRY + UPGRADE_S, 1.0), f"still tunnels or gone: {links_by_peer(g, 6)}"
    kinds = {j: row["kind"] for j, row in links_by_peer(g, 6).items()}
    assert all(kinds[j] in expected_kinds(6, j) for j in made), kinds
    # Moved in place, counted at each end whose link left the tunnel (a tunnel link that closed meanwhile, with
    # the link to its relay, may come back as a relay link from scratch: not counted, and fine).
    counters = [g.status(i)["counters"] for i in (6, *made)]
    shown = [{k: v for k, v in c.items() if "tunnel" in k or "link" in k} for c in counters]
    assert sum(c.get("tunnel links upgraded", 0) for c in counters) >= 1, shown
    pairs = [(6, j) for j in made] + [(j, 6) for j in made]
    assert all(g.ping_many(pairs, count=2, timeout=2.0).values())


def test_links_made_through_turn_between_cone_nats_move_onto_hole_punching_when_it_works(nat_group: Group) -> None:
    """Member 4, behind cone NAT b, restarts while everything it sends to cone NAT a is lost: hole punching to
    members 1 and 2 fails, so its links to them go through TURN (as a joiner's first links may when aioice
    nominates a relay pair first). Once the path is back those links are offered ICE again without relays and
    move onto hole punching while they stay up."""
    g = nat_group
    g.wait_for_pings(g.running_pairs(), WARM_UP_S)
    cluster_a = [i for i, where in enumerate(PLACEMENT) if where == "a"]
    g.stop_node(4)
    restore = g.lab.lose_to(g.members[4].host, [g.lab.clusters["a"].public_address])
    try:
        g.restart_node(4, timeout=REJOIN_S)

        def through_turn() -> set[int]:
            return {j for j, row in links_by_peer(g, 4).items() if j in cluster_a and row["kind"] == "relay"}

        assert g.wait_until(lambda: bool(through_turn()), REJOIN_S, 1.0), f"no TURN links: {links_by_peer(g, 4)}"
        assert not any(row["kind"] in ("srflx", "prflx") for j, row in links_by_peer(g, 4).items() if j in cluster_a), (
            links_by_peer(g, 4)
        )
    finally:
        restore()
    made = through_turn()
    g.say(f"NAT a reachable again; member 4's TURN links: {sorted(made)}")

    def moved() -> bool:
        kinds = {j: row["kind"] for j, row in links_by_peer(g, 4).items()}
        return all(kinds.get(j) in ("srflx", "prflx", None) for j in made) and any(j in kinds for j in made)

    assert g.wait_until(moved, UPGRADE_S, 1.0), f"still through TURN: {links_by_peer(g, 4)}"
    kept = [j for j in made if j in links_by_peer(g, 4)]
    counters = [g.status(i)["counters"] for i in (4, *kept)]
    shown = [{k: v for k, v in c.items() if "relay" in k and "drop" not in k} for c in counters]
    assert sum(c.get("relay links upgraded", 0) for c in counters) >= 1, shown
    pairs = [(4, j) for j in kept] + [(j, 4) for j in kept]
    assert all(g.ping_many(pairs, count=2, timeout=2.0).values())


def test_a_restarted_natted_member_is_back_within_60_s(nat_group: Group) -> None:
    g = nat_group
    g.wait_for_pings(g.running_pairs(), WARM_UP_S)
    g.stop_node(3)
    g.restart_node(3, timeout=REJOIN_S)
    started = time.monotonic()
    pairs = [(3, j) for j in range(len(PLACEMENT)) if j != 3] + [(j, 3) for j in range(len(PLACEMENT)) if j != 3]
    answered = g.wait_for_pings(pairs, REJOIN_S)
    failed = [p for p, t in answered.items() if t is None]
    assert not failed, f"{time.monotonic() - started:.0f} s after the restart, no reply for {failed}"


def test_a_member_whose_nat_maps_it_anew_keeps_its_place_and_its_pairs_ping_again(nat_group: Group) -> None:
    """Roaming: the cone NAT in front of member 1 loses every mapping and maps it from other ports. Its
    links through the NAT go silent; it notices, restarts ICE on them, and keeps its ring place."""
    g = nat_group
    g.wait_for_pings(g.running_pairs(), WARM_UP_S)
    before = g.status(1)
    # Below Linux's ephemeral ports (32768-60999), where the members' TURN sockets are bound: Linux's NAT keeps a
    # source port that lies in its new range, so with 40000-40999 a TURN socket bound there (1 in ~28) kept its
    # mapping and its allocation, which then was rightly not made again: the likely cause of this test failing
    # once in CI (its allocation unchanged, no Refresh refused).
    g.lab.remap_nat("a", (20000, 20999))
    started = time.monotonic()
    pairs = [(1, j) for j in range(len(PLACEMENT)) if j != 1 and g.members[j].running]
    pairs += [(j, i) for i, j in pairs]
    answered = g.wait_for_pings(pairs, ROAM_S)
    failed = [p for p, t in answered.items() if t is None]
    assert not failed, f"{time.monotonic() - started:.0f} s after the NAT remapped: no reply for {failed}"
    assert g.status(1)["node_id"] == before["node_id"]

    # Links whose peers accept the new mapping roam at once (authenticated packets from a new address move the
    # link); the node itself must still notice its new server-reflexive address, at the latest at the next
    # periodic STUN round (SRFLX_REFRESH), and restart ICE on the links it then has through the NAT (a link that
    # died before that was set up again from scratch, with the new address: nothing to restart on it).
    def noticed() -> bool:
        st = g.status(1)
        return st["ice"]["counters"].get("address changes", 0) > before["ice"]["counters"].get("address changes", 0)

    assert g.wait_until(noticed, SRFLX_REFRESH + 10, 1.0), "member 1 never noticed its new mapping"

    # Its TURN allocation over UDP was bound to a mapping the NAT forgot: the node finds out at once (not at
    # aioice's refresh 500 s on) and allocates anew, from the new mapping, at a new relayed address.
    def udp_relays(st: dict[str, Any]) -> dict[str, str | None]:
        return {t["server"]: t["relayed"] for t in st["ice"]["turn"] if "transport=tcp" not in t["server"]}

    old_relays = udp_relays(before)
    assert old_relays and all(old_relays.values()), f"member 1 had no UDP allocation before: {before['ice']['turn']}"

    def reallocated() -> bool:
        now = udp_relays(g.status(1))
        return all(now[s] is not None and now[s] != old for s, old in old_relays.items())

    # The check's Refresh may go unanswered to its end and the new Allocate take its whole time under load: the
    # bound is theirs and a margin, far below aioice's refresh.
    if not g.wait_until(reallocated, ALLOCATION_CHECK_TIMEOUT + ALLOCATE_TIMEOUT + 10, 0.5):
        ice = g.status(1)["ice"]
        pytest.fail(f"TURN over UDP not allocated anew: {ice['turn']}; ICE counters {ice['counters']}")
    assert g.status(1)["ice"]["counters"].get("turn allocations lost", 0) > before["ice"]["counters"].get(
        "turn allocations lost", 0
    )
    after = g.status(1)
    through_nat = [r for r in after["links"] if r["kind"] in ("srflx", "prflx", "relay")]
    restarts = after["counters"].get("ice restarts", 0) - before["counters"].get("ice restarts", 0)
    had = [r for r in before["links"] if r["kind"] in ("srflx", "prflx", "relay")]
    assert restarts > 0 or not had, f"links through the NAT {had} before, {through_nat} after, but no ICE restart"
    assert g.wait_until(lambda: 1 not in ring_errors(g, statuses(g)), ROAM_S), "member 1 is not in its ring place"

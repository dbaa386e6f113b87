"""The NAT lab behaves as named, and coturn relays through it, before any overlay test relies on either.

One lab for most of the module: coturn with two public addresses, a public host, two cone clusters and one
symmetric cluster (tests/support/netlab.py). Each NAT is measured from one UDP socket with STUN Binding
requests to both coturn addresses (RFC 8489), its filtering with an unsolicited datagram against a reply
(RFC 4787 §5), and TURN (RFC 8656) with aioice's client from behind the NATs, over UDP and TCP. Last, the
group harness (tests/support/group.py) builds the same pieces around real nodes.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import pytest

from tests.support.coturn import PASSWORD, USERNAME, CoturnServer
from tests.support.group import OVERLAY_PORT, TURN_PASSWORD_FILE, Group, missing_prerequisites
from tests.support.natlab import ENDPOINT_INDEPENDENT, PUBLIC, SYMMETRIC, NatAgent, classify, probe_nat
from tests.support.netlab import Host, NetLab

needs_lab = pytest.mark.skipif(missing_prerequisites() is not None, reason=str(missing_prerequisites()))

# Our choice: lab round trips are well under 1 ms; a datagram that has not arrived in this long was dropped.
QUIET_S = 0.5
# Our choice: how long to wait for a datagram that should arrive.
ARRIVAL_S = 2.0


@dataclass
class Lab:
    lab: NetLab
    coturn: CoturnServer
    public: Host
    cone: Host  # behind cluster "a", cone
    cone_mate: Host  # a second host on the same cone LAN
    other_cone: Host  # behind cluster "b", cone
    symmetric: Host  # behind cluster "s", symmetric


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def nat() -> Iterator[Lab]:
    with NetLab("nat") as lab, tempfile.TemporaryDirectory(prefix="ipop-coturn-") as tmp:
        lab.add_hub()
        turn = lab.add_host("turn")
        second = lab.add_address(turn)
        public = lab.add_host("pub")
        lab.add_cluster("a", "cone")
        lab.add_cluster("b", "cone")
        lab.add_cluster("s", "symmetric")
        cone, cone_mate = lab.add_host("ca", cluster="a"), lab.add_host("cam", cluster="a")
        other_cone, symmetric = lab.add_host("cb", cluster="b"), lab.add_host("sa", cluster="s")
        coturn = CoturnServer(
            Path(tmp), [turn.address, second], allowed_peers=[str(lab.public_subnet)], netns=turn.netns
        )
        with coturn:
            coturn_pid = coturn.pid
            yield Lab(lab, coturn, public, cone, cone_mate, other_cone, symmetric)
    assert lab.prefix not in namespaces(), "the NAT lab left namespaces behind"
    assert coturn.pid is None and not Path(f"/proc/{coturn_pid}").exists(), "coturn still runs"


# -- classification (no lab) -------------------------------------------------------------------------------


def test_classify_names_the_mapping_behaviour() -> None:
    own = ("198.18.0.9", 4000)
    assert classify(own, [own, own]) == PUBLIC
    assert classify(own, [("198.18.0.4", 4000), ("198.18.0.4", 4000)]) == ENDPOINT_INDEPENDENT
    assert classify(own, [("198.18.0.4", 4000), ("198.18.0.4", 4001)]) == SYMMETRIC
    assert classify(own, [own, ("198.18.0.4", 4000)]) == SYMMETRIC
    with pytest.raises(ValueError):
        classify(own, [own])


# -- mapping -----------------------------------------------------------------------------------------------


@pytest.mark.integration
@needs_lab
def test_public_host_sees_its_own_address(nat: Lab) -> None:
    probe = probe_nat(nat.lab, nat.public, nat.coturn.servers)
    assert probe.mapped == (probe.local, probe.local)
    assert probe.kind == PUBLIC


@pytest.mark.integration
@needs_lab
def test_cone_nat_keeps_one_mapping_and_the_source_port_for_both_servers(nat: Lab) -> None:
    probe = probe_nat(nat.lab, nat.cone, nat.coturn.servers)
    router = nat.lab.clusters["a"].public_address
    assert probe.local[0] == nat.cone.address
    assert probe.mapped[0] == (router, probe.local[1]), "MASQUERADE keeps a free source port"
    assert probe.mapped[1] == probe.mapped[0]
    assert probe.kind == ENDPOINT_INDEPENDENT


@pytest.mark.integration
@needs_lab
def test_cone_nat_keeps_a_mapping_endpoint_independent_when_the_port_is_taken(nat: Lab) -> None:
    """Two LAN hosts with the same local port: the second cannot keep it, but keeps one mapping for both servers
    (the kernel reuses the mapping a source already has), so a cluster of members on one port stays "cone"."""
    with NatAgent(nat.lab, nat.cone, port=40000) as first, NatAgent(nat.lab, nat.cone_mate, port=40000) as second:
        a = first.stun(nat.coturn.servers)
        b = second.stun(nat.coturn.servers)
    router = nat.lab.clusters["a"].public_address
    assert a.mapped == ((router, 40000), (router, 40000))
    assert b.kind == ENDPOINT_INDEPENDENT
    assert b.mapped[0][0] == router and b.mapped[0][1] != 40000


@pytest.mark.integration
@needs_lab
def test_symmetric_nat_maps_each_server_to_a_different_port(nat: Lab) -> None:
    probe = probe_nat(nat.lab, nat.symmetric, nat.coturn.servers)
    router = nat.lab.clusters["s"].public_address
    assert [ip for ip, _ in probe.mapped] == [router, router]
    assert probe.mapped[0][1] != probe.mapped[1][1]
    assert probe.kind == SYMMETRIC


# -- filtering ---------------------------------------------------------------------------------------------


@pytest.mark.integration
@needs_lab
@pytest.mark.parametrize("cluster", ["a", "s"])
def test_nat_drops_unsolicited_datagrams_and_delivers_replies(nat: Lab, cluster: str) -> None:
    """Address-and-port-dependent filtering (RFC 4787 §5): the mapped address is known to the public host, yet
    its datagrams get through only once the NATed host has sent to that very address and port."""
    inside = nat.cone if cluster == "a" else nat.symmetric
    with NatAgent(nat.lab, inside) as host, NatAgent(nat.lab, nat.public) as outside:
        mapped = host.stun(nat.coturn.servers[:1]).mapped[0]
        outside.send(mapped, b"unsolicited", count=3)
        assert host.recv(QUIET_S) == [], "an unsolicited datagram crossed the NAT"

        host.send(outside.local, b"first")
        (first,) = outside.recv(ARRIVAL_S, count=1)
        assert first.data == b"first" and first.source[0] == nat.lab.clusters[cluster].public_address
        outside.send(first.source, b"reply")
        (reply,) = host.recv(ARRIVAL_S, count=1)
        assert (reply.data, reply.source) == (b"reply", outside.local)


@pytest.mark.integration
@needs_lab
def test_cone_nat_keeps_the_mapping_toward_a_peer_whose_datagram_came_first(nat: Lab) -> None:
    """Hole punching: the peer's check reaches the NAT before the host has sent to it (dropped there), and the
    host's own flow to that peer still leaves from its server-reflexive port. The router drops unsolicited
    datagrams to its own address before conntrack confirms them; were they accepted, the port would be taken
    by the peer's entry and the host's flow would get another one (a peer-reflexive surprise for ICE)."""
    with NatAgent(nat.lab, nat.cone) as host, NatAgent(nat.lab, nat.public) as outside:
        mapped = host.stun(nat.coturn.servers[:1]).mapped[0]
        outside.send(mapped, b"first")
        assert host.recv(QUIET_S) == [], "the unsolicited datagram crossed the NAT"
        host.send(outside.local, b"then")
        (then,) = outside.recv(ARRIVAL_S, count=1)
        assert then.source == mapped
        outside.send(mapped, b"now a reply")
        (reply,) = host.recv(ARRIVAL_S, count=1)
        assert reply.data == b"now a reply"


# -- TURN through the NATs ---------------------------------------------------------------------------------


@pytest.mark.integration
@needs_lab
@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("cluster", ["a", "s"])
def test_turn_allocation_succeeds_from_behind_a_nat(nat: Lab, cluster: str, transport: str) -> None:
    inside = nat.cone if cluster == "a" else nat.symmetric
    with NatAgent(nat.lab, inside) as host:
        relayed, mapped = host.turn_allocate(nat.coturn.servers[0], USERNAME, PASSWORD, transport=transport)
    assert relayed[0] in nat.coturn.addresses
    assert mapped[0] == nat.lab.clusters[cluster].public_address, "coturn saw the client at its NAT's address"


@pytest.mark.integration
@needs_lab
def test_turn_refuses_wrong_credentials(nat: Lab) -> None:
    with NatAgent(nat.lab, nat.cone) as host, pytest.raises(RuntimeError, match="401"):
        host.turn_allocate(nat.coturn.servers[0], USERNAME, "not-the-password")


@pytest.mark.integration
@needs_lab
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_turn_relays_between_hosts_behind_two_nats(nat: Lab, transport: str) -> None:
    """A cone-NAT host's allocation carries a datagram both ways to a host behind a symmetric NAT: the peer's
    first datagram goes to the relayed address, which opens its NAT for the relay (RFC 8656 §2.3)."""
    with NatAgent(nat.lab, nat.cone) as client, NatAgent(nat.lab, nat.symmetric) as peer:
        relayed, _ = client.turn_allocate(nat.coturn.servers[0], USERNAME, PASSWORD, transport=transport)
        # The peer's server-reflexive address, as it would learn and signal it: a permission for its NAT's IP
        # (RFC 8656 §9) comes with the channel aioice binds for this first send. The peer's NAT drops the
        # datagram itself, since the peer has not sent to the relayed address yet.
        peer_mapped = peer.stun(nat.coturn.servers[:1]).mapped[0]
        client.turn_send(peer_mapped, b"opens a permission")
        assert peer.recv(QUIET_S) == [], "the relay got through the peer's NAT unsolicited"

        peer.send(relayed, b"hello")
        received, errors = client.turn_recv(ARRIVAL_S, count=1)
        assert errors == []
        assert [d.data for d in received] == [b"hello"]
        seen = received[0].source
        assert seen[0] == nat.lab.clusters["s"].public_address

        client.turn_send(seen, b"reply")
        replies = [d for d in peer.recv(ARRIVAL_S, count=1) if d.data == b"reply"]
        assert [d.source for d in replies] == [relayed], "the reply must come from the relayed address"


@pytest.mark.integration
@needs_lab
def test_turn_refuses_peers_outside_the_public_lab_segment(nat: Lab) -> None:
    """coturn only relays to the lab's public segment: a permission for a private LAN address is refused with
    403 (RFC 8656 §9.1), so nothing relayed can leave the lab's public segment."""
    with NatAgent(nat.lab, nat.other_cone) as host:
        host.turn_allocate(nat.coturn.servers[0], USERNAME, PASSWORD)
        host.turn_send((nat.cone.address, 9), b"to a private address")
        received, errors = host.turn_recv(ARRIVAL_S)
    assert received == []
    assert len(errors) == 1 and "403" in errors[0], errors


# -- the group harness -------------------------------------------------------------------------------------


@pytest.mark.integration
@needs_lab
def test_group_puts_members_behind_nats_and_names_coturn_in_their_ice_section() -> None:
    placement = [None, "a", "a", "s"]
    with Group(4, clusters={"a": "cone", "s": "symmetric"}, placement=placement, turn=True, ice=True) as g:
        assert g.coturn is not None and g.coturn.pid is not None
        for m, place in zip(g.members, placement, strict=True):
            assert m.host.cluster == place
            if place is not None:
                assert ip_address(m.host.address) in g.lab.clusters[place].subnet
            config = tomllib.loads(m.config.read_text())
            assert config["node"]["listen"] == f"{m.host.address}:{OVERLAY_PORT}"
            assert config["ice"]["stun"] == [f"{a}:{p}" for a, p in g.coturn.servers]
            assert config["ice"]["turn"] == [
                {"url": g.coturn.url("udp"), "username": USERNAME, "password": PASSWORD},
                {"url": g.coturn.url("tcp"), "username": USERNAME, "password_file": TURN_PASSWORD_FILE},
            ]
            secret = m.directory / TURN_PASSWORD_FILE
            assert secret.read_text().strip() == PASSWORD and secret.stat().st_mode & 0o777 == 0o600
        kinds = [probe_nat(g.lab, m.host, g.coturn.servers).kind for m in g.members]
        assert kinds == [PUBLIC, ENDPOINT_INDEPENDENT, ENDPOINT_INDEPENDENT, SYMMETRIC]
        lab_prefix = g.lab.prefix
    assert lab_prefix not in namespaces()


@pytest.mark.integration
@needs_lab
def test_group_kills_a_node_without_goodbye_and_restarts_it_with_its_identity() -> None:
    with Group(1, turn=True) as g:
        assert "[ice]" not in g.members[0].config.read_text(), "ice is off unless asked for"
        node = g.join(0)
        first_pid = node.process.pid if node.process else None
        g.kill_node(0)
        assert node.process is not None and node.process.returncode == -signal.SIGKILL
        assert node.control.exists(), "a killed node cannot remove its control socket"
        g.restart_node(0)
        assert node.running and node.process is not None and node.process.pid != first_pid
        assert g.status(0)["node_id"] == node.node_id
        g.stop_node(0)

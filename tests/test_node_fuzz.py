"""Hostile bytes at the node's two doors (underlay datagrams, decrypted link messages): every one is parsed or
counted and dropped; nothing raises, and the link and its state survive."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.identity import Identity
from overlay.node import Node, NodeSettings
from overlay.tap.device import MemoryTap
from overlay.tap.frames import VnetHeader
from overlay.transport.session import Handshaker
from overlay.wire import FLAG_EXACT, Kind, LinkMsg, PacketType, Routed


class RecordingUnderlay:
    local_endpoint = ("198.19.0.1", 5800)

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def start(self, handler: object) -> None:
        pass

    def send(self, data: bytes, endpoint: tuple[str, int]) -> None:
        self.sent.append((data, endpoint))

    def close(self) -> None:
        pass


def linked_node(tap: MemoryTap | None = None) -> tuple[Node, int]:
    me, peer = Identity.from_seed(bytes([7]) * 32), Identity.from_seed(bytes([8]) * 32)
    node = Node(
        me,
        NodeSettings(room="g@conference.example.test", address="10.254.0.1/16"),
        RecordingUnderlay(),
        tap=tap,
        clock=lambda: 1000.0,
    )  # type: ignore[arg-type]
    pending = Handshaker(peer).initiate(me.public_key, 1, 1)
    session, _ = Handshaker(me).respond(pending.init, 2, now=1000.0)
    node.links._install(peer.node_id, peer.public_key, session, node.links.path_for(("198.19.0.2", 5800)), None)
    return node, peer.node_id


NODE, PEER = linked_node()
# A TAP without offload: super-frames addressed to it are segmented here, from peer bytes.
PLAIN_NODE, PLAIN_PEER = linked_node(MemoryTap(name="fuzz0", vnet_hdr=False))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_any_datagram_is_handled_without_raising(data: bytes) -> None:
    NODE.links.on_datagram(data, ("198.19.0.9", 1))
    assert PEER in NODE.links.links


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=8))
def test_any_unknown_session_notice_from_the_peers_own_path_leaves_the_link_up(rest: bytes) -> None:
    NODE.links.on_datagram(bytes([PacketType.UNKNOWN_SESSION]) + rest, ("198.19.0.2", 5800))
    assert PEER in NODE.links.links


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(list(LinkMsg)), st.binary(max_size=300))
def test_any_link_message_is_handled_without_raising(kind: LinkMsg, rest: bytes) -> None:
    if kind == LinkMsg.CLOSE:
        return  # a CLOSE from an authenticated peer does close the link, by design
    NODE.messages.on_message(NODE.links.links[PEER], bytes([kind]) + rest)
    assert PEER in NODE.links.links


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(list(Kind)),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=300),
    st.booleans(),
)
def test_any_routed_body_delivered_here_is_handled_without_raising(
    kind: Kind, ttl: int, flags: int, body: bytes, to_me: bool
) -> None:
    dst = NODE.id if to_me else (NODE.id ^ (1 << 40))
    packet = Routed(ttl, flags | FLAG_EXACT if to_me else flags, PEER, dst, (1 << 64) - 1, kind, body)
    NODE.messages.on_message(NODE.links.links[PEER], packet.encode())
    assert PEER in NODE.links.links


# An IPv4/TCP packet to 10.254.0.1 whose every later byte is the fuzzer's: what segment_tcp4 meets from a peer.
_IPV4_TO_NODE = bytes.fromhex("450000000000400040060000981300010afe0001")


@settings(max_examples=400, deadline=None)
@given(
    st.integers(0, 3),
    st.integers(0, 0x85),
    st.integers(0, 3000),
    st.one_of(st.just(34), st.integers(0, 100)),
    st.one_of(st.just(16), st.integers(0, 40)),
    st.binary(max_size=3000),
    st.integers(0, 0xFFFF),
    st.booleans(),
)
def test_any_offload_body_is_segmented_delivered_or_counted_without_raising(
    flags: int, gso_type: int, mss: int, csum_start: int, csum_offset: int, rest: bytes, total: int, to_me: bool
) -> None:
    """Delivered to a TAP without offload (to_me), or passed on over a link not known to carry fragments."""
    node, peer = (PLAIN_NODE, PLAIN_PEER) if to_me else (NODE, PEER)
    vnet = VnetHeader(flags, gso_type, 0, mss, csum_start, csum_offset).encode()
    packet = _IPV4_TO_NODE[:2] + total.to_bytes(2, "big") + _IPV4_TO_NODE[4:] + rest
    dst = node.id if to_me else node.id ^ (1 << 40)
    routed = Routed(64, FLAG_EXACT, peer, dst, (1 << 64) - 1, Kind.DATA_GSO, vnet + packet)
    node.messages.on_message(node.links.links[peer], routed.encode())
    assert peer in node.links.links
    if node.tap is not None:
        node.tap.written.clear()

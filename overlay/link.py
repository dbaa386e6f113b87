"""A link: an authenticated, encrypted session to a peer (overlay/transport/session.py), end to end between the
two nodes, and its path, where the packets go:
- `UdpPath`: out of the node's one UDP socket to an endpoint: the peer's listen address, or the pair ICE chose
  (host, server-reflexive, peer-reflexive, or the peer's TURN relayed address);
- `TurnPath`: through our own TURN allocation, on a channel to the peer;
- `TunnelPath`: inside our link to a neighbour both ends share, which passes the packets on (a "tunnel edge"
  as in Brunet/IPOP); the relay sees ciphertext only.
overlay/links.py makes, moves, rekeys and closes links; this module is what the rest of the node holds.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from overlay.ids import format_id
from overlay.tap.frames import Bytes
from overlay.transport.paths import TurnPath, UdpPath
from overlay.transport.session import Session
from overlay.wire import (
    MIN_E2E,
    SEALED_LINK_PART,
    TRANSPORT_HEADER,
    TUNNEL_LINK_PART,
    Contact,
    Endpoint,
    LinkMsg,
    PacketType,
    encode_relay,
    relay_head,
)

# Plain ints: compared per packet.
PT_TRANSPORT, PT_SEALED, PT_TUNNEL = int(PacketType.TRANSPORT), int(PacketType.SEALED), int(PacketType.TUNNEL)
SEALED_OFFSET = TRANSPORT_HEADER.size + SEALED_LINK_PART  # where a SEALED packet's end-to-end packet starts
TUNNEL_OFFSET = TRANSPORT_HEADER.size + TUNNEL_LINK_PART  # where a TUNNEL packet's inner packet starts


class Hops(Protocol):
    """What a tunnel needs of the link manager: the links, to find the one to its relay, and a counter."""

    links: dict[int, Link]

    def count(self, what: str) -> None: ...


class TunnelPath:
    """Packets ride inside our link to `relay`, which re-wraps them for `peer`."""

    __slots__ = ("kind", "manager", "peer", "relay")

    def __init__(self, manager: Hops, relay: int, peer: int) -> None:
        self.manager = manager
        self.relay = relay
        self.peer = peer
        self.kind = "tunnel"

    def send(self, packet: bytes) -> None:
        hop = self.manager.links.get(self.relay)
        if hop is None or not isinstance(hop.path, UdpPath | TurnPath):
            self.manager.count("drop: relay link gone")
            return
        hop.send_relay(LinkMsg.RELAY, self.peer, packet)

    def describe(self) -> str:
        return f"via {format_id(self.relay)}"


Path = UdpPath | TurnPath | TunnelPath
# Where a packet arrived from: a UDP source endpoint, a TURN channel, or the neighbour that tunnelled it.
Via = Endpoint | TurnPath | int


# The lane Python seals in (overlay/fastpath.py sets it while it handles what an Engine passed up): the lane the
# frame or datagram came by, so that a flow keeps the lane the TAP gave it. A TAP sends a flow out by the queue
# its last packet came in by; answers sealed in lane 0 would move every flow that starts through Python to the
# first Engine (docs/datapath.md, Lanes). 0 everywhere else.
SEND_LANE: ContextVar[int] = ContextVar("SEND_LANE", default=0)


@dataclass(eq=False)
class Link:
    peer_id: int
    peer_key: bytes
    session: Session
    path: Path
    up_since: float
    contact: Contact | None = None
    rtt: float | None = None
    tx_bytes: int = 0
    rx_bytes: int = 0
    # Set when our fragment probe crossed this link (through the tunnel for a relayed link): until then a
    # DATA_GSO super-frame, a UDP datagram the underlay would IP-fragment, is segmented before it is sent.
    fragments_ok: bool = False
    # A session we answered a new handshake with while this one worked: it takes over when the peer first
    # uses it (key confirmation, as WireGuard's responder waits for the initiator's first packet), so a lost
    # response cannot leave the two ends on different sessions.
    next_session: Session | None = None
    # The session before the last rekey: still opened, never sent on, so that packets the peer sent on it
    # before it moved (in flight, or sent until our first packet on the new one reached it) are not lost, as
    # WireGuard keeps its previous keypair. Dropped at the next rekey or when it is REJECT_AFTER_TIME old.
    previous: Session | None = None
    # Set when data went out on the link since the last tick (maintenance then watches it closely:
    # overlay/routing/maintenance.py's busy keepalive).
    busy: bool = False
    # When we may next start a rekeying handshake (one try per REKEY_TIMEOUT, as WireGuard retries).
    rekey_try: float = 0.0
    # The peer's HELLO said it opens and passes on TUNNEL packets (overlay/wire.py HELLO_TUNNEL).
    tunnels_ok: bool = False
    # ... and that it keeps a replay window per counter lane (HELLO_LANES): our Engines send in their own lanes.
    lanes_ok: bool = False

    def _lane(self) -> int:
        """The lane to seal in: SEND_LANE's for a peer that keeps a window per lane, else 0."""
        return SEND_LANE.get() if self.lanes_ok else 0

    def send(self, message: bytes) -> None:
        packet = self.session.seal(message, self._lane())
        self.tx_bytes += len(packet)
        self.path.send(packet)

    def send_sealed(self, routed_header: bytes, e2e_packet: Bytes) -> None:
        """A routed packet whose body is sealed end to end: only its header is encrypted for this link."""
        packet = self.session.seal_header(routed_header, e2e_packet, lane=self._lane())
        self.tx_bytes += len(packet)
        self.path.send(packet)

    def send_relay(self, kind: LinkMsg, peer: int, packet: bytes) -> None:
        """A tunnel's link packet to (RELAY) or from (RELAYED) `peer` through this link: a TUNNEL packet if the
        peer takes them and it is a transport packet (handshakes are not), else a relay message sealed whole."""
        if self.tunnels_ok and len(packet) >= MIN_E2E and packet[0] == PT_TRANSPORT:
            sealed = self.session.seal_header(relay_head(kind, peer), packet, PT_TUNNEL, self._lane())
            self.tx_bytes += len(sealed)
            self.path.send(sealed)
        else:
            self.send(encode_relay(kind, peer, packet))

    @property
    def relay(self) -> int | None:
        """The neighbour a tunnelled link goes through; None for a link on a path of its own."""
        return self.path.relay if isinstance(self.path, TunnelPath) else None

    @property
    def kind(self) -> str:
        """host, srflx, prflx, relay (TURN) or tunnel (through an overlay neighbour)."""
        return self.path.kind

    def describe_endpoint(self) -> str:
        return self.path.describe()

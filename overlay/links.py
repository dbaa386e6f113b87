"""Links: authenticated, encrypted sessions to peers, direct over the underlay or tunnelled through a relay.

A link is direct (packets go to the peer's underlay endpoint) or relayed (packets ride inside our link to a
neighbour both ends share, which passes them on: a "tunnel edge" as in Brunet/IPOP). The session keys are
always end to end between the two nodes, so the relay sees only ciphertext. Tunnels keep the ring whole when a
pair of ring neighbours cannot reach each other directly (firewalls, blocked UDP).

Opening a link: the side that learned the other's contact initiates. Direct initiation is tried
HANDSHAKE_TRIES times, HANDSHAKE_RETRY apart; then through each shared neighbour in turn; then the attempt is
reported as failed and the maintenance rules back off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from overlay.identity import Identity
from overlay.ids import format_id, node_id_from_public_key
from overlay.transport.session import HandshakeError, Handshaker, PendingHandshake, Session, new_index
from overlay.transport.underlay import MemoryUnderlay, UdpUnderlay
from overlay.wire import (
    Contact,
    DecodeError,
    HandshakeInit,
    HandshakeResp,
    LinkMsg,
    PacketType,
    decode_handshake,
    decode_transport_header,
    encode_relay,
)

log = logging.getLogger(__name__)

HANDSHAKE_RETRY = 1.0  # our choice: several RTTs on any path we expect, short enough that a join is quick
HANDSHAKE_TRIES = 3

Underlay = UdpUnderlay | MemoryUnderlay


@dataclass(eq=False)
class Link:
    peer_id: int
    peer_key: bytes
    session: Session
    endpoint: tuple[str, int] | None
    relay: int | None
    up_since: float
    _send_packet: Callable[[Link, bytes], None]
    contact: Contact | None = None
    rtt: float | None = None
    tx_bytes: int = 0
    rx_bytes: int = 0
    # Set when our fragment probe crossed this link (through the tunnel for a relayed link): until then a
    # DATA_GSO super-frame, a UDP datagram the underlay would IP-fragment, is segmented before it is sent.
    fragments_ok: bool = False

    def send(self, message: bytes) -> None:
        packet = self.session.seal(message)
        self.tx_bytes += len(packet)
        self._send_packet(self, packet)

    def describe_endpoint(self) -> str:
        if self.relay is not None:
            return f"via {format_id(self.relay)}"
        assert self.endpoint is not None
        host, port = self.endpoint
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class _Attempt:
    peer_id: int
    peer_key: bytes
    endpoint: tuple[str, int] | None
    relays: list[int]
    started: float
    relay: int | None = None
    tries: int = 0
    next_try: float = 0.0
    pending: PendingHandshake | None = None
    contact: Contact | None = None


@dataclass
class LinkCallbacks:
    link_up: Callable[[Link], None]
    link_down: Callable[[Link, str], None]
    attempt_failed: Callable[[int], None]
    message: Callable[[Link, bytes], None]
    relay_candidates: Callable[[int], list[int]]


@dataclass
class LinkManager:
    identity: Identity
    underlay: Underlay
    callbacks: LinkCallbacks
    clock: Callable[[], float] = time.time
    links: dict[int, Link] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    _by_index: dict[int, Link] = field(default_factory=dict)
    _attempts: dict[int, _Attempt] = field(default_factory=dict)  # by peer ID
    _pending_by_index: dict[int, _Attempt] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._handshaker = Handshaker(self.identity)

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # -- opening links ------------------------------------------------------------------------------------------
    def connect(self, peer_key: bytes, endpoint: tuple[str, int] | None, contact: Contact | None = None) -> None:
        """Start (or keep going) an attempt to link to the node with this key."""
        peer_id = node_id_from_public_key(peer_key)
        if peer_id == self.identity.node_id or peer_id in self.links or peer_id in self._attempts:
            return
        now = self.clock()
        relays = self.callbacks.relay_candidates(peer_id)
        att = _Attempt(peer_id, peer_key, endpoint, relays, now, contact=contact)
        if endpoint is None:
            if not relays:
                self.callbacks.attempt_failed(peer_id)
                return
            att.relay = att.relays.pop(0)
        self._attempts[peer_id] = att
        self._try(att, now)

    def _try(self, att: _Attempt, now: float) -> None:
        if att.pending is not None:
            self._pending_by_index.pop(att.pending.local_index, None)
        index = self._fresh_index()
        att.pending = self._handshaker.initiate(att.peer_key, index, time.time_ns())
        self._pending_by_index[index] = att
        att.tries += 1
        att.next_try = now + HANDSHAKE_RETRY
        self._send_via(att.relay, att.peer_id, att.endpoint, att.pending.init.encode())

    def _fresh_index(self) -> int:
        while True:
            i = new_index()
            if i not in self._by_index and i not in self._pending_by_index:
                return i

    def tick(self, now: float) -> float:
        """Retry or give up handshakes; returns when to be called again."""
        deadline = now + 5.0
        for att in list(self._attempts.values()):
            if now < att.next_try:
                deadline = min(deadline, att.next_try)
                continue
            if att.tries < HANDSHAKE_TRIES:
                self._try(att, now)
            elif att.relays:
                # Direct (or this relay) did not answer: tunnel through the next shared neighbour.
                att.relay = att.relays.pop(0)
                att.tries = 0
                self._try(att, now)
            else:
                self._drop_attempt(att)
                self.count("link attempts failed")
                self.callbacks.attempt_failed(att.peer_id)
                continue
            deadline = min(deadline, att.next_try)
        return deadline

    def _drop_attempt(self, att: _Attempt) -> None:
        self._attempts.pop(att.peer_id, None)
        if att.pending is not None:
            self._pending_by_index.pop(att.pending.local_index, None)

    # -- sending --------------------------------------------------------------------------------------------
    def _send_via(self, relay: int | None, peer_id: int, endpoint: tuple[str, int] | None, packet: bytes) -> None:
        if relay is None:
            assert endpoint is not None
            self.underlay.send(packet, endpoint)
            return
        hop = self.links.get(relay)
        if hop is None or hop.relay is not None:
            self.count("drop: relay link gone")
            return
        hop.send(encode_relay(LinkMsg.RELAY, peer_id, packet))

    def _send_packet(self, link: Link, packet: bytes) -> None:
        self._send_via(link.relay, link.peer_id, link.endpoint, packet)

    # -- receiving -------------------------------------------------------------------------------------------
    def on_datagram(self, data: bytes, endpoint: tuple[str, int]) -> None:
        self.on_packet(data, endpoint, None)

    def on_packet(self, data: bytes, endpoint: tuple[str, int] | None, relay: int | None) -> None:
        """A link packet from the underlay (endpoint) or out of a tunnel (relay: the neighbour it came through)."""
        if not data:
            self.count("drop: empty packet")
            return
        ptype = data[0]
        try:
            if ptype == PacketType.TRANSPORT:
                index, counter = decode_transport_header(data)
                link = self._by_index.get(index)
                if link is None:
                    self.count("drop: unknown session")
                    return
                plaintext = link.session.open(data, counter)
                link.rx_bytes += len(data)
                if relay is None and link.relay is None and endpoint != link.endpoint:
                    # The peer roamed (or a NAT rebound): authenticated traffic says where it is now.
                    link.endpoint = endpoint
                self.callbacks.message(link, plaintext)
            elif ptype in (PacketType.HANDSHAKE_INIT, PacketType.HANDSHAKE_RESP):
                msg = decode_handshake(data)
                if isinstance(msg, HandshakeInit):
                    self._on_init(msg, endpoint, relay)
                else:
                    self._on_resp(msg, endpoint, relay)
            else:
                self.count("drop: unknown packet type")
        except DecodeError:
            self.count("drop: malformed or unauthentic packet")
        except HandshakeError as e:
            self.count(f"drop: handshake: {e}")

    def _on_init(self, init: HandshakeInit, endpoint: tuple[str, int] | None, relay: int | None) -> None:
        peer_id = node_id_from_public_key(init.static)
        if peer_id == self.identity.node_id:
            self.count("drop: handshake from ourselves")
            return
        att = self._attempts.get(peer_id)
        if att is not None and self.identity.node_id < peer_id:
            # Both sides are calling each other: the lower ID's call wins, the other side answers it.
            self.count("handshake collisions")
            return
        session, resp = self._handshaker.respond(init, self._fresh_index())
        contact = None
        if att is not None:
            contact = att.contact
            self._drop_attempt(att)
        self._send_via(relay, peer_id, endpoint, resp.encode())
        self._install(peer_id, init.static, session, endpoint, relay, contact)

    def _on_resp(self, resp: HandshakeResp, endpoint: tuple[str, int] | None, relay: int | None) -> None:
        att = self._pending_by_index.get(resp.receiver_index)
        if att is None or att.pending is None:
            self.count("drop: response to no handshake")
            return
        session = self._handshaker.complete(att.pending, resp)
        self._drop_attempt(att)
        self._install(att.peer_id, att.peer_key, session, endpoint if relay is None else None, relay, att.contact)

    def _install(
        self,
        peer_id: int,
        peer_key: bytes,
        session: Session,
        endpoint: tuple[str, int] | None,
        relay: int | None,
        contact: Contact | None,
    ) -> None:
        old = self.links.get(peer_id)
        if old is not None:
            # A new handshake from a known peer (it restarted, or rekeyed): the new session replaces the old.
            self._by_index.pop(old.session.local_index, None)
            contact = contact or old.contact
        link = Link(peer_id, peer_key, session, endpoint, relay, self.clock(), self._send_packet, contact)
        if old is not None:
            link.tx_bytes, link.rx_bytes, link.rtt = old.tx_bytes, old.rx_bytes, old.rtt
            link.fragments_ok = old.fragments_ok  # same path, new keys: what the probe learned still holds
        self.links[peer_id] = link
        self._by_index[session.local_index] = link
        if old is None:
            log.info("link up: %s %s", format_id(peer_id), link.describe_endpoint())
            self.callbacks.link_up(link)

    # -- closing ------------------------------------------------------------------------------------------------
    def close(self, peer_id: int, reason: str, notify: bool = True) -> None:
        link = self.links.pop(peer_id, None)
        if link is None:
            return
        if notify:
            try:
                link.send(bytes([LinkMsg.CLOSE]))
            except HandshakeError:
                pass
        self._by_index.pop(link.session.local_index, None)
        log.info("link down: %s (%s)", format_id(peer_id), reason)
        self.callbacks.link_down(link, reason)
        # Tunnels through this peer are gone with it.
        for other in [lk for lk in self.links.values() if lk.relay == peer_id]:
            self.close(other.peer_id, "its relay went down", notify=False)

    def close_all(self) -> None:
        for peer_id in list(self.links):
            self.close(peer_id, "node stopping")
        for att in list(self._attempts.values()):
            self._drop_attempt(att)

"""Links: making, moving, rekeying and closing the node's authenticated, encrypted sessions to its peers
(overlay/link.py has the link itself and its paths).

Path choice is separate from the session (as in Tailscale's magicsock): an authenticated packet that arrives
on another path moves the link there (a peer that roamed, or upgraded from a relay), without a new handshake.

Opening a link (overlay/linksetup.py runs the stages): direct handshakes to the peer's listen address, ICE
through signalling when configured, ICE with TURN relays, then tunnels through shared neighbours.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from overlay.identity import Identity
from overlay.ids import format_id, node_id_from_public_key
from overlay.link import (
    PT_SEALED,
    PT_TRANSPORT,
    PT_TUNNEL,
    SEALED_OFFSET,
    TUNNEL_OFFSET,
    Link,
    Path,
    TunnelPath,
    Via,
)
from overlay.transport.memory import MemoryUnderlay
from overlay.transport.paths import TurnPath, UdpPath
from overlay.transport.session import (
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    Credentials,
    HandshakeError,
    Handshaker,
    Session,
)
from overlay.transport.underlay import UdpUnderlay
from overlay.wire import (
    TUNNEL_LINK_PART,
    Contact,
    DecodeError,
    Endpoint,
    HandshakeInit,
    HandshakeResp,
    LinkMsg,
    PacketType,
    decode_handshake,
    decode_transport_header,
    decode_unknown_session,
    encode_unknown_session,
)

log = logging.getLogger(__name__)

Underlay = UdpUnderlay | MemoryUnderlay

# WireGuard's REKEY_TIMEOUT: how long a rekeying handshake waits for its response before another try.
REKEY_TIMEOUT = 5.0
# A responder whose peer has not rekeyed by then starts the handshake itself (between REKEY_AFTER_TIME and
# REJECT_AFTER_TIME, leaving the initiator 30 s and the responder's own handshake 30 s).
RESPONDER_REKEY = REKEY_AFTER_TIME + 30.0
# At most one UNKNOWN_SESSION notice per this long to one sender (an endpoint, TURN peer or tunnel origin): its
# first packet is enough, and the notice must not be a way to make us send a datagram per datagram received.
NOTICE_EVERY = 1.0
NOTICE_MEMORY = 4096  # senders remembered for that limit before the table is cleared
# A handshake a notice set off that got no answer is sent again at a later notice this long on, not after a
# rekey's REKEY_TIMEOUT: the restarted peer ignores it while its own call to us on the same path is under a
# second old (the lower ID's call wins, overlay/linksetup.py own_call_path). Notices come once per NOTICE_EVERY.
NOTICE_RETRY = 1.0


@dataclass
class LinkCallbacks:
    link_up: Callable[[Link], None]
    link_down: Callable[[Link, str], None]
    attempt_failed: Callable[[int], None]
    message: Callable[[Link, bytes], None]
    relay_candidates: Callable[[int], list[int]]
    attempt_started: Callable[[], None] = lambda: None
    # A SEALED packet: its routed header (decrypted) and its end-to-end packet (a view, untouched).
    sealed: Callable[[Link, bytes, memoryview], None] = lambda link, header, payload: None
    # The link stayed up but the peer's end of it is new (the peer restarted, or dropped the link and called
    # again): it holds nothing of what we told it on the link, so tell it again (overlay/linkevents.py).
    peer_renewed: Callable[[Link], None] = lambda link: None


@dataclass
class LinkManager:
    identity: Identity
    underlay: Underlay
    callbacks: LinkCallbacks
    clock: Callable[[], float] = time.time
    credentials: Credentials | None = None
    links: dict[int, Link] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    _by_index: dict[int, Link] = field(default_factory=dict)
    _noticed: dict[object, float] = field(default_factory=dict)  # sender -> when we last told it UNKNOWN_SESSION
    # Peers whose end of a link that stayed up is new, until the link's new session is in use.
    _renewed: set[int] = field(default_factory=set)
    closed_bytes: tuple[int, int] = (0, 0)  # sent and received on links closed since start (metrics)
    # Told the peer ID whenever a link comes, goes, or changes its session, path or fragments_ok: the compiled
    # data path (overlay/fastpath.py) mirrors the links it can serve.
    on_change: Callable[[int], None] = lambda peer: None

    def __post_init__(self) -> None:
        from overlay.linksetup import LinkSetup  # the stages of opening a link build on this module

        self.handshaker = Handshaker(self.identity, self.credentials)
        self.setup = LinkSetup(self)

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # -- opening links (overlay/linksetup.py) -------------------------------------------------------------------
    def connect(self, peer_key: bytes, endpoint: Endpoint | None, contact: Contact | None = None) -> None:
        """Start (or keep going) an attempt to link to the node with this key, at `endpoint` if given."""
        self.setup.connect(peer_key, endpoint, contact)

    def tick(self, now: float) -> float:
        """Retry or give up handshakes, rekey sessions, close links whose keys are too old; returns when to
        be called again."""
        return min(self.setup.tick(now), self._rekey(now))

    def _rekey(self, now: float) -> float:
        """WireGuard's timers (its paper, section 6.2): the initiator of a session starts a new handshake once
        it is REKEY_AFTER_TIME old, retrying every REKEY_TIMEOUT; the responder steps in only if none came by
        RESPONDER_REKEY (a lost initiator); a session REJECT_AFTER_TIME old is no longer used at all."""
        deadline = math.inf
        for link in list(self.links.values()):
            session = link.session
            if link.previous is not None and link.previous.expired(now):
                self._by_index.pop(link.previous.local_index, None)
                link.previous = None
                self.on_change(link.peer_id)
            if session.expired(now):
                self.count("links closed: keys too old")
                self.close(link.peer_id, "session keys expired", notify=False)
                continue
            due = session.created + (REKEY_AFTER_TIME if session.initiator else RESPONDER_REKEY)
            if (now >= due or session.wants_rekey(now)) and now >= link.rekey_try:
                link.rekey_try = now + REKEY_TIMEOUT
                self.count("rekeys started")
                self.setup.send_handshake(link.path, link.peer_id, link.peer_key, now)
            next_at = max(due, link.rekey_try)
            deadline = min(deadline, next_at, session.created + REJECT_AFTER_TIME)
        return deadline

    def path_for(self, via: Via, kind: str = "host") -> Path:
        if isinstance(via, int):
            return TunnelPath(self, via, 0)
        if isinstance(via, TurnPath):
            return via
        return UdpPath(self.underlay, via, kind)

    def send_on(self, path: Path, peer_id: int, packet: bytes) -> None:
        if isinstance(path, TunnelPath):
            path.peer = peer_id
        path.send(packet)

    # -- receiving -------------------------------------------------------------------------------------------
    def on_datagram(self, data: bytes, endpoint: Endpoint) -> None:
        self.on_packet(data, endpoint)

    def on_packet(self, data: bytes, via: Via, origin: int | None = None) -> None:
        """A link packet from the underlay (its source endpoint), a TURN channel, or out of a tunnel (the
        neighbour it came through, and `origin`, the node at the tunnel's far end as the neighbour says)."""
        if not data:
            self.count("drop: empty packet")
            return
        ptype = data[0]
        try:
            if ptype == PT_TRANSPORT or ptype == PT_SEALED or ptype == PT_TUNNEL:
                index, counter = decode_transport_header(data)
                link = self._by_index.get(index)
                if link is None:
                    self.count("drop: unknown session")
                    self._tell_unknown(index, via, origin)
                    return
                session = link.session
                nxt = link.next_session
                if nxt is not None and nxt.local_index == index:
                    session = nxt
                elif link.previous is not None and link.previous.local_index == index:
                    session = link.previous
                if ptype == PT_TRANSPORT:
                    plaintext = session.open(data, counter)
                elif ptype == PT_SEALED:
                    header = session.open_header(data, counter)
                else:
                    head = session.open_header(data, counter, TUNNEL_LINK_PART)
                    if head[0] != LinkMsg.RELAY and head[0] != LinkMsg.RELAYED:
                        raise DecodeError(f"tunnel packet with a head of kind {head[0]}")
                    plaintext = head + data[TUNNEL_OFFSET:]  # the relay message it stands for
                if session is nxt:
                    self.next_used(link.peer_id)
                link.rx_bytes += len(data)
                if (
                    not isinstance(via, int)
                    and session is not link.previous  # a late packet says nothing of where the peer is now
                    and not _same_path(link.path, via)
                    and session.newest(counter)
                ):
                    # The peer roamed, a NAT rebound, or the peer moved the link off a tunnel or a relay: the
                    # newest authenticated packet says where it is now (WireGuard's rule, section 2.1 of its
                    # paper). Never onto a tunnel: a path of our own is kept while it carries anything.
                    self._move(link, via)
                if ptype == PT_SEALED:
                    self.callbacks.sealed(link, header, memoryview(data)[SEALED_OFFSET:])
                else:
                    self.callbacks.message(link, plaintext)
            elif ptype == PacketType.UNKNOWN_SESSION:
                self._on_unknown(decode_unknown_session(data), via, origin)
            elif ptype in (PacketType.HANDSHAKE_INIT, PacketType.HANDSHAKE_RESP):
                msg = decode_handshake(data)
                if isinstance(msg, HandshakeInit):
                    self._on_init(msg, via)
                else:
                    self._on_resp(msg, via)
            else:
                self.count("drop: unknown packet type")
        except DecodeError:
            self.count("drop: malformed or unauthentic packet")
        except HandshakeError as e:
            self.count(f"drop: handshake: {e}")

    def _tell_unknown(self, index: int, via: Via, origin: int | None) -> None:
        """Say so to the sender of a packet for a session we do not hold (we restarted, or closed the link
        while it still sends), back the way the packet came."""
        key: object = (via, origin) if isinstance(via, int) else via
        now = self.clock()
        if now - self._noticed.get(key, -math.inf) < NOTICE_EVERY:
            return
        if len(self._noticed) >= NOTICE_MEMORY:
            self._noticed.clear()
        notice = encode_unknown_session(index)
        if isinstance(via, int):
            hop = self.links.get(via)
            if origin is None or hop is None or hop.relay is not None:
                return
            hop.send_relay(LinkMsg.RELAY, origin, notice)
        elif isinstance(via, TurnPath):
            via.send(notice)
        else:
            self.underlay.send(notice, via)
        self._noticed[key] = now
        self.count("unknown-session notices sent")

    def _on_unknown(self, index: int, via: Via, origin: int | None) -> None:
        """The peer holds no session with `index`: if it is the one we send on, on the path we send it on, the
        peer lost it (restarted): handshake again now, as a rekey would, rather than wait for keepalives."""
        if isinstance(via, int):  # through a tunnel: the relay named the origin
            candidates = [self.links[origin]] if origin in self.links else []
        else:
            candidates = list(self.links.values())
        link = next((lk for lk in candidates if lk.session.remote_index == index and _same_path(lk.path, via)), None)
        if link is None:
            self.count("drop: unknown-session notice for no session we send on")
            return
        now = self.clock()
        if now < link.rekey_try:
            return  # a handshake is already on its way
        link.rekey_try = now + NOTICE_RETRY
        self.count("sessions the peer no longer holds")
        self._renewed.add(link.peer_id)
        log.info(
            "link %s: the peer holds our session no longer (restarted?), handshaking again", format_id(link.peer_id)
        )
        self.setup.send_handshake(link.path, link.peer_id, link.peer_key, now)

    def _retire(self, link: Link, session: Session) -> None:
        """`session` stops being the link's current one: it becomes the previous (the one before is dropped)."""
        if link.previous is not None:
            self._by_index.pop(link.previous.local_index, None)
        link.previous = session

    def next_used(self, peer_id: int) -> None:
        """The peer sent on the session we answered its rekey with (we opened it, or the compiled data path
        did): that session becomes the link's current one."""
        link = self.links.get(peer_id)
        if link is None or link.next_session is None:
            return
        self._retire(link, link.session)
        link.session, link.next_session = link.next_session, None
        self.on_change(peer_id)
        if peer_id in self._renewed:
            self._renewed.discard(peer_id)
            self.callbacks.peer_renewed(link)

    def _count_upgrade(self, old: Path, new: Path) -> None:
        """Count a link that moved off a tunnel onto a path of its own, or off TURN onto a direct path
        (overlay/upgrades.py)."""
        if isinstance(old, TunnelPath) and not isinstance(new, TunnelPath):
            self.count("tunnel links upgraded")
        elif old.kind == "relay" and new.kind not in ("relay", "tunnel"):
            self.count("relay links upgraded")

    def _move(self, link: Link, via: Via) -> None:
        kind = link.path.kind if isinstance(link.path, UdpPath) else "prflx"
        old = link.describe_endpoint()
        path = self.path_for(via, kind)
        self._count_upgrade(link.path, path)
        link.path = path
        if isinstance(link.path, TunnelPath):
            link.path.peer = link.peer_id
        self.count("path changes")
        log.info("link %s moved: %s -> %s", format_id(link.peer_id), old, link.describe_endpoint())
        self.on_change(link.peer_id)

    def _on_init(self, init: HandshakeInit, via: Via) -> None:
        opened = self.handshaker.open_init(init)
        peer_key = opened.node_key
        peer_id = node_id_from_public_key(peer_key)
        if peer_id == self.identity.node_id:
            self.count("drop: handshake from ourselves")
            return
        own = self.setup.own_call_path(peer_id)
        if own is not None and _same_path(own, via):
            # Both sides are calling each other on one path: the lower ID's call wins, the other side answers
            # it. A call that came another way is answered: ours may be on a path that does not work (a
            # restarted member's direct tries to one it reaches only through a tunnel).
            self.count("handshake collisions")
            return
        session, resp = self.handshaker.answer(opened, self._fresh_index(), self.clock())
        path = self.path_for(via, self.setup.kind_hint(peer_id, via))
        self.send_on(path, peer_id, resp.encode())
        contact = self.setup.finish(peer_id)
        old = self.links.get(peer_id)
        if old is not None and old.peer_key == peer_key and old.rx_bytes:
            if self.clock() - old.session.created < REKEY_AFTER_TIME:
                # No rekey is due: the peer's end is new (it restarted, or called again: closed the link while
                # we kept it, or an ICE upgrade).
                self._renewed.add(peer_id)
            # Keep sending on the working session until the initiator confirms the new one.
            if old.next_session is not None:
                self._by_index.pop(old.next_session.local_index, None)
            old.next_session = session
            self._by_index[session.local_index] = old
            if isinstance(path, TunnelPath) or not _same_path(old.path, path):
                self._count_upgrade(old.path, path)
                old.path = path
            self.on_change(peer_id)  # the compiled data path opens the next session too
            return
        self._install(peer_id, peer_key, session, path, contact)

    def _on_resp(self, resp: HandshakeResp, via: Via) -> None:
        found = self.setup.pending(resp.receiver_index)
        if found is None:
            self.count("drop: response to no handshake")
            return
        pending, peer_id, peer_key, kind = found
        session = self.handshaker.complete(pending, resp, self.clock())
        contact = self.setup.finish(peer_id)
        self._install(peer_id, peer_key, session, self.path_for(via, kind), contact)

    def _fresh_index(self) -> int:
        return self.setup.fresh_index()

    def index_in_use(self, index: int) -> bool:
        return index in self._by_index

    def _install(self, peer_id: int, peer_key: bytes, session: Session, path: Path, contact: Contact | None) -> None:
        if isinstance(path, TunnelPath):
            path.peer = peer_id
        old = self.links.get(peer_id)
        if old is not None:
            # A new handshake from a known peer (it restarted, or rekeyed): the new session replaces the old,
            # which stays open for what the peer sent before it saw the new one (a restarted peer's, for
            # nothing).
            if old.previous is not None:
                self._by_index.pop(old.previous.local_index, None)
            if old.next_session is not None:
                self._by_index.pop(old.next_session.local_index, None)
            contact = contact or old.contact
        link = Link(peer_id, peer_key, session, path, self.clock(), contact)
        if old is not None:
            if old.peer_key == peer_key:
                link.previous = old.session
                self._by_index[old.session.local_index] = link
                # What the peer's HELLO said (TUNNEL packets, lanes) belongs to the peer, not to a session, and it
                # says it again only when its use of the link changes: without this every link lost its lanes and
                # express lanes at the initiator's first rekey, two minutes after it came up.
                link.tunnels_ok, link.lanes_ok = old.tunnels_ok, old.lanes_ok
            else:
                self._by_index.pop(old.session.local_index, None)
            link.tx_bytes, link.rx_bytes, link.rtt = old.tx_bytes, old.rx_bytes, old.rtt
            # Same path, new keys: what the fragment probe learned still holds.
            link.fragments_ok = old.fragments_ok and _same_path(old.path, path)
        self.links[peer_id] = link
        self._by_index[session.local_index] = link
        self.on_change(peer_id)
        if old is None:
            log.info("link up: %s %s (%s)", format_id(peer_id), link.describe_endpoint(), link.kind)
            self.count(f"links up: {link.kind}")
            self.callbacks.link_up(link)
        elif not _same_path(old.path, path):
            log.info("link %s now over %s (%s)", format_id(peer_id), link.describe_endpoint(), link.kind)
            self.count("path changes")
            self._count_upgrade(old.path, path)
        if old is not None and peer_id in self._renewed and session.initiator:
            self._renewed.discard(peer_id)
            self.callbacks.peer_renewed(link)

    # -- closing ------------------------------------------------------------------------------------------------
    def close(self, peer_id: int, reason: str, notify: bool = True) -> None:
        link = self.links.pop(peer_id, None)
        self._renewed.discard(peer_id)
        if link is None:
            return
        if notify:
            try:
                link.send(bytes([LinkMsg.CLOSE]))
            except HandshakeError:
                pass
        self.closed_bytes = (self.closed_bytes[0] + link.tx_bytes, self.closed_bytes[1] + link.rx_bytes)
        for session in (link.session, link.next_session, link.previous):
            if session is not None:
                self._by_index.pop(session.local_index, None)
        self.on_change(peer_id)
        if isinstance(link.path, TurnPath):
            link.path.allocation.forget_peer(link.path.peer)
        log.info("link down: %s (%s)", format_id(peer_id), reason)
        self.callbacks.link_down(link, reason)
        # Tunnels through this peer are gone with it.
        for other in [lk for lk in self.links.values() if lk.relay == peer_id]:
            self.close(other.peer_id, "its relay went down", notify=False)

    def close_all(self) -> None:
        for peer_id in list(self.links):
            self.close(peer_id, "node stopping")
        self.setup.close_all()


def _same_path(path: Path, via: Via | Path) -> bool:
    if isinstance(path, UdpPath):
        target = via.endpoint if isinstance(via, UdpPath) else via
        return path.endpoint == target
    if isinstance(path, TunnelPath):
        return via == path.relay or (isinstance(via, TunnelPath) and via.relay == path.relay)
    return path is via

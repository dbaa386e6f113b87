"""End-to-end sessions: data between two members that are not linked is sealed for the destination alone.

A relay is a member, and a member is not trusted with other members' traffic: it forwards on the routed header
(authenticated hop by hop) and never holds a key for the body. Each pair that exchanges data over relays runs
its own Noise IK handshake through the overlay (Kind.E2E, the same Handshaker and certificate check as links),
then seals each data body as a transport packet of that session (Kind.SEALED). The link carries a sealed body
in a SEALED link packet (overlay/transport/session.py): only the routed header is encrypted for the link, bound
to the body by the body's own tag, so a relay's work per packet is the same small header whatever the body's
size, and its work per byte is a copy. Members that are linked (directly or through a tunnel) already share
an end-to-end session: their link.

Sessions follow WireGuard's timers (rekey by the initiator after 120 s, none used after 180 s). The responder
sends on its session only once the initiator has used it (key confirmation); until then, and while a
handshake is under way, data waits in a bounded queue (QUEUE) and is dropped, counted, after SETUP_TIMEOUT.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from overlay.ids import node_id_from_public_key
from overlay.tap.frames import VNET_HDR_LEN, Bytes, FrameError, nic_packets
from overlay.transport.session import HandshakeError, Handshaker, PendingHandshake, Session, new_index
from overlay.wire import DecodeError, HandshakeInit, HandshakeResp, Kind, decode_handshake, decode_transport_header

log = logging.getLogger(__name__)

# Kind.E2E subtypes. TOO_BIG: a relay could not pass a sealed super-frame on. UNKNOWN: the destination holds no
# session with the index a packet named (it restarted): the sender drops that session and calls again.
INIT, RESP, TOO_BIG, UNKNOWN = 1, 2, 3, 4
KEEPALIVE = 0  # an empty sealed packet (kind byte 0): the initiator's key confirmation when it has no data
RETRY = 1.0  # our choice: the handshake crosses ~log N hops, well inside a second
SETUP_TIMEOUT = 5.0  # as the DHT's lookups (overlay/dht/service.py LOOKUP_TIMEOUT)
QUEUE = 32  # as the DHT's queue per address: a TCP initial window plus retransmits
SEGMENT_FOR = 60.0  # after a TOO_BIG: super-frames for that member are cut at the origin for this long
MAX_RX_SESSIONS = 3  # per peer: the current one, the one before a rekey, a crossing handshake's
_PEER = struct.Struct("!Q")
_INDEX = struct.Struct("!I")


@dataclass
class _Pair:
    send: Session | None = None
    unconfirmed: Session | None = None  # answered, waiting for the initiator's first packet
    calling: int | None = None  # the index of our handshake under way
    called_at: float = 0.0
    started: float = 0.0
    queue: deque[tuple[int, bytes]] = field(default_factory=lambda: deque(maxlen=QUEUE))
    rx: list[int] = field(default_factory=list)  # our indices of the sessions we accept packets on
    segment_until: float = 0.0


class EndToEnd:
    def __init__(
        self,
        handshaker: Handshaker,
        send_routed: Callable[[int, Kind, bytes], None],
        send_sealed: Callable[[int, bytes], None],
        counters: dict[str, int],
        clock: Callable[[], float],
    ) -> None:
        self.handshaker = handshaker
        self.send_routed = send_routed  # (dst, kind, body): a routed control packet
        self.send_sealed = send_sealed  # (dst, end-to-end packet): a routed data packet, Kind.SEALED
        self.counters = counters
        self.clock = clock
        self.wake: Callable[[float], None] = lambda within: None
        # The node key of a member we may seal for (set by the node: links, certificates, address records).
        self.key_of: Callable[[int], bytes | None] = lambda node_id: None
        self.peer_keys: dict[int, bytes] = {}  # keys of members that called us
        self._pairs: dict[int, _Pair] = {}
        self._by_index: dict[int, tuple[int, Session]] = {}
        self._pending: dict[int, tuple[int, PendingHandshake]] = {}
        self._told: dict[int, float] = {}  # sender -> when we last told it we hold no such session

    def count(self, what: str, n: int = 1) -> None:
        self.counters[what] = self.counters.get(what, 0) + n

    # -- sending ----------------------------------------------------------------------------------------------
    def seal(self, dst: int, kind: int, body: Bytes, now: float) -> bytes | None:
        """The end-to-end packet of a data body for `dst`; None when it had to wait (queued, a handshake is
        under way)."""
        pair = self._pairs.get(dst)
        session = pair.send if pair is not None else None
        if session is not None and not session.expired(now):
            if session.wants_rekey(now) and pair is not None and pair.calling is None:
                self._call(dst, pair, now)
            return session.seal(bytes([kind]) + body)
        self._wait(dst, kind, bytes(body), now)
        return None

    def send(self, dst: int, kind: int, body: Bytes, cut: bool = False) -> None:
        """Seal and send a data body; a super-frame is cut into its segments first when `cut` (our first hop
        does not pass IP fragments) or a relay told us its next link does not (TOO_BIG)."""
        now = self.clock()
        if kind == Kind.DATA_GSO and (cut or self.must_segment(dst, now)):
            for segment in self._segments(body):
                self.send(dst, Kind.DATA, segment)
            return
        packet = self.seal(dst, kind, body, now)
        if packet is not None:
            self.send_sealed(dst, packet)

    def must_segment(self, dst: int, now: float) -> bool:
        pair = self._pairs.get(dst)
        return pair is not None and now < pair.segment_until

    def _segments(self, body: Bytes) -> list[bytes]:
        view = memoryview(body)
        try:
            return nic_packets(view[:VNET_HDR_LEN], view[VNET_HDR_LEN:])
        except FrameError:
            self.count("drop: TCP super-frame that cannot be segmented")
            return []

    def _wait(self, dst: int, kind: int, body: bytes, now: float) -> None:
        pair = self._pairs.setdefault(dst, _Pair())
        if pair.send is not None and pair.send.expired(now):
            pair.send = None
        if not pair.queue:
            pair.started = now
        elif len(pair.queue) == QUEUE:
            self.count("drop: queue full while the end-to-end session is set up")
        pair.queue.append((kind, body))
        if pair.calling is None and (pair.unconfirmed is None or now - pair.unconfirmed.created > RETRY):
            # An answered handshake whose initiator has not used it within a retry is no reason to wait longer.
            self._call(dst, pair, now)

    def _call(self, dst: int, pair: _Pair, now: float) -> None:
        peer_key = self.peer_keys.get(dst) or self.key_of(dst)
        if peer_key is None:
            self.count("drop: no key known for the end-to-end peer")
            pair.queue.clear()
            return
        index = self._fresh_index()
        pending = self.handshaker.initiate(peer_key, index, time.time_ns())
        if pair.calling is not None:
            self._pending.pop(pair.calling, None)
        self._pending[index] = (dst, pending)
        pair.calling, pair.called_at = index, now
        self.count("end-to-end handshakes started")
        self.send_routed(dst, Kind.E2E, bytes([INIT]) + pending.init.encode())
        self.wake(RETRY)

    def _fresh_index(self) -> int:
        while True:
            i = new_index()
            if i not in self._by_index and i not in self._pending:
                return i

    # -- receiving --------------------------------------------------------------------------------------------
    def open(self, src: int, packet: bytes | memoryview) -> tuple[int, memoryview] | None:
        """(kind, body) of an end-to-end packet from `src`; None (counted) if it is not authentic."""
        try:
            index, counter = decode_transport_header(packet)
            found = self._by_index.get(index)
            if found is None:
                self.count("drop: unknown end-to-end session")
                self._tell_unknown(src, index)
                return None
            peer, session = found
            if peer != src:
                self.count("drop: end-to-end packet from another sender")
                return None
            plain = session.open(packet, counter)
        except DecodeError:
            self.count("drop: end-to-end packet fails authentication")
            return None
        if not plain:
            self.count("drop: empty end-to-end packet")
            return None
        pair = self._pairs.get(peer)
        if pair is not None and pair.unconfirmed is session:
            pair.unconfirmed = None
            if pair.calling is None or pair.send is None:
                pair.send = session
            self._flush(peer, pair)
        view = memoryview(plain)
        return view[0], view[1:]

    def _tell_unknown(self, src: int, index: int) -> None:
        """A sender uses a session we do not hold (we restarted): say so, at most once per RETRY per sender,
        or it would keep sending into the void until the session's 180 s are up."""
        now = self.clock()
        if now - self._told.get(src, -math.inf) < RETRY:
            return
        if len(self._told) > 4096:
            self._told.clear()
        self._told[src] = now
        self.send_routed(src, Kind.E2E, bytes([UNKNOWN]) + _INDEX.pack(index))

    def on_routed(self, src: int, body: bytes) -> None:
        """Kind.E2E: a handshake message, or a relay's notice that a super-frame did not fit its next link."""
        if not body:
            raise DecodeError("empty end-to-end message")
        if body[0] == UNKNOWN:
            if len(body) != 1 + _INDEX.size:
                raise DecodeError("unknown-session notice of the wrong size")
            (index,) = _INDEX.unpack_from(body, 1)
            pair = self._pairs.get(src)
            # Only the session we send on with that very index: an old or forged notice changes nothing else
            # (a forger on the path could drop the packets anyway; this costs a handshake).
            if pair is not None and pair.send is not None and pair.send.remote_index == index:
                self.count("end-to-end sessions the peer no longer holds")
                pair.send = None
                if pair.calling is None:
                    self._call(src, pair, self.clock())
            return
        if body[0] == TOO_BIG:
            if len(body) != 1 + _PEER.size:
                raise DecodeError("too-big notice of the wrong size")
            (dst,) = _PEER.unpack_from(body, 1)
            self._pairs.setdefault(dst, _Pair()).segment_until = self.clock() + SEGMENT_FOR
            self.count("super-frames cut at the origin after a relay's notice")
            return
        try:
            msg = decode_handshake(body[1:])
            if body[0] == INIT and isinstance(msg, HandshakeInit):
                self._on_init(msg)
            elif body[0] == RESP and isinstance(msg, HandshakeResp):
                self._on_resp(msg)
            else:
                raise DecodeError("end-to-end message of an unknown kind")
        except HandshakeError as e:
            self.count(f"drop: end-to-end handshake: {e}")

    def _on_init(self, init: HandshakeInit) -> None:
        now = self.clock()
        opened = self.handshaker.open_init(init)
        peer = node_id_from_public_key(opened.node_key)
        session, resp = self.handshaker.answer(opened, self._fresh_index(), now)
        pair = self._pairs.setdefault(peer, _Pair())
        self.peer_keys[peer] = opened.node_key
        self._accept(peer, pair, session)
        pair.unconfirmed = session
        self.send_routed(peer, Kind.E2E, bytes([RESP]) + resp.encode())

    def _on_resp(self, resp: HandshakeResp) -> None:
        found = self._pending.pop(resp.receiver_index, None)
        if found is None:
            self.count("drop: end-to-end response to no handshake")
            return
        peer, pending = found
        session = self.handshaker.complete(pending, resp, self.clock())
        pair = self._pairs.setdefault(peer, _Pair())
        if pair.calling == resp.receiver_index:
            pair.calling = None
        self._accept(peer, pair, session)
        pair.send = session
        self.count("end-to-end sessions up")
        if not pair.queue:
            self.send_sealed(peer, session.seal(bytes([KEEPALIVE])))  # the responder may send on it now
        self._flush(peer, pair)

    def _accept(self, peer: int, pair: _Pair, session: Session) -> None:
        self._by_index[session.local_index] = (peer, session)
        pair.rx.append(session.local_index)
        while len(pair.rx) > MAX_RX_SESSIONS:
            self._by_index.pop(pair.rx.pop(0), None)

    def _flush(self, peer: int, pair: _Pair) -> None:
        queued = list(pair.queue)
        pair.queue.clear()
        for kind, body in queued:
            self.send(peer, kind, body)

    # -- the clock ------------------------------------------------------------------------------------------
    def tick(self, now: float) -> float:
        """Retry handshakes, drop what waited too long, forget old sessions; when to be called again."""
        deadline = math.inf
        for peer, pair in list(self._pairs.items()):
            if pair.queue and now - pair.started > SETUP_TIMEOUT:
                self.count("drop: end-to-end session not set up in time", len(pair.queue))
                pair.queue.clear()
            if pair.calling is not None:
                if now - pair.called_at >= RETRY and (pair.queue or pair.send is not None):
                    self._call(peer, pair, now)
                if pair.calling is not None:
                    deadline = min(deadline, pair.called_at + RETRY)
            for index in list(pair.rx):
                found = self._by_index.get(index)
                if found is None or found[1].expired(now):
                    self._by_index.pop(index, None)
                    pair.rx.remove(index)
            if pair.send is not None and pair.send.expired(now):
                pair.send = None
            if pair.unconfirmed is not None and pair.unconfirmed.expired(now):
                pair.unconfirmed = None
            if not pair.rx and pair.send is None and pair.calling is None and not pair.queue:
                del self._pairs[peer]
        return deadline

    def forget(self, peer: int) -> None:
        """Drop every session with `peer` (its certificate was revoked): nothing more is sealed for or opened
        from it until a new handshake, which its certificate no longer passes."""
        pair = self._pairs.pop(peer, None)
        if pair is None:
            return
        for index in pair.rx:
            self._by_index.pop(index, None)
        if pair.calling is not None:
            self._pending.pop(pair.calling, None)

    def too_big(self, origin: int, dst: int) -> None:
        """As a relay: a sealed super-frame for `dst` did not fit our next link; tell its origin to cut them."""
        self.count("drop: sealed super-frame on a link without IP fragments")
        self.send_routed(origin, Kind.E2E, bytes([TOO_BIG]) + _PEER.pack(dst))

    def peers(self) -> set[int]:
        """Members we hold end-to-end state with (sessions, a handshake, waiting data)."""
        return set(self._pairs)

    def status(self) -> dict[str, int]:
        return {
            "pairs": len(self._pairs),
            "sessions": sum(1 for p in self._pairs.values() if p.send is not None),
            "waiting": sum(len(p.queue) for p in self._pairs.values()),
        }

"""Opening links: the stages an attempt goes through until a handshake is answered, or it gives up.

1. Direct: handshake initiations to the peer's listen address, HANDSHAKE_TRIES times, HANDSHAKE_RETRY apart.
   A member reachable directly (public address, same LAN) is linked in one round trip.
2. ICE (when configured and the peer can be signalled): ICE_AFTER into the attempt, if no answer came, an OFFER
   with fresh credentials and our candidates goes to the peer (through the overlay, or in the XMPP hello of a
   joiner); its ANSWER starts the checks; the initiation then goes over the nominated pair. Host and
   server-reflexive candidates first; if no pair works, a second round with TURN relays (OFFER_RELAY), so a
   relay is used only where nothing direct works: aioice nominates aggressively, and a relay pair answers
   faster than hole punching, so one round with every candidate would often choose the relay.
3. Tunnels through each neighbour that says it is linked to the peer (overlay/link.py TunnelPath).
4. Failed: reported to maintenance, which backs off.

The offering side is the ICE controlling agent and sends the handshake initiation. When both sides call each
other, the lower node ID's call wins (its initiation is answered, the other is ignored) unless the lower side's
own attempt has gone unanswered for a whole retry interval: then the path only works one way, and it answers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from overlay.ids import node_id_from_public_key
from overlay.link import Path, TunnelPath, Via
from overlay.transport.paths import IcePath, TurnPath, UdpPath
from overlay.transport.session import PendingHandshake, new_index
from overlay.transport.signals import Signal, SignalType
from overlay.wire import Contact, Endpoint

if TYPE_CHECKING:
    from overlay.links import LinkManager
    from overlay.transport.ice import IceAgent, IceSession

log = logging.getLogger(__name__)

HANDSHAKE_RETRY = 1.0  # our choice: several RTTs on any path we expect, short enough that a join is quick
HANDSHAKE_TRIES = 3
ICE_AFTER = 0.5  # our choice: a direct handshake on a LAN or to a public member answers well inside this
ANSWER_TIMEOUT = 4.0  # an offer routed across the overlay and back: ~2 log N hops of RTT, generous
OFFER_RETRY = 1.0  # a routed offer can be lost (a link closing under it): sent again until answered
ICE_TIMEOUT = 4.0  # hole punching through endpoint-independent NATs succeeds within a few RTTs + one 0.5 s RTO
RELAY_ICE_TIMEOUT = 6.0  # a relay pair needs a TURN channel bound first
RESPONDER_TTL = 20.0  # a responder's ICE state outlives the longest initiator stage
PENDING_TTL = HANDSHAKE_RETRY * (HANDSHAKE_TRIES + 1)  # a late response still completes its handshake

Signaller = Callable[[Signal], None]


@dataclass
class Attempt:
    peer_id: int
    peer_key: bytes | None  # None until the ANSWER to an offer made before we knew the peer (a joiner's hello)
    endpoint: Endpoint | None
    contact: Contact | None
    started: float
    signal: Signaller | None
    number: int
    stage: str = "direct"  # direct | ice | tunnel
    path: Path | None = None
    kind: str = "host"
    tries: int = 0
    next_try: float = 0.0
    relays: list[int] | None = None
    # ICE: phase 0 not started, 1 host/srflx, 2 with relays; state "", offered, checking, done, failed.
    ice: IceSession | None = None
    ice_phase: int = 0
    ice_state: str = ""
    ice_since: float = 0.0
    offer: Signal | None = None
    offered_at: float = 0.0
    first_init: float | None = None
    last_path: Path | None = None  # where our last handshake initiation went
    tunnel: bool = True  # may end in a tunnel through a neighbour (not for on-demand links: still relayed)
    # A new path for a link we keep, named as its counters are ("ice restarts", "tunnel upgrades", "relay
    # upgrades"): its failure is no failure of the link.
    restart: str = ""
    relay_round: bool = True  # ICE with TURN relays when host and server-reflexive candidates found no pair


@dataclass
class _Pending:
    handshake: PendingHandshake
    peer_id: int
    peer_key: bytes
    kind: str
    sent: float


@dataclass
class _Responder:
    session: IceSession
    started: float
    task: asyncio.Task[IcePath | None] | None = None


@dataclass
class LinkSetup:
    manager: LinkManager
    agent: IceAgent | None = None
    counters: dict[str, int] = field(default_factory=dict)
    attempts: dict[int, Attempt] = field(default_factory=dict)  # by peer ID
    _pending: dict[int, _Pending] = field(default_factory=dict)  # by our handshake index
    _responders: dict[int, _Responder] = field(default_factory=dict)  # by peer ID
    _numbers: dict[int, int] = field(default_factory=dict)  # attempt number -> peer ID
    _next_number: int = 1
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # Our signed contact, fresh: set by the node (it signs with the node key over the group name).
    contact_source: Callable[[], Contact] = field(default=lambda: _no_contact())

    def count(self, what: str) -> None:
        self.manager.count(what)

    @property
    def _me(self) -> int:
        return self.manager.identity.node_id

    def _now(self) -> float:
        return self.manager.clock()

    # -- starting ----------------------------------------------------------------------------------------------
    def connect(
        self,
        peer_key: bytes,
        endpoint: Endpoint | None,
        contact: Contact | None = None,
        signal: Signaller | None = None,
        *,
        tunnel: bool = True,
    ) -> None:
        """Start (or keep going) an attempt to link to the node with this key. `signal`: how an ICE offer
        reaches the peer (None: direct and tunnels only). `tunnel`: whether the attempt may end in a tunnel."""
        peer_id = node_id_from_public_key(peer_key)
        if peer_id == self._me or peer_id in self.manager.links:
            return
        responder = self._responders.get(peer_id)
        if responder is not None and responder.task is not None and not responder.task.done():
            return  # the peer's own attempt is running its checks with us: its handshake will come
        att = self.attempts.get(peer_id)
        if att is not None:
            if att.signal is None and signal is not None:
                att.signal = signal  # a later request knows how to signal the peer: use it
            return
        att = self._new_attempt(peer_id, peer_key, endpoint, contact, signal)
        att.tunnel = tunnel
        if endpoint is None and (signal is None or self.agent is None):
            att.stage = "tunnel"
        log.debug("attempt %d to %016x: %s, %s", att.number, peer_id, endpoint, "signalled" if signal else "no signal")
        self._step(att, self._now())

    def restart(self, peer_key: bytes, signal: Signaller, *, upgrade: bool = False) -> None:
        """ICE again for a link we have: our addresses changed (a new network, a NAT that mapped us anew), or
        the link is a tunnel or goes through TURN (`upgrade`, overlay/upgrades.py). The link keeps its place and
        its session until the new path's handshake completes; then both move. A TURN link's upgrade offers host
        and server-reflexive candidates only: relays again would only find another relay."""
        peer_id = node_id_from_public_key(peer_key)
        link = self.manager.links.get(peer_id)
        if self.agent is None or link is None or peer_id in self.attempts:
            return
        att = self._new_attempt(peer_id, peer_key, None, link.contact, signal)
        att.tunnel, att.restart = False, "ice restarts"
        if upgrade:
            turn = link.kind == "relay"
            att.restart, att.relay_round = ("relay upgrades", False) if turn else ("tunnel upgrades", True)
            log.debug("ICE again for %016x: its link is %s", peer_id, "through TURN" if turn else "a tunnel")
        else:
            log.info("ICE restart for %016x: our addresses changed; the link keeps its session meanwhile", peer_id)
        self.count(att.restart)
        self._start_ice(att, phase=1, now=self._now())

    def offer(self, peer_id: int, signal: Signaller, *, xmpp: bool = True) -> Signal | None:
        """An attempt to a peer we know only by ID: the OFFER to send it (None if an attempt is under way).
        Over XMPP (an anchor seen in the room) relays are included at once, since a second round would cost
        stanzas, and the caller sends it in a hello; through the overlay (an on-demand link) it is sent here,
        host and server-reflexive candidates first, and the attempt never settles for a tunnel."""
        if peer_id == self._me or peer_id in self.manager.links or peer_id in self.attempts:
            return None
        now = self._now()
        att = self._new_attempt(peer_id, None, None, None, signal)
        att.tunnel = xmpp
        hello: Signal | None
        if self.agent is None:
            att.ice_state, att.ice_since = "offered", now  # waits for the answer's contact; no ICE
            hello = Signal(SignalType.OFFER, att.number, self.contact_source(), direct_only=not xmpp)
            att.offer, att.offered_at = (None, now) if xmpp else (hello, now)
        else:
            hello = self._start_ice(att, phase=2 if xmpp else 1, now=now, send=False)
            if xmpp:
                att.offer = None  # it travels in a hello over XMPP (TCP), exactly once
        if not xmpp and hello is not None:
            signal(hello)
        return hello

    def _new_attempt(
        self,
        peer_id: int,
        peer_key: bytes | None,
        endpoint: Endpoint | None,
        contact: Contact | None,
        signal: Signaller | None,
    ) -> Attempt:
        number = self._next_number
        self._next_number = (self._next_number % 0xFFFFFFFF) + 1
        att = Attempt(peer_id, peer_key, endpoint, contact, self._now(), signal, number)
        self.attempts[peer_id] = att
        self._numbers[number] = peer_id
        self.manager.callbacks.attempt_started()
        return att

    # -- the clock -----------------------------------------------------------------------------------------
    def tick(self, now: float) -> float:
        """Advance the attempts; returns when they next need a tick (never, with none under way: the stale
        handshakes and responders below are cleared at whatever tick comes next, they only hold memory)."""
        deadline = math.inf
        for att in list(self.attempts.values()):
            self._step(att, now)
            if att.peer_id in self.attempts:
                deadline = min(deadline, att.next_try if att.next_try > now else now + 0.25)
        for index, p in list(self._pending.items()):
            if now - p.sent > PENDING_TTL:
                del self._pending[index]
        for peer, r in list(self._responders.items()):
            if now - r.started > RESPONDER_TTL:
                self._drop_responder(peer)
        return deadline

    def _step(self, att: Attempt, now: float) -> None:
        """Advance one attempt: send what is due, move to the next stage, or give up."""
        if att.peer_key is None:
            if now - att.ice_since > ANSWER_TIMEOUT:
                self._fail(att, "no answer to the offer")
            elif att.offer is not None and att.signal is not None and now - att.offered_at >= OFFER_RETRY:
                att.offered_at = now
                att.signal(att.offer)
            return
        ice_possible = self.agent is not None and att.signal is not None
        if att.ice_state == "offered" and now - att.ice_since > ANSWER_TIMEOUT:
            self._ice_failed(att, now, answered=False)
        elif att.ice_state == "offered" and now - att.offered_at >= OFFER_RETRY and att.offer and att.signal:
            att.offered_at = now
            att.signal(att.offer)
        if att.ice_state == "checking" and now - att.ice_since > RELAY_ICE_TIMEOUT + 1.0:
            self._ice_failed(att, now, answered=True)  # the check task should have ended by now
        if (
            ice_possible
            and att.ice_phase == 0
            and att.stage == "direct"
            and now - att.started >= ICE_AFTER
            and not (self.agent is not None and self.agent.gathering(now))
        ):
            self._start_ice(att, phase=1, now=now)
        if now < att.next_try:
            return
        if att.stage == "direct":
            if att.endpoint is not None and att.tries < HANDSHAKE_TRIES:
                self._try(att, UdpPath(self.manager.underlay, att.endpoint, "host"), now)
                return
            if att.ice_state in ("offered", "checking") or (ice_possible and att.ice_phase == 0):
                att.next_try = now + 0.25
                return
            att.stage, att.tries = "tunnel", 0
            log.debug("attempt %d to %016x: direct and ICE failed, tunnels next", att.number, att.peer_id)
        if att.stage == "ice":
            if att.tries < HANDSHAKE_TRIES and att.path is not None:
                self._try(att, att.path, now)
                return
            att.stage, att.tries = "tunnel", 0
        if att.stage == "tunnel":
            if att.relays is None:
                att.relays = self.manager.callbacks.relay_candidates(att.peer_id) if att.tunnel else []
            while att.relays and att.tries >= HANDSHAKE_TRIES:
                att.relays.pop(0)
                att.tries = 0
            if att.relays:
                self._try(att, TunnelPath(self.manager, att.relays[0], att.peer_id), now)
                return
            if att.ice_state in ("offered", "checking"):
                att.next_try = now + 0.25
                return
            self._fail(att, "no path answered")

    def _try(self, att: Attempt, path: Path, now: float) -> None:
        assert att.peer_key is not None
        att.tries += 1
        att.next_try = now + HANDSHAKE_RETRY
        if att.first_init is None:
            att.first_init = now
        att.last_path = path
        self.send_handshake(path, att.peer_id, att.peer_key, now)

    def send_handshake(self, path: Path, peer_id: int, peer_key: bytes, now: float) -> None:
        """Send a handshake initiation on `path`; its response finishes the attempt or rekeys the link."""
        index = self.fresh_index()
        handshake = self.manager.handshaker.initiate(peer_key, index, time.time_ns())
        self._pending[index] = _Pending(handshake, peer_id, peer_key, path.kind, now)
        self.count("handshakes sent")
        self.manager.send_on(path, peer_id, handshake.init.encode())

    def _fail(self, att: Attempt, why: str) -> None:
        self._drop(att)
        if att.restart:
            self.count(f"{att.restart} failed")
            return
        self.count("link attempts failed")
        log.debug("link attempt to %016x failed: %s", att.peer_id, why)
        self.manager.callbacks.attempt_failed(att.peer_id)

    def _drop(self, att: Attempt) -> None:
        self.attempts.pop(att.peer_id, None)
        self._numbers.pop(att.number, None)
        if att.ice is not None:
            self._spawn(att.ice.close())
            att.ice = None

    # -- ICE as initiator ------------------------------------------------------------------------------------
    def _start_ice(self, att: Attempt, *, phase: int, now: float, send: bool = True) -> Signal | None:
        assert self.agent is not None
        if att.ice is not None:
            self._spawn(att.ice.close())
        session = self.agent.session(controlling=True, relay=phase == 2)
        att.ice, att.ice_phase, att.ice_state, att.ice_since = session, phase, "offered", now
        kind = SignalType.OFFER_RELAY if phase == 2 else SignalType.OFFER
        # DIRECT_ONLY matters to a peer that calls back (one without ICE): never for a link it already has.
        direct_only = not att.tunnel and not att.restart
        signal = Signal(kind, att.number, self.contact_source(), session.params(), direct_only=direct_only)
        log.debug("attempt %d to %016x: ICE phase %d offered", att.number, att.peer_id, phase)
        self.count(f"ice offers: phase {phase}")
        att.offer, att.offered_at = signal, now
        if send and att.signal is not None:
            att.signal(signal)
        return signal

    def _ice_failed(self, att: Attempt, now: float, *, answered: bool) -> None:
        log.debug("attempt %d to %016x: ICE phase %d failed (%s)", att.number, att.peer_id, att.ice_phase,
                  "checks" if answered else "no answer")  # fmt: skip
        if att.ice is not None:
            self._spawn(att.ice.close())
            att.ice = None
        if answered and att.ice_phase == 1 and att.relay_round and att.signal is not None and att.stage == "direct":
            self._start_ice(att, phase=2, now=now)  # nothing direct works: try again with TURN relays
            return
        att.ice_state = "failed"

    def _on_answer(self, att: Attempt, sig: Signal) -> None:
        now = self._now()
        if att.peer_key is None:
            # The answer to a joiner's hello: now we know who the anchor is and where it listens.
            att.peer_key, att.contact, att.endpoint = sig.contact.public_key, sig.contact, sig.contact.endpoint
            att.next_try = now
        if att.ice is None or att.ice_state != "offered" or sig.ice is None:
            if att.ice_state == "offered":
                att.ice_state = "failed"  # the peer runs no ICE
            self._step(att, now)
            return
        att.ice_state, att.ice_since = "checking", now
        session = att.ice
        timeout = RELAY_ICE_TIMEOUT if att.ice_phase == 2 else ICE_TIMEOUT
        task = self._spawn(session.establish(sig.ice, timeout))
        task.add_done_callback(lambda t: self._ice_done(att, session, t))
        self._step(att, now)

    def _ice_done(self, att: Attempt, session: IceSession, task: asyncio.Task[Any]) -> None:
        if self.attempts.get(att.peer_id) is not att or att.ice is not session:
            return  # the attempt ended, or moved on to another session
        path = None if task.cancelled() or task.exception() is not None else task.result()
        now = self._now()
        if path is None:
            self._ice_failed(att, now, answered=True)
            self._step(att, now)
            return
        att.ice_state = "done"
        self.count(f"ice pairs: {path.kind}")
        log.debug("attempt %d to %016x: ICE chose %s (%s)", att.number, att.peer_id, path.describe(), path.kind)
        att.stage, att.path, att.kind, att.tries, att.next_try = "ice", path, path.kind, 0, now
        self._step(att, now)

    def signal_lost(self, peer_id: int) -> None:
        """A signal for `peer_id` found no route: no answer will come, move on at once."""
        att = self.attempts.get(peer_id)
        if att is not None and att.ice_state == "offered":
            self.count("ice offers with no route")
            now = self._now()
            self._ice_failed(att, now, answered=False)
            self._step(att, now)

    # -- signals from peers ------------------------------------------------------------------------------------
    def on_signal(self, sig: Signal, reply: Signaller) -> None:
        """An OFFER, ANSWER or CANCEL from the member whose (verified) contact `sig` carries."""
        peer_id = node_id_from_public_key(sig.contact.public_key)
        if peer_id == self._me:
            return
        if sig.type == SignalType.ANSWER:
            att = self.attempts.get(self._numbers.get(sig.attempt, -1))
            if att is None or att.peer_id != peer_id:
                if peer_id not in self.manager.links:  # linked meanwhile (the peer called us back): fine
                    self.count("drop: answer to no attempt")
                return
            att.signal = reply  # the way the answer came (through the peer's own first hop) works
            self._on_answer(att, sig)
        elif sig.type in (SignalType.OFFER, SignalType.OFFER_RELAY):
            self._on_offer(peer_id, sig, reply)
        elif sig.type == SignalType.CANCEL:
            self._drop_responder(peer_id)

    def _on_offer(self, peer_id: int, sig: Signal, reply: Signaller) -> None:
        own = self.attempts.get(peer_id)
        now = self._now()
        log.debug("offer %d from %016x (%s, own attempt: %s)", sig.attempt, peer_id, sig.type.name,
                  own.ice_state if own else None)  # fmt: skip
        if own is not None and (own.stage == "ice" or own.ice_state == "done"):
            # We have a path and our initiation is on its way: the peer answers that instead.
            self.count("ice offers while handshaking")
            return
        if own is not None and self._me < peer_id and self._healthy(own, now):
            # Both sides offered: the lower ID's offer wins, the peer answers ours and drops its attempt. Unless
            # ours has gone unanswered for a retry interval: then our signals do not reach it, and we answer.
            self.count("ice offer collisions")
            return
        if self.agent is None or sig.ice is None:
            # No ICE on one side: "link to me". Answer with our contact and call back directly; for an offer that
            # takes no tunnel (on demand), our call back takes none either: it would open the link as a tunnel,
            # still relayed, when the direct handshake is slow (seen on a loaded host with a stream running).
            reply(Signal(SignalType.ANSWER, sig.attempt, self.contact_source()))
            self.connect(sig.contact.public_key, sig.contact.endpoint, sig.contact, tunnel=not sig.direct_only)
            return
        if own is not None:
            # The peer's attempt runs the checks and the handshake; ours would only race it to a tunnel.
            self._drop(own)
        self._drop_responder(peer_id)
        peer_relays = any(c.type == "relay" for c in sig.ice.candidates)
        session = self.agent.session(
            controlling=False, relay=sig.type == SignalType.OFFER_RELAY, peer_relays=peer_relays
        )
        responder = self._responders[peer_id] = _Responder(session, self._now())
        reply(Signal(SignalType.ANSWER, sig.attempt, self.contact_source(), session.params()))
        timeout = RELAY_ICE_TIMEOUT if sig.type == SignalType.OFFER_RELAY else ICE_TIMEOUT
        responder.task = self._spawn(session.establish(sig.ice, timeout + 2.0))

    @staticmethod
    def _healthy(att: Attempt, now: float) -> bool:
        """Whether an attempt's ICE is making progress: checking, or offered less than a retry interval ago."""
        return att.ice_state == "checking" or (att.ice_state == "offered" and now - att.ice_since < OFFER_RETRY)

    def _drop_responder(self, peer_id: int) -> None:
        r = self._responders.pop(peer_id, None)
        if r is not None:
            if r.task is not None:
                r.task.cancel()
            self._spawn(r.session.close())

    # -- what the link manager asks --------------------------------------------------------------------------
    def own_call_path(self, peer_id: int) -> Path | None:
        """Where our own call to the peer went, if it is under HANDSHAKE_RETRY old and ours is the lower ID: a
        call of the peer's that crossed it on that path is the one to ignore (the lower ID's call wins)."""
        att = self.attempts.get(peer_id)
        if att is None or att.first_init is None or self._me > peer_id:
            return None
        return att.last_path if self._now() - att.first_init < HANDSHAKE_RETRY else None

    def kind_hint(self, peer_id: int, via: Via) -> str:
        """The candidate type of a path a peer's initiation came in on (for a responder's status)."""
        if isinstance(via, TurnPath):
            return "relay"
        if isinstance(via, int):
            return "tunnel"
        att = self.attempts.get(peer_id)
        if att is not None and att.endpoint == via:
            return "host"
        r = self._responders.get(peer_id)
        if r is not None:
            for c in r.session.connection.remote_candidates:
                if (c.host, c.port) == via:
                    return str(c.type)
            return "prflx"  # learned from the checks, not signalled
        return "host"

    def pending(self, index: int) -> tuple[PendingHandshake, int, bytes, str] | None:
        p = self._pending.pop(index, None)
        return None if p is None else (p.handshake, p.peer_id, p.peer_key, p.kind)

    def finish(self, peer_id: int) -> Contact | None:
        """A handshake with the peer completed: end our attempt and responder state; the contact we had."""
        att = self.attempts.get(peer_id)
        contact = att.contact if att is not None else None
        if att is not None:
            self._drop(att)
        self._drop_responder(peer_id)
        return contact

    def fresh_index(self) -> int:
        while True:
            i = new_index()
            if not self.manager.index_in_use(i) and i not in self._pending:
                return i

    def close_all(self) -> None:
        for att in list(self.attempts.values()):
            self._drop(att)
        for peer in list(self._responders):
            self._drop_responder(peer)
        self._pending.clear()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _no_contact() -> Contact:
    raise RuntimeError("LinkSetup.contact_source was not set by the node")

"""The node's side of the XMPP room: joining the one overlay, keeping the room supplied with anchors, and
finding the way back when cut off. Everything after the first link travels through the overlay
(docs/xmpp-bootstrap.md, docs/nat-traversal.md).

A visit to the room (one at a time, retried with jittered exponential backoff, never fatal once the node has
started): log in, look at the anchors present, and
- join: send each anchor of the oldest overlay present a hello carrying an ICE offer; their answers start
  the links; the first link up runs the join FIND. Anchors also call the joiner back and introduce it to the
  nodes at its ring place, so a joiner that cannot reach any anchor still gets in through members it can
  reach. Only when the room holds no anchor does a node found an overlay: when it is alone there, or after
  FOUND_GRACE the smallest nick among the occupants (a storm of joiners agrees on one founder). A failed link
  is never a reason to found one.
- bridge: a node cut off from its overlay's leader (overlay/beacon.py), or left without any link for
  ALONE_AFTER (an anchor too), links to the other anchors and joins again through them; a node whose
  overlay is younger than one present moves into it. With no anchor of its overlay present, a node already
  in an overlay becomes its anchor.
- anchor: stay in the room marked as an anchor of our overlay while fewer than `anchors` are.

Anchors answer hellos, pass signals between joiners and the overlay, recruit a neighbour through the overlay
when too few anchors remain, stand down when too many are present (the `anchors` smallest nicks stay), and the
smallest of them (the leader) advances the beacon.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from overlay.beacon import BEACON_INTERVAL, NO_OVERLAY, new_overlay_id, wins
from overlay.ids import format_id
from overlay.linksetup import Signaller
from overlay.port import MemberPort
from overlay.transport.signals import Signal, decode_routed_signal, decode_signal, encode_routed_signal
from overlay.trust.issuer import REQUEST_MAGIC
from overlay.wire import DecodeError, Kind, LinkMsg
from xmpp_bootstrap.protocol import DEFAULT_ANCHORS, should_stand_down
from xmpp_bootstrap.session import BootstrapError

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 5.0  # our choice: anchors answer from memory; XMPP adds a few server hops
LINK_WAIT = 8.0  # a link attempt's stages: direct 3 s, ICE 4-10 s; the first of them usually wins in < 1 s
VISIT_TIME = 30.0  # the longest a joiner stays in the room per visit before leaving and retrying later
FOUND_GRACE = 2.0  # our choice: joiners that arrive together see each other within a presence round trip
ALONE_AFTER = 10.0  # a node without links for this long visits the room and links to its overlay's anchors
RECRUIT_INTERVAL = 10.0  # our choice: a missing anchor is replaced within seconds, XMPP load stays tiny
BACKOFF_FIRST = 2.0
BACKOFF_MAX = 60.0
ISLAND_JITTER = 10.0  # spreads the visits of a cut-off island's nodes; the first bridge stops the rest


def _nick_id(nick: str) -> int | None:
    try:
        value = int(nick, 16)
    except ValueError:
        return None
    return value if len(nick) == 16 else None


class Membership:
    def __init__(self, node: MemberPort, bootstrap: Any, *, anchors: int = DEFAULT_ANCHORS) -> None:
        self.node = node
        self.bootstrap = bootstrap
        self.anchors = anchors
        bootstrap.on_hello = self._on_hello
        bootstrap.on_signal = self._on_signal
        bootstrap.on_change = node.wake
        node.signalling.xmpp_relay = self._relay_to_joiner
        self.state = "starting"  # starting, joining, rejoining (without XMPP), member, founder
        self.last_error = ""
        self.visits = 0
        self._task: asyncio.Future[None] | None = None
        self._want_anchor = False
        self._next_visit = 0.0
        self._failures = 0
        self._alone_since: float | None = None
        self._island_jitter = node.rng.uniform(0, ISLAND_JITTER)
        self._next_beacon = 0.0
        self._last_recruit = -1e18  # when we, an anchor, last asked a neighbour to become one
        self._recruited_at = -1e18  # when a neighbour last asked us
        self._asked: int | None = None  # the neighbour we asked then
        self._refused: dict[int, float] = {}  # neighbour -> when it refused: not asked again for RECRUIT_INTERVAL
        self._joiners: dict[int, tuple[str, float]] = {}  # joiner ID -> (room nick, when its hello came)
        self._room_changed = asyncio.Event()
        self.without_xmpp = False  # started through remembered members while XMPP was unreachable
        ts = node.trust_service
        self._issuer = ts is not None and ts.issuer is not None

    # -- life cycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Log in and enter the room once: a wrong password, a missing room or not being a member raises
        BootstrapError here. Joining the overlay goes on in the background, retried until it succeeds."""
        await self.bootstrap.start()
        self.state = "joining"
        self._run(self._visit("join"))

    def start_without_room(self, remembered: int) -> None:
        """The XMPP server could not be reached at start: the node links to the members it remembers
        (Node.start) while visits to the room keep being retried with backoff."""
        self.state = "rejoining"
        self.without_xmpp = True
        self._fail(f"XMPP server unreachable at start: rejoining through {remembered} remembered members")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.bootstrap.stop()

    @property
    def is_anchor(self) -> bool:
        return bool(self.bootstrap.is_anchor)

    def status(self) -> dict[str, Any]:
        now = self.node.clock()
        return {
            "state": self.state,
            "anchor": self.is_anchor,
            "in_room": bool(self.bootstrap.in_room),
            "visiting": self._task is not None,  # a visit under way: login, room, hellos, until logged out again
            "visits": self.visits,
            "started_without_xmpp": self.without_xmpp,
            "retry_in_s": round(max(0.0, self._next_visit - now), 1) if self._task is None and self._failures else 0,
            "last_error": self.last_error,
            "xmpp": dict(self.bootstrap.stats),
        }

    def _run(self, work: Coroutine[Any, Any, None]) -> None:
        async def guarded() -> None:
            try:
                await work
                self._failures = 0
            except BootstrapError as e:
                self._fail(str(e))
                await self._leave()
            except (OSError, ConnectionError, TimeoutError) as e:
                self._fail(f"XMPP: {e}")
                await self._leave()
            finally:
                self._task = None
                self.node.wake()

        self._task = asyncio.ensure_future(guarded())
        self._task.add_done_callback(lambda _: work.close())  # cancelled before it began (a stop): no warning

    def _fail(self, why: str) -> None:
        self._failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._failures - 1)) * self.node.rng.uniform(0.75, 1.25)
        self._next_visit = self.node.clock() + delay
        if why != self.last_error:
            log.warning("%s; retrying in %.0f s (and later, backing off)", why, delay)
        self.last_error = why

    async def _leave(self) -> None:
        if not (self._want_anchor or self._issuer) or not self.bootstrap.in_room:
            try:
                await self.bootstrap.stop()
            except Exception:  # already gone: nothing to clean up
                pass

    # -- the clock -------------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        node, boot = self.node, self.bootstrap
        self._room_changed.set()
        links = node.links.links
        if links:
            self._alone_since = None
            if self.state == "rejoining" and node.beacon.overlay != NO_OVERLAY:
                self.state = "member"
                log.info("rejoined overlay %016x through remembered members, without XMPP", node.beacon.overlay)
        elif self._alone_since is None:
            self._alone_since = now
        if self._task is None and now >= self._next_visit:
            if node.beacon.overlay == NO_OVERLAY:
                self._run(self._visit("join"))
            elif (self._want_anchor or self._issuer) and not boot.in_room:
                self._run(self._visit("anchor"))  # our session dropped: come back as an anchor (or issuer)
            elif not boot.is_anchor and node.beacon.island(now - self._island_jitter):
                log.info("no beacon from our overlay's leader for %.0f s: going to the room", now - node.beacon.heard)
                self._run(self._visit("island"))
            elif self._alone_since is not None and now - self._alone_since > ALONE_AFTER:
                # Anchors too: one whose links all died is in no ring and hears no beacon, and the joiners that
                # would link to it have all joined (a cut-off anchor stayed out for good). A founder waiting for
                # its first joiner finds no other anchor and stays; at most one such look per ALONE_AFTER.
                self._alone_since = now
                self._run(self._visit("alone"))
        if boot.is_anchor:
            self._anchor_duties(now)
        for joiner, (_, when) in list(self._joiners.items()):
            if now - when > VISIT_TIME * 2:
                del self._joiners[joiner]

    def _anchors_of(self, overlay: int) -> list[str]:
        """Nicks of the anchors of `overlay` present (ourselves included when we are one)."""
        return sorted(n for n, o in self.bootstrap.occupants.items() if o.anchor and o.overlay == overlay)

    def _anchor_duties(self, now: float) -> None:
        node, boot = self.node, self.bootstrap
        mine = node.beacon.overlay
        ours = self._anchors_of(mine)
        if ours and ours[0] == boot.nick and now >= self._next_beacon:
            self._next_beacon = now + BEACON_INTERVAL
            node.flood_beacon(node.beacon.emit(now), None)
        if should_stand_down(boot.nick, ours, self.anchors):
            log.info("standing down as an anchor: %d anchors present", len(ours))
            self._want_anchor = False
            boot.set_anchor(None)
            if self._task is None and not self._issuer:
                self._run(self._leave())
            return
        if len(ours) < self.anchors and node.links.links and now - self._last_recruit >= RECRUIT_INTERVAL:
            self._last_recruit = now
            self._refused = {p: t for p, t in self._refused.items() if now - t < RECRUIT_INTERVAL}
            anchor_ids = {_nick_id(n) for n in ours}
            candidates = sorted(p for p in node.links.links if p not in anchor_ids and p not in self._refused)
            self._asked = node.rng.choice(candidates) if candidates else None
            if self._asked is not None:
                node.links.links[self._asked].send(bytes([LinkMsg.ANCHOR]))
        others = [o.overlay for o in boot.occupants.values() if o.anchor and o.overlay and o.overlay != mine]
        if self._task is None and others and wins(min(others), mine):
            self._run(self._visit("merge"))

    def on_recruited(self, now: float) -> bool:
        """A neighbour asked us to become an anchor (LinkMsg.ANCHOR): whether we go (False: the caller answers
        ANCHOR_REFUSED). Being asked does not hold back our own recruiting once we are an anchor: an anchor that
        was recruited moments ago replaces a missing one at once (it had to wait RECRUIT_INTERVAL, and a
        replacement took up to 20 s)."""
        if self.is_anchor or self._task is not None or now - self._recruited_at < RECRUIT_INTERVAL:
            return False
        self._recruited_at = now
        self._run(self._visit("anchor"))
        return True

    def on_refused(self, peer: int, now: float) -> None:
        """A neighbour we asked will not become an anchor (LinkMsg.ANCHOR_REFUSED): ask another at the next tick
        rather than after RECRUIT_INTERVAL. At most one neighbour a RECRUIT_INTERVAL still accepts."""
        if peer != self._asked or not self.bootstrap.is_anchor or now - self._last_recruit >= RECRUIT_INTERVAL:
            return  # not an answer to our last question (or we are no anchor any more): one retry per refusal
        self._asked = None
        self._refused[peer] = now
        self._last_recruit = now - RECRUIT_INTERVAL
        self.node.wake()

    # -- a visit to the room -----------------------------------------------------------------------------------
    async def _visit(self, reason: str) -> None:
        node, boot = self.node, self.bootstrap
        self.visits += 1
        await boot.start()
        loop = asyncio.get_running_loop()
        entered = loop.time()
        tried: set[str] = set()
        while loop.time() - entered < VISIT_TIME:
            mine = node.beacon.overlay
            anchors = {n: o.overlay for n, o in boot.occupants.items() if o.anchor and o.overlay and n != boot.nick}
            if anchors:
                target = min(anchors.values())
                rejoin = reason in ("island", "alone") and target == mine  # cut off from our own overlay
                bridge = mine == NO_OVERLAY or wins(target, mine) or rejoin
                if not bridge:
                    break  # our overlay is the oldest here: the others come to us
                nicks = [n for n, o in anchors.items() if o == target and n not in tried]
                tried.update(nicks)
                linked = await self._link_to_anchors(nicks, target, reason)
                if linked:
                    break
                if not nicks:
                    tried.clear()
                    await self._room_change(2.0)
                continue
            if mine != NO_OVERLAY:
                break  # no anchor of any overlay here: we become one below
            others = [n for n in boot.occupants if n != boot.nick]
            if not others or (min(others) > boot.nick and loop.time() - entered >= FOUND_GRACE):
                node.beacon.found(new_overlay_id(node.clock(), node.rng), node.clock())
                self.state = "founder"
                log.info("no other member in the room: founding overlay %016x", node.beacon.overlay)
                break
            await self._room_change(0.5)
        await self._settle()

    async def _link_to_anchors(self, nicks: list[str], target: int, reason: str) -> bool:
        """Hellos with ICE offers to these anchors; True once a link to any member is up (then joined)."""
        node, boot = self.node, self.bootstrap
        before = set(node.links.links)
        if node.ice is not None:
            await node.ice.gathered()  # offers carry our server-reflexive and relayed candidates
        hellos = {}
        for nick in nicks:
            anchor = _nick_id(nick)
            if anchor is None:
                continue
            offer = node.links.setup.offer(anchor, self._xmpp_signaller(nick, anchor))
            if offer is not None:
                hellos[nick] = encode_routed_signal(anchor, offer)
        answered = 0
        if hellos:
            answers = await boot.exchange(hellos, timeout=HELLO_TIMEOUT)
            for nick, payload in answers.items():
                self._take_signal(payload, nick)
            answered = len(answers)
        loop = asyncio.get_running_loop()
        end = loop.time() + LINK_WAIT
        while loop.time() < end:
            new = [p for p in node.links.links if p not in before]
            if new or (reason == "join" and node.links.links):
                via = new[0] if new else next(iter(node.links.links))
                if node.beacon.overlay != target:
                    if node.beacon.overlay != NO_OVERLAY:
                        log.info("moving from overlay %016x into the older %016x", node.beacon.overlay, target)
                    node.beacon.enter(target, node.clock())
                if reason != "join" or node.first_link_at < node.clock() - 1:
                    node.finder.join(via=via)
                self.state = "member"
                log.info("joined overlay %016x through %s (%s)", target, format_id(via), reason)
                return True
            await self._room_change(0.25)
        if hellos:  # why a join takes long: the anchors did not answer, or their answers led to no link
            log.info("no link to overlay %016x yet: %d of %d anchors answered within %.0f s, no link %.0f s after",
                     target, answered, len(hellos), HELLO_TIMEOUT, LINK_WAIT)  # fmt: skip
        return False

    async def _settle(self) -> None:
        """After a visit: stay as an anchor if our overlay has too few in the room, else leave XMPP."""
        node, boot = self.node, self.bootstrap
        mine = node.beacon.overlay
        if mine == NO_OVERLAY:
            self._fail("could not link to any member of the group yet")
            if not self._issuer:
                await boot.stop()
            return
        if self.state == "joining":
            self.state = "member"
        present = [n for n in self._anchors_of(mine) if n != boot.nick]
        if boot.is_anchor or len(present) < self.anchors:
            self._want_anchor = True
            boot.set_anchor(mine)
            return
        self._want_anchor = False
        if self._issuer:
            return  # an issuer stays in the room: joiners ask it for their first certificate there
        await boot.stop()

    async def _room_change(self, timeout: float) -> None:
        self._room_changed.clear()
        try:
            await asyncio.wait_for(self._room_changed.wait(), timeout)
        except TimeoutError:
            pass

    # -- signals over XMPP -----------------------------------------------------------------------------------
    def _xmpp_signaller(self, nick: str, final: int) -> Signaller:
        boot = self.bootstrap

        def send(signal: Signal) -> None:
            boot.send_signal(nick, encode_routed_signal(final, signal))

        return send

    def _take_signal(self, payload: bytes, nick: str) -> int | None:
        """A signal that came over XMPP from `nick`, for us: replies go back the same way."""
        try:
            final, _, raw = decode_routed_signal(payload)
        except DecodeError:
            self.node.count("drop: malformed XMPP signal")
            return None
        if final != self.node.id:
            return None
        return self.node.signalling.receive(raw, lambda sender: self._xmpp_signaller(nick, sender))

    def _on_hello(self, payload: bytes, nick: str) -> bytes | None:
        """A joiner's hello (its OFFER), seen as an anchor: answer it, call it back, introduce it. On an
        issuer, also a certificate request (overlay/trust/enroll.py)."""
        node = self.node
        if payload.startswith(REQUEST_MAGIC):
            ts = node.trust_service
            return ts.answer_hello(payload, nick) if ts is not None else None
        if not self.is_anchor:
            return None
        try:
            final, _, raw = decode_routed_signal(payload)
            signal = decode_signal(raw)
        except DecodeError:
            node.count("drop: malformed hello")
            return None
        if final != node.id:
            return None
        answer: list[Signal] = []
        sender = node.signalling.receive(raw, lambda _sender: answer.append)
        if sender is None or not answer:
            return None
        self._joiners[sender] = (nick, node.clock())
        node.table.learn([sender])
        anchors = {_nick_id(n) for n, o in self.bootstrap.occupants.items() if o.anchor}
        others = sorted(p for p in node.links.links if p not in anchors)
        node.finder.introduce(signal.contact, node.rng.choice(others) if others else None)
        return encode_routed_signal(sender, answer[0])

    def _on_signal(self, payload: bytes, nick: str) -> None:
        """A one-way signal over XMPP: for us (a member passing an offer through its anchor), or from a joiner
        for a member in the overlay (then we route it on)."""
        try:
            final, _, _ = decode_routed_signal(payload)
        except DecodeError:
            self.node.count("drop: malformed XMPP signal")
            return
        if final == self.node.id:
            self._take_signal(payload, nick)
        elif self.is_anchor:
            self.node.send_routed(final, Kind.SIGNAL, payload)

    def _relay_to_joiner(self, joiner: int, body: bytes) -> bool:
        entry = self._joiners.get(joiner)
        return entry is not None and self.bootstrap.send_signal(entry[0], body)

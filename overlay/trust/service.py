"""The group's certificates on a running node: revocations spread by flooding, renewal through the overlay,
and (on an issuer) answering requests and watching the room's member list.

- Revocations: a node that learns a revocation (LinkMsg.REVOKE) it did not have passes it to every other link,
  closes its links to the nodes it covers and drops their address records; a new link gets our whole list
  (a few hundred bytes per revoked member), so a node that was away catches up on its first link.
- Renewal: at half its certificate's life a member sends a signed request (overlay/trust/issuer.py) routed to an
  issuer it knows (Kind.CERT), and retries every RENEW_RETRY with another while the answer does not come.
- Issuer: answers Kind.CERT requests routed to it and certificate requests in the room (first certificates,
  which need the requester's JID as the XMPP server vouches for it), and every MEMBER_POLL reads the room's
  member list: a JID that left it is revoked at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from overlay.link import Link
from overlay.port import OverlayPort
from overlay.trust.certs import CertError, Certificate
from overlay.trust.issuer import ANSWER_MAGIC, REQUEST_MAGIC, Issuer, decode_answer, make_request
from overlay.trust.members import GroupTrust
from overlay.trust.revocations import Revocation, RevocationSet
from overlay.wire import Kind, LinkMsg, Routed

log = logging.getLogger(__name__)

RENEW_RETRY = 30.0  # our choice: an issuer that does not answer is tried again (or another one) twice a minute
# Our choice: a member removed from the room is cut off within the 60 s: 10 s to notice, then a flood
# that crosses the overlay in well under a second per hop.
MEMBER_POLL = 10.0


class TrustService:
    def __init__(self, node: OverlayPort, trust: GroupTrust, issuer: Issuer | None = None) -> None:
        self.node = node
        self.trust = trust
        self.issuer = issuer
        self._next_renew = 0.0
        self._addresses: dict[int, int] = {}  # node ID -> certificate address as an int (the data path's check)
        self._poll_task: asyncio.Task[None] | None = None
        self.bootstrap: Any = None
        self._poll_event = asyncio.Event()
        # Set by the node: drops held address records the group no longer vouches for (overlay/dht/store.py),
        # and forgets a revoked node everywhere else (its end-to-end sessions, its cached address).
        self.purge_records: Callable[[], int] = lambda: 0
        self.forget_node: Callable[[int], None] = lambda node_id: None
        if issuer is not None:
            for rev in issuer.revocations.items():
                trust.revoke(rev)

    # -- cryptokey routing ------------------------------------------------------------------------------------
    def source_of(self, node_id: int) -> int | None:
        """The address `node_id`'s certificate gives it, as an int; None when we hold no valid certificate."""
        address = self._addresses.get(node_id)
        if address is None:
            ip = self.trust.address_of(node_id)
            if ip is None:
                return None
            address = self._addresses[node_id] = int(ip)
        return address

    # -- revocations ------------------------------------------------------------------------------------------
    def on_link_up(self, link: Link) -> None:
        for msg in _revoke_messages(self.trust.revocations.items()):
            link.send(msg)

    def on_revoke(self, link: Link, body: bytes) -> None:
        try:
            revs = RevocationSet.decode_list(body)
        except CertError:
            self.node.count("drop: malformed revocation list")
            return
        self.apply(revs, came_from=link.peer_id)

    def apply(self, revs: list[Revocation], came_from: int | None = None) -> None:
        """Take revocations (checked against the group key inside); pass on what was news, cut who it covers."""
        news: list[Revocation] = []
        cut: list[int] = []
        for rev in revs:
            cut_off = self.trust.revoke(rev)
            if cut_off is not None:
                news.append(rev)
                cut += cut_off
        if not news:
            return
        self.node.count("revocations applied", len(news))
        self._addresses.clear()
        if self.issuer is not None:
            for rev in news:
                self.issuer.revocations.add(rev, self.issuer.public_key, self.node.clock())
            self.issuer.save()
        msgs = _revoke_messages(news)
        for peer, link in list(self.node.links.links.items()):
            if peer != came_from:
                for msg in msgs:
                    link.send(msg)
        for peer in set(cut):
            self.forget_node(peer)
            if peer in self.node.links.links:
                log.warning("link to %016x closed: its certificate was revoked", peer)
                self.node.links.close(peer, "certificate revoked")
        purged = self.purge_records()
        if purged:
            self.node.count("records dropped: revoked", purged)

    # -- renewal through the overlay -------------------------------------------------------------------------
    def tick(self, now: float) -> float:
        """Ask for a new certificate when due; returns when to be called again."""
        cert = self.trust.certificate
        if cert is None:
            return float("inf")
        due = self.trust.renew_at()
        if now < due:
            return due
        if now >= self._next_renew:
            self._next_renew = now + RENEW_RETRY
            issuers = sorted(self.trust.issuers - {self.node.id})
            if self.issuer is not None:
                self._take(self.issuer.handle(self._request(now), cert.jid, now))
            elif issuers:
                issuer = self.node.rng.choice(issuers)
                self.node.count("certificate renewals asked")
                self.node.send_routed(issuer, Kind.CERT, self._request(now))
            elif cert.not_after_ms / 1000 - now < 3600:
                left = (cert.not_after_ms / 1000 - now) / 60
                log.warning("certificate expires in %.0f min and no issuer is known", left)
        return self._next_renew

    def _request(self, now: float) -> bytes:
        cert = self.trust.certificate
        assert cert is not None
        return make_request(self.node.identity, self.node.room, now, cert.address.ip, cert.encode()).encode()

    def on_cert(self, pkt: Routed) -> None:
        now = self.node.clock()
        if pkt.body.startswith(REQUEST_MAGIC):
            if self.issuer is None:
                self.node.count("drop: certificate request to a non-issuer")
                return
            self.node.send_routed(pkt.src, Kind.CERT, self.issuer.handle(pkt.body, None, now))
        elif pkt.body.startswith(ANSWER_MAGIC):
            self._take(pkt.body)
            self.trust.issuers.add(pkt.src)

    def _take(self, answer: bytes) -> None:
        try:
            result = decode_answer(answer)
        except CertError:
            self.node.count("drop: malformed certificate answer")
            return
        if not isinstance(result, Certificate):
            log.warning("certificate renewal refused: %s", result)
            self.node.count("certificate renewals refused")
            return
        old = self.trust.certificate
        try:
            self.trust.set_certificate(result)
        except ValueError as e:
            log.warning("renewed certificate not usable: %s", e)
            return
        if old is not None and result.address != old.address:
            log.error("renewed certificate moves us to %s from %s: kept the old one", result.address, old.address)
            self.trust.certificate = old
            return
        self.node.count("certificates renewed")
        log.info("certificate renewed until %s", result.not_after_ms // 1000)

    # -- issuer: the room ------------------------------------------------------------------------------------
    def answer_hello(self, payload: bytes, nick: str) -> bytes | None:
        """A certificate request in the room: answered with the requester's JID as the server gave it."""
        if self.issuer is None or self.bootstrap is None:
            return None
        occupant = self.bootstrap.occupants.get(nick)
        jid = getattr(occupant, "jid", None)
        now = self.node.clock()
        if jid is not None and jid.lower() not in self.issuer.members:
            self.poll_now()  # added to the room a moment ago? the joiner asks again in a few seconds
        return self.issuer.handle(payload, jid, now)

    def start_polling(self, bootstrap: Any) -> None:
        """Remember the room (issuers learned there); on an issuer, apply the revocations it holds (made before
        this node ran, or while it issued its own certificate) and start reading the member list."""
        self.bootstrap = bootstrap
        if self.issuer is not None and self._poll_task is None:
            self.apply(self.issuer.revocations.items())
            self._poll_task = asyncio.ensure_future(self._poll_members())

    def poll_now(self) -> None:
        self._poll_event.set()

    async def _poll_members(self) -> None:
        from xmpp_bootstrap.session import BootstrapError

        assert self.issuer is not None
        said = ""
        while True:
            try:
                if self.bootstrap.in_room:
                    affiliations = await self.bootstrap.fetch_affiliations()
                    revs = self.issuer.set_members(affiliations, self.node.clock())
                    if revs:
                        self.apply(revs)
                    said = ""
            except BootstrapError as e:
                if str(e) != said:
                    log.warning("reading the room's member list: %s", e)
                    said = str(e)
            except Exception:
                log.exception("reading the room's member list failed")
            self._poll_event.clear()
            try:
                await asyncio.wait_for(self._poll_event.wait(), MEMBER_POLL)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            self._poll_task = None

    def status(self) -> dict[str, Any]:
        st = self.trust.status()
        st["issuers"] = [f"{i:016x}" for i in sorted(self.trust.issuers)]
        if self.issuer is not None:
            st["issuer"] = {"members": len(self.issuer.members), "allocations": len(self.issuer.allocations)}
        return st


# A revocation is ~120-400 bytes (its JID's length): 4 per message keep each under a 1,400-byte datagram, so a
# list crosses links whose paths drop IP fragments, and a long list never exceeds a UDP datagram.
REVOCATIONS_PER_MESSAGE = 4


def _revoke_messages(revs: list[Revocation]) -> list[bytes]:
    return [
        bytes([LinkMsg.REVOKE]) + RevocationSet.encode_list(revs[i : i + REVOCATIONS_PER_MESSAGE])
        for i in range(0, len(revs), REVOCATIONS_PER_MESSAGE)
    ]

"""The node's side of the XMPP bootstrap: joining through the anchors, rejoining when alone, keeping the room
supplied with anchors. Everything after the first link travels through the overlay (docs/xmpp-bootstrap.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from overlay.ids import node_id_from_public_key
from overlay.port import OverlayPort
from overlay.wire import LinkMsg

log = logging.getLogger(__name__)

FIRST_LINK_TIMEOUT = 15.0
HANDSHAKE_WAIT = 4.0  # a direct handshake tries 3 times 1 s apart (links.py); then ask the anchors again
RECRUIT_INTERVAL = 30.0  # our choice: anchors are replaced within a minute, XMPP load stays negligible
REJOIN_INTERVAL = 15.0  # our choice: XMPP load stays low even if a whole partition rejoins


class Membership:
    def __init__(self, node: OverlayPort, bootstrap: Any) -> None:
        self.node = node
        self.bootstrap = bootstrap
        bootstrap.on_hello = self._on_hello
        self._last_rejoin = node.clock()
        self._last_recruit = -1e18
        self._task: asyncio.Future[None] | None = None

    async def join(self) -> None:
        """Swap contacts with the anchors and link to one; then stay in the room as an anchor or leave it."""
        node = self.node
        deadline = node.clock() + FIRST_LINK_TIMEOUT
        while not node.links.links and node.clock() < deadline:
            answers = await self.bootstrap.exchange(node.contact().encode())
            contacts = [c for c in (node.check_contact(a) for a in answers) if c is not None]
            if not contacts:
                log.info("no anchor answered: this node starts the overlay")
                break
            for c in contacts:
                node.links.connect(c.public_key, c.endpoint, c)
            try:
                await asyncio.wait_for(node.first_link.wait(), timeout=HANDSHAKE_WAIT)
            except TimeoutError:
                continue
        await self.bootstrap.settle()

    def _on_hello(self, hello: bytes) -> bytes | None:
        """A joiner's contact, seen as an anchor: learn it, answer with ours."""
        contact = self.node.check_contact(hello)
        if contact is None:
            return None
        self.node.table.learn([node_id_from_public_key(contact.public_key)])
        return self.node.contact().encode()

    def tick(self, now: float) -> None:
        self._rejoin_if_alone(now)
        self._recruit_anchor(now)

    def _rejoin_if_alone(self, now: float) -> None:
        """A node that lost every link (its neighbours all left, or a partition) asks the anchors again."""
        if self.node.links.links or self._task is not None or now - self._last_rejoin < REJOIN_INTERVAL:
            return
        self._last_rejoin = now

        async def rejoin() -> None:
            if not self.bootstrap.is_anchor:
                await self.bootstrap.become_anchor()  # back in the room; settle() may leave it again
            await self.join()

        self._run(rejoin, "rejoin through XMPP failed")

    def _recruit_anchor(self, now: float) -> None:
        """An anchor that sees fewer anchors in the room than wanted (one left or crashed) asks a random
        neighbour, through the overlay, to join the room as one: joiners keep finding someone to answer them
        without any node watching the room but the anchors."""
        boot, links = self.bootstrap, self.node.links.links
        if not boot.is_anchor or not links or now - self._last_recruit < RECRUIT_INTERVAL:
            return
        if boot.anchors_present() >= boot.anchors:
            return
        self._last_recruit = now
        links[self.node.rng.choice(sorted(links))].send(bytes([LinkMsg.ANCHOR]))

    def on_recruited(self, now: float) -> None:
        """A neighbour asked us to become an anchor (LinkMsg.ANCHOR)."""
        if self.bootstrap.is_anchor or self._task is not None or now - self._last_recruit < RECRUIT_INTERVAL:
            return
        self._last_recruit = now

        async def become() -> None:
            await self.bootstrap.become_anchor()
            await self.bootstrap.settle()  # steps down again if the room has enough anchors by now

        self._run(become, "could not become an anchor")

    def _run(self, work: Callable[[], Coroutine[Any, Any, None]], failure: str) -> None:
        async def guarded() -> None:
            try:
                await work()
            except Exception as e:  # XMPP may be down: the next attempt comes later
                log.warning("%s: %s", failure, e)
            finally:
                self._task = None

        self._task = asyncio.ensure_future(guarded())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.bootstrap.stop()

"""OverlayPort: what the services built on the overlay (the address DHT, membership, finds) may use of a node.

A narrow, typed view instead of the whole Node: the services depend on this protocol and the Node satisfies it,
so no service module imports the node module back. In-memory tests can hand a service any object with these
members.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Protocol

from overlay.identity import Identity
from overlay.links import LinkManager
from overlay.routing.ring import RingTable
from overlay.tap.frames import Bytes

if TYPE_CHECKING:  # types only: these modules build on this one
    from overlay.beacon import Beacon
    from overlay.finds import Finder
    from overlay.signalling import Signalling
    from overlay.transport.ice import IceAgent
    from overlay.trust.members import GroupTrust
    from overlay.trust.service import TrustService
from overlay.wire import FLAG_EXACT, Contact, Kind, Routed


class OverlayPort(Protocol):
    id: int
    identity: Identity
    room: str
    address: str  # our virtual IPv4 address, without prefix
    address6: str | None  # our virtual IPv6 address, without prefix; None without one
    table: RingTable
    links: LinkManager
    rng: random.Random
    first_link: asyncio.Event
    first_link_at: float
    trust: GroupTrust | None  # the group's certificates and revocations; None in a group without them

    def clock(self) -> float: ...

    def count(self, what: str, n: int = 1) -> None: ...

    def contact(self) -> Contact:
        """Our signed contact, fresh."""
        ...

    def check_contact(self, data: bytes) -> Contact | None:
        """A peer's contact if it parses and is signed for this group, else None (counted)."""
        ...

    def send_routed(
        self, dst: int, kind: Kind, body: bytes, flags: int = FLAG_EXACT, via: int | None = None
    ) -> None: ...

    def pass_on(self, packet: Routed, dst: int, flags: int) -> None:
        """Send a routed packet we received on to `dst`, its source kept, so that `dst` answers the source."""
        ...

    def send_data(self, node_id: int, kind: Kind, body: bytes) -> None: ...

    def deliver_data(self, body: Bytes, kind: int = Kind.DATA) -> None: ...

    def host_unreachable(self, body: bytes, kind: Kind, now: float) -> None: ...

    def link_to(self, contact: Contact, via: int | None = None) -> None:
        """Open a link to the member with this contact; ICE signals for it go through the overlay (to `via`
        first when the member is reachable only through that neighbour of it)."""
        ...

    def wake(self, within: float = 0.0) -> None:
        """Run the node's timers within `within` seconds (state changed in a way they act on: an idle node
        otherwise sleeps until its next gossip round)."""
        ...


class MemberPort(OverlayPort, Protocol):
    """What membership (overlay/membership.py) also uses: the overlay's beacon, finds, and signalling."""

    beacon: Beacon
    finder: Finder
    signalling: Signalling
    ice: IceAgent | None
    trust_service: TrustService | None

    def flood_beacon(self, seq: int, came_from: int | None) -> None:
        """Tell every link (but `came_from`) our overlay's beacon at `seq`."""
        ...

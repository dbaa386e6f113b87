"""A SocialVPN node's data on the compiled data path (overlay/fastpath.py, overlay/_fast.c).

The Engine reads the TAP and the UDP socket as it does for a group node; what differs is in the tables this
side gives it. A flow is a friend device's `local` address -> its link, the DATA byte and the device's view of
the addresses (FriendNat: source `remote_view`, destination `remote`), which the Engine writes into each packet
with the checksums updated as overlay/social/translate.py does. A link's allowed source is the address we gave
its device, so the Engine delivers DATA from a device only from that address and to ours (FriendNat.inbound).
Fragments, ICMP errors (whose quote is rewritten and checked too), other protocols and anything else come up
here and take the node's own way (SocialNode.from_tap, SocialNode._on_message). Friends relay nothing: a social
Engine passes RELAY and TUNNEL packets up, where they are dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from overlay.link import Link
from overlay.wire import LinkMsg

if TYPE_CHECKING:
    from overlay.social.node import SocialNode

DATA_HEADER = bytes([LinkMsg.DATA])


class SocialPath:
    """What overlay/fastpath.py drives (DataPath's part of it), for a SocialVPN node."""

    def __init__(self, node: SocialNode) -> None:
        self._node = node
        self.tap = node.tap
        self.vnic = node.vnic
        self.address_int = node.address
        self.hops = [0, 0]  # FastPath.sync adds the Engine's hop counts here; between friends it counts none
        self.fast: Any = None  # set by FastPath.start

    def source_of(self, peer: int) -> int | None:
        """The address we gave the friend device `peer` (its packets' only allowed source) once FriendNat knows
        the device (its places came), as FriendNat.inbound delivers nothing before; None until then."""
        jid = self._node.device_of(peer)
        friend = self._node.nat.friend(jid) if jid is not None else None
        return None if friend is None else friend.local

    def flow(self, address: int) -> tuple[int, bytes, tuple[int, int]] | None:
        """(peer, DATA byte, (source, destination) the packets leave with) for our kernel's packets to `address`
        (a friend device's local address) while its link is up and its places are known; else None."""
        node = self._node
        jid = node.nat.device_at(address)
        friend = node.nat.friend(jid) if jid is not None else None
        device = node.devices.get(jid) if jid is not None else None
        if friend is None or device is None or device.peer_id not in node.links.links:
            return None
        return device.peer_id, DATA_HEADER, (friend.remote_view, friend.remote)

    def from_tap(self, frames: list[bytes]) -> None:
        self._node.from_tap(frames)


class NoRoutes:
    """A social node routes nothing: its links are its friend devices (the Router's part FastPath uses)."""

    routes_changed: Any = None

    def on_sent(self, link: Link, busy: bool) -> None:
        pass

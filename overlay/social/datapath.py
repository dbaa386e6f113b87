"""A SocialVPN node's data path: packets between our kernel and friend devices, in Python and in the compiled
data path (overlay/fastpath.py, overlay/_fast.c with `social`).

Python's way (`from_tap`, `on_data`): our kernel's packet to a friend device's `local` address is translated into
that device's view (FriendNat.outbound, overlay/social/translate.py) and sent as DATA; a device's DATA is checked
(FriendNat.inbound) and written to the TAP. With TAP offload what the kernel left to offload is done first
(overlay/social/offload.py): super-frames are cut, partial checksums completed.

The Engine reads the TAP and the UDP socket as it does for a group node; what differs is in the tables this side
gives it. A flow is a friend device's `local` address -> its link, the DATA byte and the device's view of the
addresses (FriendNat: source `remote_view`, destination `remote`), which the Engine writes into each packet
with the checksums updated as translate.py does (super-frames whole, as DATA_GSO, to friends that answered the
fragment probe). A link's allowed source is the address we gave its device, so the Engine delivers DATA from a
device only from that address and to ours (FriendNat.inbound). Fragments, ICMP errors (whose quote is rewritten
and checked too), other protocols and anything else come up here and take Python's way. Friends relay nothing:
a social Engine passes RELAY and TUNNEL packets up, where they are dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from overlay.link import Link
from overlay.social import offload
from overlay.social.names import answer_packet
from overlay.social.translate import ToFriend
from overlay.tap.frames import VNET_HDR_LEN, ZERO_VNET_HDR, FrameError
from overlay.tap.vnic import Outbound, Reply
from overlay.wire import LinkMsg

if TYPE_CHECKING:
    from overlay.social.devices import FriendLink
    from overlay.social.node import SocialNode

DATA_HEADER = bytes([LinkMsg.DATA])


class SocialPath:
    """Python's data path of a social node, and what overlay/fastpath.py drives (DataPath's part of it)."""

    def __init__(self, node: SocialNode) -> None:
        self._node = node
        self.tap = node.tap
        self.vnic = node.vnic
        self.address_int = node.address
        self.hops = [0, 0]  # FastPath.sync adds the Engine's hop counts here; between friends it counts none
        self.fast: Any = None  # set by FastPath.start

    # -- what the Engine is given ------------------------------------------------------------------------------
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

    # -- Python's way ------------------------------------------------------------------------------------------
    def from_tap(self, frames: list[bytes]) -> None:
        """Frames our kernel wrote to the TAP (read by the node, or passed up by the compiled data path). With
        offload each starts with its virtio header, and what it leaves to offload is done here first."""
        node, vnet = self._node, self.tap.vnet_hdr
        for frame in frames:
            result = self.vnic.from_tap(memoryview(frame)[VNET_HDR_LEN:] if vnet else frame)
            if isinstance(result, Reply):
                self.write(result.frame)
            elif isinstance(result, Outbound):
                try:
                    packets = offload.packets(frame[:VNET_HDR_LEN] if vnet else b"", result.packet)
                except FrameError:
                    node.count("drop: offload work that cannot be done")
                    continue
                for packet in packets:
                    if result.dst_ip == node.dns:
                        self._answer_dns(packet)
                        continue
                    out = node.nat.outbound(packet)
                    if isinstance(out, ToFriend):
                        self.send_data(out, result.dst_ip)

    def on_data(self, device: FriendLink, msg: bytes) -> None:
        """A DATA or DATA_GSO message from friend `device`: checked (FriendNat.inbound; a DATA_GSO's virtio header
        by offload.check), then to our kernel."""
        head = msg[1 : 1 + VNET_HDR_LEN] if msg[0] == LinkMsg.DATA_GSO else b""
        packet = self._node.nat.inbound(device.jid, memoryview(msg)[1 + len(head) :])
        if not isinstance(packet, bytes):
            return
        if head:
            try:
                offload.check(head, packet)
            except FrameError:
                self._node.count("drop: data with an offload header a friend may not send")
                return
        try:
            eth, body = self.vnic.to_tap_parts(packet)
            if self.tap.vnet_hdr:
                self.tap.write_parts([head or ZERO_VNET_HDR, eth, body])
            elif not head:
                self.tap.write_parts([eth, body])
            else:
                for p in offload.packets(head, body):  # a TAP without offload: the packets a NIC would make
                    self.tap.write_parts([eth, p])
        except FrameError:
            self._node.count("drop: data not for our address")

    def send_data(self, out: ToFriend, local: int) -> None:
        node = self._node
        device = node.devices.get(out.device)
        link = node.links.links.get(device.peer_id) if device is not None else None
        if link is None or device is None:
            node.count("drop: friend device not linked")
            return
        link.send(DATA_HEADER + out.packet)
        friend = node.nat.friend(out.device)
        if self.fast is not None and friend is not None:
            self.fast.set_flow(local, device.peer_id, DATA_HEADER, (friend.remote_view, friend.remote))

    def write(self, frame: bytes) -> None:
        """A frame for our kernel with nothing left to offload."""
        self.tap.write_parts([ZERO_VNET_HDR, frame] if self.tap.vnet_hdr else [frame])

    def _answer_dns(self, packet: bytes) -> None:
        """A query to the DNS address, answered from the friends' names (overlay/social/names.py)."""
        node = self._node
        outcome, reply = answer_packet(packet, node.settings.domain, node.names().get)
        if outcome is not None:
            node.count(outcome)
        if reply is not None:
            self.write(self.vnic.to_tap(reply))


class NoRoutes:
    """A social node routes nothing: its links are its friend devices (the Router's part FastPath uses)."""

    routes_changed: Any = None

    def on_sent(self, link: Link, busy: bool) -> None:
        pass

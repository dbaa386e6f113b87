"""A SocialVPN node: direct links to the devices of the account's XMPP friends, each placed in our own subnet.

No overlay, no group: the friends are the roster contacts with a mutual subscription (xmpp_bootstrap/roster.py),
each of their devices that runs the node gets one link, set up with ICE (STUN/TURN as configured) through
signals sent as XMPP messages to the device's full JID, and nothing is forwarded for anyone. Each device is
given an address in our [social] subnet (kept across restarts); packets are translated so each side sees the
other at the address it chose (overlay/social/translate.py); the node answers DNS for the friends' names at
the subnet's DNS address (overlay/social/names.py). Trust: a device's key is bound to its full JID by the signed
statement in its presence and pinned on first use (overlay/social/devices.py); a handshake from any key that is
not an online friend device's is refused.

The order of things for a packet our kernel sends: TAP frame -> VirtualNic (proxy ARP) -> the DNS responder if it
is for the DNS address, else FriendNat.outbound -> the device's link (LinkMsg.DATA). From a link: LinkMsg.DATA
-> FriendNat.inbound (checks) -> VirtualNic.to_tap -> TAP.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import random
import struct
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from slixmpp import ClientXMPP
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from overlay.config import SocialConfig
from overlay.fastpath import FastPath
from overlay.identity import Identity, verify
from overlay.ids import format_id, node_id_from_public_key
from overlay.link import Link
from overlay.links import LinkCallbacks, LinkManager, Underlay
from overlay.probes import FragmentProbes
from overlay.remembered import write_private
from overlay.social.datapath import NoRoutes, SocialPath
from overlay.social.devices import FriendLink, NamedDevice, Pins, names, statement, statement_key
from overlay.social.status import social_status
from overlay.social.translate import AddressPool, FriendDevice, FriendNat, SubnetFull
from overlay.tap.vnic import VirtualNic
from overlay.transport.paths import IceSettings
from overlay.transport.session import HandshakeError
from overlay.transport.signals import Signal, decode_signal
from overlay.transport.underlay import UdpUnderlay
from overlay.wire import Contact, DecodeError, LinkMsg, decode_probe, decode_token, encode_ping
from xmpp_bootstrap.friends import FriendWatch
from xmpp_bootstrap.roster import (
    SOCIAL_NS,
    DeviceOffline,
    DeviceOnline,
    FriendAdded,
    FriendEvent,
    FriendRemoved,
    FriendRequest,
)

log = logging.getLogger(__name__)

# Contacts (overlay/wire.py) are signed over a group name; friends share none, so they sign over this.
SOCIAL_CONTEXT = "ipop-overlay social"
SIGNAL_TAG = f"{{{SOCIAL_NS}}}signal"
NO_STORE_TAG = "{urn:xmpp:hints}no-store"
TICK = 1.0  # our choice: link attempts, pings and retries are all on a seconds scale
# Our choice: an idle friend link is pinged every 2.5 s and closed after 7.5 s of silence (three pings lost), so a
# device that vanished without a word (no CLOSE on the link) loses its link within 10 s, our tick included.
PING_INTERVAL = 2.5
DEAD_AFTER = 7.5
RETRY_INTERVAL = 5.0  # our choice: a failed link attempt to an online device is tried again after 5 s
_PLACES = struct.Struct("!BII")  # LinkMsg.PLACES, the sender's address, where the sender placed the receiver


class SocialCredentials:
    """Handshake admission: only the pinned key of an online friend device may link (transport/session.py)."""

    def __init__(self, node: SocialNode) -> None:
        self.node = node

    def prologue(self) -> bytes:
        return b"ipop-overlay social v1"

    def own(self) -> bytes:
        return b""

    def admit(self, node_key: bytes, credential: bytes) -> None:
        if node_key not in self.node.linkable_keys():
            raise HandshakeError("not the key of an online friend device")


class SocialNode:
    def __init__(
        self,
        identity: Identity,
        settings: SocialConfig,
        address: str,
        client: ClientXMPP,
        underlay: Underlay,
        tap: Any,
        state_file: Path,
        *,
        ice: IceSettings | None = None,
        clock: Callable[[], float] = time.time,
        fast_path: bool = True,
    ) -> None:
        self.identity = identity
        self.id = identity.node_id
        self.settings = settings
        iface = ipaddress.IPv4Interface(address)
        self.address = int(iface.ip)
        self.client = client
        self.full_jid = str(client.boundjid.full) if client.boundjid.resource else str(client.requested_jid)
        self.underlay = underlay
        self.tap = tap
        self.state_file = state_file
        self.clock = clock
        self.counters: dict[str, int] = {}
        self.warnings: list[str] = []
        self.devices: dict[str, FriendLink] = {}  # full JID -> what we know
        self._by_peer: dict[int, str] = {}
        self.dns = int(settings.dns)
        self.vnic = VirtualNic(self.address, iface.network.prefixlen, tap.mac)
        self.nat = FriendNat(self.address)
        self.pool = AddressPool(self.address, iface.network.prefixlen, reserved=[self.dns])
        self.pins = Pins()
        self._load_state()
        self.links = LinkManager(
            identity,
            underlay,
            LinkCallbacks(
                self._on_link_up, self._on_link_down, self._on_attempt_failed, self._on_message, lambda _: []
            ),
            clock,
            credentials=SocialCredentials(self),
        )
        self.links.setup.contact_source = self.contact
        self.ice = None
        if ice is not None:
            from overlay.transport.ice import IceAgent  # aioice loads only where ICE is configured

            self.ice = IceAgent(ice, underlay, self.links.on_packet)
            self.links.setup.agent = self.ice
        self.watch = FriendWatch(client, statement=statement(identity, self.full_jid), on_event=self._on_event)
        client.register_handler(
            Callback("social signal", MatchXPath(f"{{jabber:client}}message/{SIGNAL_TAG}"), self._on_signal_message)
        )
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._dirty = False
        self.data = SocialPath(self)
        # The compiled data path (overlay/social/datapath.py), with `fast_path` ([vnic] fast_path) and a UDP underlay.
        self.want_fast_path = fast_path
        self.fast: FastPath | None = None
        # Which friends take our super-frames whole (DATA_GSO): asked only while we may send them, with offload
        # on our TAP and the Engine running (overlay/social/offload.py).
        self.probes = FragmentProbes(self.links, random.Random(), self.count)

    # -- life cycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.underlay.start(self.links.on_datagram)
        if self.ice is not None:
            self.underlay.on_stun = self.ice.on_stun
            self.ice.start(self.clock())
        if self.want_fast_path and isinstance(self.underlay, UdpUnderlay):
            prefix_len = self.vnic.prefix_len
            self.fast = FastPath(
                self.links, self.data, NoRoutes(), self.underlay, self._heard, self.id, prefix_len, social=True
            )
            self.fast.start()
        else:
            self._loop.add_reader(self.tap.fileno(), self._on_tap_readable)
        self._schedule()
        await self.watch.start()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        for link in list(self.links.links.values()):
            link.send(bytes([LinkMsg.CLOSE]))
        self.links.close_all()
        if self.fast is not None:
            self.fast.stop()  # before the socket closes: its thread reads it
        elif self._loop is not None:
            self._loop.remove_reader(self.tap.fileno())
        self.watch.close()
        self.underlay.close()
        if self.ice is not None:
            await self.ice.close()
        self._save_state()

    def _schedule(self) -> None:
        if not self._stopped and self._loop is not None:
            self._timer = self._loop.call_later(TICK, self._on_timer)

    def _on_timer(self) -> None:
        now = self.clock()
        try:
            if self.fast is not None:
                self.fast.sync()  # what the Engine carried: the links' bytes, and the devices heard
                if self.tap.vnet_hdr:
                    self.probes.tick(now)
            self.links.tick(now)
            if self.ice is not None:
                self.ice.tick(now)
            for device in list(self.devices.values()):
                self._tend(device, now)
            if self._dirty:
                self._save_state()
        except Exception:  # one bad tick must not stop every later one
            log.exception("social node tick failed")
        self._schedule()

    def _tend(self, device: FriendLink, now: float) -> None:
        """Keep one device's link: ping it, close it when silent, set it up again when it is missing."""
        if device.warning is not None:
            return
        link = self.links.links.get(device.peer_id)
        if link is None and not device.online:
            self._device_offline(device.jid, "offline, and its link is gone")
            return
        if link is not None:
            if now - device.last_heard > DEAD_AFTER:
                self.links.close(device.peer_id, "friend device silent")
            elif now - device.last_ping >= PING_INTERVAL:
                device.last_ping = now
                link.send(encode_ping(LinkMsg.PING, int(now * 1e6)))
        elif device.peer_id not in self.links.setup.attempts and now - device.last_try >= RETRY_INTERVAL:
            device.last_try = now
            jid = device.jid

            def signal(sig: Signal) -> None:
                self._send_signal(jid, sig)

            self.links.setup.offer(device.peer_id, signal, xmpp=False)

    # -- friends (xmpp_bootstrap/roster.py events) -------------------------------------------------------------
    def _on_event(self, event: FriendEvent) -> None:
        now = self.clock()
        if isinstance(event, DeviceOnline):
            self._device_online(
                event.device.jid, event.device.friend, event.device.resource, event.device.statement, now
            )
        elif isinstance(event, DeviceOffline):
            device = self.devices.get(event.device.jid)
            if device is not None and device.peer_id in self.links.links:
                # Its XMPP session ended (or ours did, or the server went down): the link needs no XMPP and
                # stays while it answers; a device that stopped says so on the link (CLOSE).
                device.online = False
                self.count("friend devices offline in XMPP, link kept")
                log.info("friend device %s is offline in XMPP; its link stays while it answers", device.jid)
            else:
                self._device_offline(event.device.jid, "friend device went offline")
        elif isinstance(event, FriendAdded):
            log.info("%s is a friend now", event.friend)
        elif isinstance(event, FriendRemoved):
            for jid in [d.jid for d in self.devices.values() if d.friend == event.friend]:
                self._device_offline(jid, "no longer a friend")
            log.info("%s is no longer a friend", event.friend)
        elif isinstance(event, FriendRequest) and not event.expected:
            log.info("%s asks to be a friend: 'ipop-overlay friend accept %s' says yes", event.jid, event.jid)

    def _device_online(self, jid: str, friend: str, resource: str, said: bytes, now: float) -> None:
        known = self.devices.get(jid)
        if known is not None and known.said == said:
            known.online, known.last_seen = True, now  # seen again (a session came back): link and state stay
            return
        if known is not None:
            self._device_offline(jid, "friend device presents another key statement")
        key = statement_key(said, jid)
        if key is None:
            self.count("friend devices without a valid key statement")
            log.warning("%s runs the node but its presence holds no valid key statement: not linked", jid)
            return
        verdict = self.pins.judge(jid, key)
        warning = None
        if verdict == "changed":
            warning = (
                f"{jid} presents a new node key {format_id(node_id_from_public_key(key))}, not the one pinned: "
                f"not linked; if its owner changed it, 'ipop-overlay friend forget {jid}' accepts the new one"
            )
            log.warning("%s", warning)
            if warning not in self.warnings:
                self.warnings.append(warning)
        elif verdict == "new":
            self.pins.pin(jid, key)
            self._dirty = True
        try:
            local = self.pool.address_for(jid)
        except SubnetFull as e:
            log.warning("%s", e)
            self.count("friend devices without an address")
            return
        self._dirty = True
        device = FriendLink(jid, friend, resource, key, said, local, now, warning)
        self.devices[jid] = device
        if warning is None:
            self._by_peer[device.peer_id] = jid
            log.info(
                "friend device %s online: %s here, node %s",
                jid,
                ipaddress.IPv4Address(local),
                format_id(device.peer_id),
            )
            self._tend(device, now)

    def _device_offline(self, jid: str, reason: str) -> None:
        device = self.devices.pop(jid, None)
        if device is None:
            return
        self._by_peer.pop(device.peer_id, None)
        self.nat.remove_friend(jid)
        if device.peer_id in self.links.links:
            self.links.links[device.peer_id].send(bytes([LinkMsg.CLOSE]))
            self.links.close(device.peer_id, reason)
        log.info("friend device %s: %s", jid, reason)

    def linkable_keys(self) -> set[bytes]:
        return {d.key for d in self.devices.values() if d.warning is None}

    def forget(self, jid: str) -> bool:
        """A person confirmed a device's new key: drop the pinned one; the device is judged anew now."""
        found = self.pins.forget(jid)
        self.warnings = [w for w in self.warnings if not w.startswith(f"{jid} ")]
        device = self.devices.pop(jid, None)
        self._dirty = True
        if device is not None:
            self._device_online(jid, device.friend, device.resource, device.said, self.clock())
        return found

    # -- signalling over XMPP ---------------------------------------------------------------------------------
    def contact(self) -> Contact:
        unsigned = Contact(
            self.identity.public_key,
            str(ipaddress.IPv4Address(self.address)),
            self.underlay.local_endpoint,
            int(self.clock() * 1000),
        )
        signature = self.identity.sign(unsigned.signed_part(SOCIAL_CONTEXT))
        return Contact(unsigned.public_key, unsigned.address, unsigned.endpoint, unsigned.timestamp_ms, signature)

    def _send_signal(self, jid: str, sig: Signal) -> None:
        if jid not in self.devices:
            return
        message = self.client.make_message(mto=jid, mtype="normal")
        element = ET.Element(SIGNAL_TAG)
        element.text = base64.b64encode(sig.encode()).decode()
        message.append(element)
        # A signal is for the device online now: no server should keep it for later (XEP-0334 hints).
        message.append(ET.Element(NO_STORE_TAG))
        message.send()
        self.count("signals sent")

    def _on_signal_message(self, message: Any) -> None:
        jid = str(message["from"])
        device = self.devices.get(jid)
        if device is None or device.warning is not None:
            self.count("drop: signal from no linkable friend device")
            return
        element = message.xml.find(SIGNAL_TAG)
        try:
            sig = decode_signal(base64.b64decode(element.text or "", validate=True))
        except (ValueError, DecodeError):
            self.count("drop: malformed signal")
            return
        contact = sig.contact
        if contact.public_key != device.key or not verify(
            contact.public_key, contact.signed_part(SOCIAL_CONTEXT), contact.signature
        ):
            self.count("drop: signal not signed by the device's pinned key")
            return
        self.links.setup.on_signal(sig, lambda answer: self._send_signal(jid, answer))

    # -- links -------------------------------------------------------------------------------------------------
    def _on_link_up(self, link: Link) -> None:
        jid = self._by_peer.get(link.peer_id)
        device = self.devices.get(jid) if jid else None
        if device is None:
            self.links.close(link.peer_id, "not an online friend device")
            return
        device.last_heard = self.clock()
        link.send(_PLACES.pack(LinkMsg.PLACES, self.address, device.local))
        if self.fast is not None and self.tap.vnet_hdr:
            self.probes.probe(link, device.last_heard)

    def _on_link_down(self, link: Link, reason: str) -> None:
        self.probes.forget(link.peer_id)
        jid = self._by_peer.get(link.peer_id)
        if jid is not None:
            log.info("link to friend device %s down: %s", jid, reason)

    def _on_attempt_failed(self, peer_id: int) -> None:
        self.count("friend link attempts failed")

    def _on_message(self, link: Link, msg: bytes) -> None:
        jid = self._by_peer.get(link.peer_id)
        device = self.devices.get(jid) if jid else None
        if device is None or not msg:
            self.count("drop: message from no friend device")
            return
        now = self.clock()
        device.last_heard = now
        kind = msg[0]
        if kind == LinkMsg.DATA or kind == LinkMsg.DATA_GSO:
            self.data.on_data(device, msg)
        elif kind == LinkMsg.PROBE:
            try:
                link.send(encode_ping(LinkMsg.PROBE_ACK, decode_probe(msg)))
            except DecodeError:
                self.count("drop: malformed probe")
        elif kind == LinkMsg.PROBE_ACK:
            try:
                self.probes.on_ack(link, decode_token(msg))
            except DecodeError:
                self.count("drop: malformed probe ack")
        elif kind == LinkMsg.PLACES and len(msg) == _PLACES.size:
            _, remote, remote_view = _PLACES.unpack(msg)
            device.remote, device.remote_view = remote, remote_view
            if self.fast is not None:
                self.fast.drop_flow(device.local)  # the Engine's rewrite for it may be the old places
            try:
                self.nat.set_friend(device.jid, FriendDevice(device.local, remote, remote_view))
            except ValueError as e:
                self.count("drop: unusable places")
                log.warning("friend device %s: %s", device.jid, e)
        elif kind in (LinkMsg.PING, LinkMsg.PONG):
            try:
                token = decode_token(msg)
            except DecodeError:
                self.count("drop: malformed ping")
                return
            if kind == LinkMsg.PING:
                link.send(encode_ping(LinkMsg.PONG, token))
            elif 0 <= now - token / 1e6 < 60:
                link.rtt = now - token / 1e6
        elif kind == LinkMsg.CLOSE:
            self.links.close(link.peer_id, "friend device closed the link", notify=False)
        else:
            self.count("drop: unknown link message")

    # -- the data path (overlay/social/datapath.py) -----------------------------------------------------------
    def _on_tap_readable(self) -> None:
        self.data.from_tap(self.tap.read_batch())

    def device_of(self, peer_id: int) -> str | None:
        """The full JID of the friend device with this node ID, if we know one."""
        return self._by_peer.get(peer_id)

    def _heard(self, link: Link) -> None:
        """The compiled data path delivered data from this link's device: it is alive (_tend)."""
        jid = self._by_peer.get(link.peer_id)
        device = self.devices.get(jid) if jid is not None else None
        if device is not None:
            device.last_heard = self.clock()

    def names(self) -> dict[str, int]:
        return names(
            (
                NamedDevice(d.friend, d.resource, d.last_seen, d.local)
                for d in self.devices.values()
                if d.warning is None
            ),
            self.settings.domain,
        )

    # -- state, status -----------------------------------------------------------------------------------------
    def _load_state(self) -> None:
        try:
            state = json.loads(self.state_file.read_text())
            self.pins = Pins.load(state.get("pins", {}))
            self.pool.import_table(state.get("addresses", {}))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as e:
            log.warning("social state %s not used (%s): devices are pinned and placed afresh", self.state_file, e)

    def _save_state(self) -> None:
        self._dirty = False
        state = {"pins": self.pins.export(), "addresses": self.pool.export_table()}
        try:
            write_private(self.state_file, json.dumps(state, indent=1).encode())
        except OSError as e:
            log.warning("cannot write %s: %s; pinned keys and addresses are not kept", self.state_file, e.strerror)

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def status(self) -> dict[str, Any]:
        return social_status(self)

    async def forget_command(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The control socket's "forget" (`ipop-overlay friend forget JID/RESOURCE`)."""
        device = request.get("device")
        if not isinstance(device, str) or "/" not in device:
            yield {"error": "forget needs a device: the friend's full JID, user@domain/resource"}
            return
        yield {"result": {"forgotten": self.forget(device), "device": device}}

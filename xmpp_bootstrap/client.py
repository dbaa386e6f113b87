"""XMPP bootstrap over a members-only MUC room: membership check and the first hello exchange (the login and
its errors: xmpp_bootstrap/session.py).

The server refusing a non-member's join is the membership check. Only a few anchor nodes stay in the room; a
joiner sees the anchors' presences (marked with <anchor xmlns='urn:ipop-overlay:bootstrap:0' overlay='HEX'/>),
sends a hello to each anchor as a MUC private message, collects their answers, and leaves once the overlay has
a link. So a join costs the same number of stanzas whatever the group size (docs/xmpp-bootstrap.md has the
numbers). A node that issues the group's certificates stays in the room too and marks its presence with
<issuer xmlns='urn:ipop-overlay:bootstrap:0'/>. This layer moves bytes and reports the room; what the hellos say
and who should be an anchor is the node's business (overlay/membership.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from slixmpp import JID, ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.jid import InvalidJID
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from xmpp_bootstrap.bootstrap import JOIN_REFUSALS, ROOM_FULL, new_stats
from xmpp_bootstrap.protocol import (
    ANCHOR_TAG,
    ANSWER_ATTR,
    ANSWER_VALUE,
    HELLO_TAG,
    ISSUER_TAG,
    OVERLAY_ATTR,
    SIGNAL_VALUE,
    HelloHandler,
    Occupant,
    answer_for,
    decode_hello,
    encode_hello,
    parse_overlay,
    removal_reason,
    room_config_problems,
)
from xmpp_bootstrap.session import (
    DISCO_INFO_NS,
    MUC_NS,
    MUC_USER_NS,
    SELF_PRESENCE_STATUS,
    BootstrapError,
    log_in,
    new_client,
    stanza_error,
    stanza_error_text,
)

log = logging.getLogger(__name__)

# How long stop() waits for the server to close the stream before dropping the TCP connection.
DISCONNECT_WAIT = 1.0


@dataclass(frozen=True)
class XmppSettings:
    """Where and as whom a node logs in, and which room is its group."""

    jid: str
    """Bare or full JID of the member account; a bare JID gets a server-chosen resource."""
    password: str
    """The account's password."""
    room: str
    """The group: a members-only room, room@conference.domain."""
    nick: str
    """Our occupant nick in the room: the node ID in hex, unique in the group."""
    host: str | None = None
    """Server to connect to; default: the JID's domain."""
    port: int = 5222
    """Client port; STARTTLS is used on it (direct TLS is not tried)."""
    ca_file: str | None = None
    """PEM file of a CA to trust (self-signed servers); else system trust. TLS is always verified."""
    timeout: float = 10.0
    """Bound on each step of start(): connect+login, room lookup, join."""


def _real_jid(pres: Any) -> str | None:
    """The bare real JID an occupant's presence shows (<x xmlns='...muc#user'><item jid=.../></x>), or None."""
    item = pres.xml.find(f"{{{MUC_USER_NS}}}x/{{{MUC_USER_NS}}}item")
    text = item.get("jid") if item is not None else None
    if not text:
        return None
    try:
        jid = JID(text)
    except InvalidJID:
        return None
    return str(jid.bare) if jid.user and jid.domain else None


class XmppBootstrap:
    """Bootstrap through a real XMPP server with slixmpp, run on the caller's asyncio loop."""

    def __init__(self, settings: XmppSettings) -> None:
        self.settings = settings
        self.nick = settings.nick
        self.on_hello: HelloHandler | None = None
        self.on_signal: Callable[[bytes, str], None] | None = None
        self.on_change: Callable[[], None] | None = None
        self.stats = new_stats()
        self.occupants: dict[str, Occupant] = {}
        """Nick -> what its presence says, for the occupants we have seen in the room (ourselves included)."""
        self._room = JID(settings.room)
        self._client: ClientXMPP | None = None
        self._in_room = False
        self._anchor: int | None = None
        self._issuer = False
        self.removed_from_room: str | None = None
        """Why the room threw us out (e.g. "membership revoked"), or None; cleared by a successful join."""
        self._joined: asyncio.Future[None] | None = None
        self._pending: dict[str, asyncio.Future[bytes | None]] = {}
        self._room_warnings: set[str] = set()  # what _check_room has logged about the room's settings

    @property
    def in_room(self) -> bool:
        return self._in_room

    @property
    def is_anchor(self) -> bool:
        return self._in_room and self._anchor is not None

    @property
    def issuers(self) -> list[str]:
        return sorted(nick for nick, occ in self.occupants.items() if occ.issuer and nick != self.nick)

    # -- lifecycle --

    async def start(self) -> None:
        if self._in_room and self._client is not None:
            return
        if self._client is not None and not self._client.is_connected():
            await self.stop()  # the session dropped: start over
        try:
            if self._client is None:
                await self._connect()
                self.stats["logins"] += 1
                await self._check_room()
            await self._join()
        except BaseException:
            await self.stop()
            raise

    def set_anchor(self, overlay: int | None) -> None:
        if not self._in_room or self._client is None or overlay == self._anchor:
            return
        self._anchor = overlay
        self._send_presence()
        own = self.occupants.get(self.nick, Occupant())
        self.occupants[self.nick] = replace(own, anchor=overlay is not None, overlay=overlay)

    def set_issuer(self, on: bool) -> None:
        """Mark (or unmark) our presence as a certificate issuer's. Remembered: every later join carries it."""
        if on == self._issuer:
            return
        self._issuer = on
        if self._in_room and self._client is not None:
            self._send_presence()
            own = self.occupants.get(self.nick, Occupant())
            self.occupants[self.nick] = replace(own, issuer=on)

    async def fetch_affiliations(self, timeout: float = 10.0) -> dict[str, str]:
        """Bare JID -> "owner", "admin" or "member" for the room (xmpp_bootstrap.admin.fetch_affiliations over
        our session; we need not be in the room). Raises BootstrapError when we are not an owner/admin."""
        from xmpp_bootstrap import admin  # admin builds on this module: import it when first needed

        client = self._client
        if client is None or not client.is_connected():
            raise BootstrapError(
                f"not logged in, so the members of room {self._room.bare} cannot be listed: call start() first",
                transient=True,
            )
        return await admin.fetch_affiliations(client, str(self._room.bare), timeout)

    async def stop(self) -> None:
        client, self._client = self._client, None
        if self._in_room and client is not None:
            with contextlib.suppress(Exception):
                client.make_presence(pto=self._occupant_jid(), ptype="unavailable").send()
        self._in_room = False
        self._anchor = None
        self.occupants.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_result(None)
        self._pending.clear()
        if client is None:
            return
        client.cancel_connection_attempt()
        if client.transport is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(wait=DISCONNECT_WAIT), DISCONNECT_WAIT + 1)
        client.abort()
        # slixmpp leaves its send-queue task running after abort(); end it so no task outlives the session.
        sender = getattr(client, "_run_out_filters", None)
        if sender is not None and not sender.done():
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("the node layer failed on a room change")

    # -- hello exchange --

    async def exchange(self, hellos: dict[str, bytes], timeout: float = 5.0) -> dict[str, bytes]:
        if self._client is None or not self._in_room:
            raise BootstrapError(f"not in room {self._room}: the XMPP session dropped", transient=True)
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[bytes | None]] = {}
        for nick, hello in hellos.items():
            if nick == self.nick:
                continue
            futures[nick] = self._pending[nick] = loop.create_future()
            self._send_hello(nick, encode_hello(hello))
        if futures:
            await asyncio.wait(futures.values(), timeout=timeout)
        answers = {}
        for nick, future in futures.items():
            if self._pending.get(nick) is future:
                del self._pending[nick]
            if future.done() and (answer := future.result()) is not None:
                answers[nick] = answer
        return answers

    def send_signal(self, nick: str, payload: bytes) -> bool:
        if self._client is None or not self._in_room or nick not in self.occupants:
            return False
        self._send_hello(nick, encode_hello(payload), kind=SIGNAL_VALUE)
        self.stats["signals_out"] += 1
        return True

    def _send_hello(self, nick: str, text: str, *, kind: str | None = None) -> None:
        assert self._client is not None
        msg = self._client.make_message(mto=JID(f"{self._room.bare}/{nick}"), mtype="chat")
        element = ET.Element(HELLO_TAG, {ANSWER_ATTR: kind} if kind else {})
        element.text = text
        msg.append(element)
        msg.send()
        self.stats["hellos_out"] += 1

    def _on_hello_message(self, msg: Any) -> None:
        sender = msg["from"]
        if sender.bare != self._room.bare or not sender.resource:
            self.stats["hellos_dropped"] += 1
            return
        nick = sender.resource
        element = msg.xml.find(HELLO_TAG)
        payload = decode_hello(element.text if element is not None else None)
        if payload is None or element is None:
            self.stats["hellos_dropped"] += 1
            return
        self.stats["hellos_in"] += 1
        kind = element.get(ANSWER_ATTR)
        if kind == ANSWER_VALUE:
            pending = self._pending.get(nick)
            if pending is not None and not pending.done():
                self.stats["answers_in"] += 1
                pending.set_result(payload)
            else:
                self.stats["answers_late"] += 1
            return
        if kind == SIGNAL_VALUE:
            self.stats["signals_in"] += 1
            if self.on_signal is not None:
                try:
                    self.on_signal(payload, nick)
                except Exception:
                    log.exception("the node layer failed on a signal from %s", nick)
            return
        answer = answer_for(self.on_hello, payload, nick)
        if answer is not None and self._client is not None:
            self._send_hello(nick, encode_hello(answer), kind=ANSWER_VALUE)

    def _on_message_error(self, msg: Any) -> None:
        # The anchor left between our seeing its presence and our hello arriving: no answer will come.
        pending = self._pending.get(msg["from"].resource)
        if pending is not None and not pending.done():
            pending.set_result(None)

    # -- connection --

    def _make_client(self) -> ClientXMPP:
        client = new_client(self.settings.jid, self.settings.password, self.settings.ca_file)
        client.auto_authorize = False  # a bootstrap account accepts no subscriptions
        client.auto_subscribe = False
        client.add_filter("in", self._count_in)
        client.add_filter("out", self._count_out)
        client.register_handler(
            Callback("bootstrap hello", MatchXPath(f"{{jabber:client}}message/{HELLO_TAG}"), self._on_hello_message)
        )
        client.register_handler(
            Callback("bootstrap presence", MatchXPath("{jabber:client}presence"), self._on_presence)
        )
        client.add_event_handler("message_error", self._on_message_error)
        client.add_event_handler("disconnected", lambda _reason: self._on_disconnected(client))
        return client

    def _count_in(self, stanza: Any) -> Any:
        self.stats["stanzas_in"] += 1
        return stanza

    def _count_out(self, stanza: Any) -> Any:
        self.stats["stanzas_out"] += 1
        return stanza

    async def _connect(self) -> None:
        s = self.settings
        jid = JID(s.jid)
        if not jid.user or not jid.domain:
            raise BootstrapError(f"JID {s.jid!r} is not user@domain: fix `jid` in the config")
        if not self._room.user or not self._room.domain:
            raise BootstrapError(f"room {s.room!r} is not room@conference.domain: fix `room` in the config")
        self._client = self._make_client()
        await log_in(self._client, s.host or jid.domain, s.port, s.ca_file, s.timeout)

    async def _check_room(self) -> None:
        """Disco#info the room first: joining a missing room would ask the server to create it."""
        assert self._client is not None
        iq = self._client.make_iq_get(queryxmlns=DISCO_INFO_NS, ito=self._room.bare)
        try:
            result: Any = await iq.send(timeout=self.settings.timeout)  # type: ignore[no-untyped-call]
        except IqError as exc:
            condition = exc.condition
            if condition == "item-not-found":
                raise BootstrapError(JOIN_REFUSALS[condition].format(room=self._room.bare)) from None
            raise BootstrapError(
                f"room {self._room.bare} cannot be looked up ({condition}): check the conference domain"
            ) from None
        except IqTimeout:
            raise BootstrapError(
                f"room {self._room.bare} did not answer within {self.settings.timeout:g} s", transient=True
            ) from None
        # A room set up otherwise still works (a member still enters and talks), so this only warns, once per
        # problem: ejabberd's rooms are public and moderated unless their owner changed them.
        feature_path = f"{{{DISCO_INFO_NS}}}query/{{{DISCO_INFO_NS}}}feature"
        features = (f.get("var", "") for f in result.xml.iterfind(feature_path))
        for problem in room_config_problems(str(self._room.bare), features):
            if problem not in self._room_warnings:
                self._room_warnings.add(problem)
                log.warning("%s; its owner fixes that with `ipop-overlay group create`", problem)

    async def _join(self) -> None:
        self._joined = asyncio.get_running_loop().create_future()
        self._anchor = None
        self._send_presence(join=True)
        try:
            await asyncio.wait_for(self._joined, self.settings.timeout)
        except TimeoutError:
            raise BootstrapError(
                f"joining room {self._room.bare} got no answer within {self.settings.timeout:g} s", transient=True
            ) from None
        finally:
            self._joined = None
        self._in_room = True
        self.removed_from_room = None
        self._changed()

    def _occupant_jid(self) -> JID:
        return JID(f"{self._room.bare}/{self.settings.nick}")

    def _send_presence(self, *, join: bool = False) -> None:
        assert self._client is not None
        pres = self._client.make_presence(pto=self._occupant_jid())
        if join:
            muc = ET.Element(f"{{{MUC_NS}}}x")
            # No room history: the group never talks in the room, and history would cost stanzas per join.
            ET.SubElement(muc, f"{{{MUC_NS}}}history", {"maxstanzas": "0"})
            pres.append(muc)
        if self._anchor is not None:
            pres.append(ET.Element(ANCHOR_TAG, {OVERLAY_ATTR: f"{self._anchor:016x}"}))
        if self._issuer:
            pres.append(ET.Element(ISSUER_TAG))
        pres.send()

    def _on_presence(self, pres: Any) -> None:
        sender = pres["from"]
        if sender.bare != self._room.bare:
            return
        self.stats["presences_in"] += 1
        ptype = pres["type"]
        if ptype == "error":
            self._on_join_refused(pres)
            return
        nick = sender.resource
        if not nick:
            return
        codes = {s.get("code") for s in pres.xml.iterfind(f"{{{MUC_USER_NS}}}x/{{{MUC_USER_NS}}}status")}
        is_self = SELF_PRESENCE_STATUS in codes
        if ptype == "unavailable":
            self.occupants.pop(nick, None)
            if nick == self.nick:
                # Kicked, our membership revoked, or the room destroyed: out of the room, still logged in. A
                # revoked membership makes the next start() fail as a non-member's join does.
                self._on_removed({c for c in codes if c is not None})
            self._changed()
            return
        anchor = pres.xml.find(ANCHOR_TAG)
        overlay = parse_overlay(anchor.get(OVERLAY_ATTR)) if anchor is not None else None
        self.occupants[nick] = Occupant(
            anchor is not None and overlay is not None,
            overlay,
            pres.xml.find(ISSUER_TAG) is not None,
            _real_jid(pres),
        )
        if is_self and self._joined is not None and not self._joined.done():
            self._joined.set_result(None)
        elif self._in_room:
            self._changed()

    def _on_removed(self, codes: set[str]) -> None:
        was_in_room = self._in_room
        self._in_room = False
        self._anchor = None
        self.occupants.clear()  # we no longer see the room, as the twin's view shows
        for future in self._pending.values():  # no answer can reach us outside the room
            if not future.done():
                future.set_result(None)
        self._pending.clear()
        reason = removal_reason(codes)
        if reason is not None and was_in_room:
            self.removed_from_room = reason
            log.warning("removed from room %s: %s", self._room.bare, reason)

    def _on_join_refused(self, pres: Any) -> None:
        # Prosody's refusal lacks the MUC <x/> child, so slixmpp's MUC plugin would not see it; we match the
        # room JID instead and fail the join at once rather than after a timeout.
        if self._joined is None or self._joined.done():
            return
        condition = stanza_error(pres)
        template = JOIN_REFUSALS.get(condition, "joining room {room} was refused ({condition})")
        said = stanza_error_text(pres)
        message = template.format(
            jid=JID(self.settings.jid).bare,
            room=self._room.bare,
            nick=self.settings.nick,
            condition=condition,
            said=f": {said}" if said else "",
        )
        # A full room is a state, not a mistake: in a restart storm it empties again, so it is retried with backoff.
        self._joined.set_exception(BootstrapError(message, transient=condition in ROOM_FULL))

    def _on_disconnected(self, client: ClientXMPP) -> None:
        if client is not self._client:
            return  # an old session we closed ourselves
        if self._in_room:
            self.stats["sessions_lost"] += 1
            log.warning("XMPP session to %s dropped", self._room)
        self._in_room = False
        self._anchor = None
        self._changed()  # the node layer calls stop() to clean up, and start() to come back

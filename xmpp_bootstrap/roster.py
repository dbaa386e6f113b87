"""SocialVPN's friends: which XMPP contacts are mutual friends, which of their devices run the node, and the
roster commands that make and end a friendship.

A friend is a roster contact whose presence subscription is mutual, subscription="both" (RFC 6121 section 3).
Each friend device is a resource of that account (a full JID) whose presence carries our node marker,
<node xmlns='urn:ipop-overlay:social:0'/>, so a friend's chat client (Pidgin, say) on the same account is seen
online but is not taken for a VPN device.

Pure core: `FriendRoster` is fed roster items and presences (parsed from stanzas by `parse_roster` and
`parse_presence`) with the time `now`, answers who the friends, their online devices and the pending inbound
requests are, and returns what changed as events (`FriendAdded`, `FriendRemoved`, `DeviceOnline`,
`DeviceOffline`, `FriendRequest`). It reads no clock and sends nothing.

The commands and the watch that feeds a FriendRoster from a live session: xmpp_bootstrap/friends.py.

What Prosody 0.12 does, checked against a real server (tests/test_roster.py) unless marked (source):
- it advertises pre-approval (<sub xmlns='urn:xmpp:features:pre-approval'/>) and applies it fully: the
  contact's later request is approved by the server and both rosters become "both" without a prompt;
- it redelivers pending inbound requests when a resource sends initial presence, before it answers that
  session's next stanza; and it acknowledges a subscribe with an unavailable presence from the contact's
  bare JID, which names no resource;
- a roster get with the version we last saw is answered without a <query/> (RFC 6121 section 2.6.3), so we
  always ask for the whole roster;
- (source: mod_presence.lua) declining a request (unsubscribed) from someone with no subscription changes no
  roster, so no push tells the account's other resources: they list the request until they next log in.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Literal

from slixmpp import JID
from slixmpp.jid import InvalidJID

log = logging.getLogger(__name__)

# --- From the specs -------------------------------------------------------------------------------------------
ROSTER_NS = "jabber:iq:roster"  # RFC 6121 section 2.1
PING_NS = "urn:xmpp:ping"  # XEP-0199
PREAPPROVAL_FEATURE = "preapproval"  # slixmpp's name for <sub xmlns='urn:xmpp:features:pre-approval'/>
# RFC 6121 section 2.1.2.5: the subscription states a roster item can be in; "remove" only in a roster set.
SUBSCRIPTIONS = ("none", "to", "from", "both")
# RFC 6121 section 4.7.1: presence without a type is "available"; these types are the ones we act on.
PRESENCE_KINDS = ("available", "unavailable", "subscribe", "unsubscribe", "subscribed", "unsubscribed")

# --- Our choice -----------------------------------------------------------------------------------------------
SOCIAL_NS = "urn:ipop-overlay:social:0"
# In a device's presence: this resource runs the node. Its `statement` attribute (base64) is the node's signed
# statement binding its key to this full JID; this layer passes it on and the node checks it
# (overlay/social/devices.py).
NODE_TAG = f"{{{SOCIAL_NS}}}node"
STATEMENT_ATTR = "statement"

Subscription = Literal["none", "to", "from", "both"]
PresenceKind = Literal["available", "unavailable", "subscribe", "unsubscribe", "subscribed", "unsubscribed"]


# --- What goes in ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RosterItem:
    """One <item/> of a roster result or push (RFC 6121 section 2.1.2)."""

    jid: str
    """The contact's bare JID."""
    subscription: Subscription | Literal["remove"] = "none"
    """Who sees whose presence: "to" we see theirs, "from" they see ours, "both"; "remove" in a push."""
    asking: bool = False
    """ask="subscribe": our request to see their presence waits for their answer (section 2.1.2.2)."""
    name: str = ""
    """The handle the account's owner gave the contact."""


@dataclass(frozen=True)
class PresenceNote:
    """What a presence stanza says, as far as friends are concerned."""

    jid: str
    """The sender's bare JID."""
    resource: str
    """The sender's resource; "" for a presence from the bare JID."""
    kind: PresenceKind
    """available/unavailable (RFC 6121 section 4), or a subscription request or answer (section 3)."""
    node: bool = False
    """The presence carries the node marker: the resource runs the node."""
    statement: bytes = b""
    """The marker's statement (the node's key, signed for this full JID); b"" when absent or not base64."""


def split_jid(text: str | None) -> tuple[str, str] | None:
    """(bare JID, resource) of a user@domain JID, or None for anything else (a server, a bad JID)."""
    if not text:
        return None
    try:
        jid = JID(text)
    except InvalidJID:
        return None
    if not jid.user or not jid.domain:
        return None
    return str(jid.bare), str(jid.resource)


def parse_roster(query: ET.Element) -> list[RosterItem]:
    """The items of a <query xmlns='jabber:iq:roster'/>. An item without a valid bare user@domain JID or with a
    subscription value the RFC does not define is skipped; a missing subscription is "none" (section 2.1.2.5)."""
    items = []
    for element in query.iterfind(f"{{{ROSTER_NS}}}item"):
        parsed = split_jid(element.get("jid"))
        subscription = element.get("subscription", "none")
        if parsed is None or parsed[1] or subscription not in (*SUBSCRIPTIONS, "remove"):
            continue
        items.append(
            RosterItem(
                jid=parsed[0],
                subscription=subscription,  # type: ignore[arg-type]  # checked just above
                asking=element.get("ask") == "subscribe",
                name=element.get("name", ""),
            )
        )
    return items


def parse_presence(stanza: ET.Element) -> PresenceNote | None:
    """The PresenceNote of a <presence/> from a user@domain JID, or None for one we do not act on (a probe, an
    error, a presence from a server or a room without a valid sender)."""
    sender = split_jid(stanza.get("from"))
    kind = stanza.get("type") or "available"
    if sender is None or kind not in PRESENCE_KINDS:
        return None
    marker = stanza.find(NODE_TAG)
    statement = b""
    if marker is not None:
        with contextlib.suppress(ValueError):
            statement = base64.b64decode(marker.get(STATEMENT_ATTR, ""), validate=True)
    return PresenceNote(
        jid=sender[0],
        resource=sender[1],
        kind=kind,  # type: ignore[arg-type]  # checked just above
        node=marker is not None,
        statement=statement,
    )


def node_marker(statement: bytes = b"") -> ET.Element:
    """The element a device puts in its presence to say it runs the node, with its signed statement."""
    marker = ET.Element(NODE_TAG)
    if statement:
        marker.set(STATEMENT_ATTR, base64.b64encode(statement).decode())
    return marker


# --- What comes out -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FriendEntry:
    """A contact as `friend_list` shows it."""

    jid: str
    subscription: Subscription
    """From the server's roster; "none" for someone who only asked."""
    asking: bool
    """We asked to see their presence and they have not answered."""
    requested: bool
    """They asked to see ours and nobody on this account has answered yet."""
    name: str = ""

    @property
    def friend(self) -> bool:
        """A friend: each side sees the other's presence (RFC 6121 section 3: subscription "both")."""
        return self.subscription == "both"


@dataclass(frozen=True)
class Device:
    """An online resource of a friend that runs the node."""

    jid: str
    """Full JID, friend/resource: where the node's messages go."""
    friend: str
    """The friend's bare JID."""
    resource: str
    since: float
    """`now` when it came online."""
    last_seen: float
    """`now` of its latest available presence."""
    statement: bytes = b""
    """What its node marker says (PresenceNote.statement); a new statement is a new device."""


@dataclass(frozen=True)
class FriendAdded:
    """The subscription became mutual: `friend` is a friend now (its online devices follow as DeviceOnline)."""

    friend: str


@dataclass(frozen=True)
class FriendRemoved:
    """`friend` is no longer a friend (removed, or one side cancelled); its devices went offline just before."""

    friend: str


@dataclass(frozen=True)
class DeviceOnline:
    """A friend's device is online: a resource of a friend whose presence carries the node marker."""

    device: Device


@dataclass(frozen=True)
class DeviceOffline:
    """A friend's device left: it went unavailable, dropped the marker, or its account stopped being a friend,
    or our own session dropped. `device` is as it was last seen."""

    device: Device


@dataclass(frozen=True)
class FriendRequest:
    """`jid` asks to see our presence (RFC 6121 section 3.1.3). `expected`: we asked them first (our request
    waits or they already approved it), so this is the other half of a friendship we started; otherwise a
    person decides (`friend_accept` or `friend_remove`)."""

    jid: str
    expected: bool


FriendEvent = FriendAdded | FriendRemoved | DeviceOnline | DeviceOffline | FriendRequest


# --- The pure core --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Seen:
    """An available resource of a contact (node or not)."""

    node: bool
    since: float
    last_seen: float
    statement: bytes = b""


class FriendRoster:
    """The friends of one account as its roster and the presences it received say: no I/O, no clock.

    Every input returns the events it caused, in this order: devices offline, friends removed, friends added,
    devices online, new requests (each group sorted by JID). Presence is kept only for roster contacts and
    never for our own account; a request may come from anyone."""

    def __init__(self, own_jid: str) -> None:
        parsed = split_jid(own_jid)
        if parsed is None:
            raise ValueError(f"own JID {own_jid!r} is not user@domain")
        self.own_jid = parsed[0]
        self._items: dict[str, RosterItem] = {}
        self._requests: dict[str, float] = {}  # bare JID -> `now` of its first request
        self._online: dict[str, dict[str, _Seen]] = {}  # bare JID -> resource -> what it said

    # -- inputs --

    def load(self, items: Iterable[RosterItem], now: float) -> list[FriendEvent]:
        """The whole roster (a roster result, RFC 6121 section 2.1.3): it replaces what we had."""
        fresh = {item.jid: item for item in items if item.subscription != "remove" and item.jid != self.own_jid}

        def change() -> None:
            self._items = fresh
            for jid in [j for j in self._online if j not in fresh]:
                del self._online[jid]
            self._settle_requests()

        return self._apply(change, now)

    def push(self, item: RosterItem, now: float) -> list[FriendEvent]:
        """One roster push (RFC 6121 section 2.1.6): the item changed, or left the roster ("remove")."""
        if item.jid == self.own_jid:
            return []

        def change() -> None:
            if item.subscription == "remove":
                self._items.pop(item.jid, None)
                self._online.pop(item.jid, None)
                # Removing the item cancels a pending request with it (RFC 6121 section 2.5.2).
                self._requests.pop(item.jid, None)
            else:
                self._items[item.jid] = item
            self._settle_requests()

        return self._apply(change, now)

    def presence(self, note: PresenceNote, now: float) -> list[FriendEvent]:
        """A presence from a contact: availability (section 4) or a subscription request or answer (section 3).
        An answer (subscribed, unsubscribed) changes nothing here: the roster push that follows does."""
        if note.jid == self.own_jid:
            return []  # our own other resources: not friends
        if note.kind == "subscribe":
            return self._apply(lambda: self._request(note.jid, now), now)
        if note.kind == "unsubscribe":
            # Before we answered: the request is withdrawn (section 3.3); after: a push tells the rest.
            return self._apply(lambda: self._requests.pop(note.jid, None), now)
        if note.jid not in self._items or note.kind not in ("available", "unavailable"):
            return []
        return self._apply(lambda: self._availability(note, now), now)

    def answered(self, jid: str, now: float) -> list[FriendEvent]:
        """This session answered `jid`'s request (sent subscribed or unsubscribed)."""
        return self._apply(lambda: self._requests.pop(jid, None), now)

    def session_lost(self, now: float) -> list[FriendEvent]:
        """Our session dropped: every device is offline as far as we know, and the server redelivers pending
        requests when the next session sends initial presence (RFC 6121 section 3.1.3), so they are dropped
        (and reported again as FriendRequest then). The roster stays, so the next `load` reports only real
        changes."""

        def change() -> None:
            self._online.clear()
            self._requests.clear()

        return self._apply(change, now)

    # -- questions --

    def friends(self) -> list[str]:
        """Bare JIDs with subscription "both", sorted."""
        return sorted(jid for jid, item in self._items.items() if item.subscription == "both")

    def devices(self, friend: str | None = None) -> list[Device]:
        """Online node devices of every friend (or of `friend`), the most recently seen first."""
        found = [d for d in self._devices().values() if friend is None or d.friend == friend]
        return sorted(found, key=lambda d: (-d.last_seen, d.jid))

    def online_resources(self, jid: str) -> list[str]:
        """Every available resource of a contact, node or not (a chat client counts here), sorted."""
        return sorted(self._online.get(jid, {}))

    def requests(self) -> list[str]:
        """Bare JIDs whose request to see our presence waits for an answer, oldest first."""
        return sorted(self._requests, key=lambda jid: (self._requests[jid], jid))

    def entries(self) -> list[FriendEntry]:
        """Every roster contact and every pending requester, sorted by JID."""
        entries = {
            jid: FriendEntry(jid, item.subscription, item.asking, jid in self._requests, item.name)  # type: ignore[arg-type]
            for jid, item in self._items.items()
        }
        for jid in self._requests:
            entries.setdefault(jid, FriendEntry(jid, "none", False, True))
        return [entries[jid] for jid in sorted(entries)]

    def expects(self, jid: str) -> bool:
        """We started a friendship with `jid`: our request waits, or they already approved it ("to")."""
        item = self._items.get(jid)
        return item is not None and (item.asking or item.subscription == "to")

    # -- how inputs change the state --

    def _request(self, jid: str, now: float) -> None:
        item = self._items.get(jid)
        if item is not None and item.subscription in ("from", "both"):
            return  # already approved: the server answers a repeat itself (RFC 6121 section 3.1.3)
        self._requests.setdefault(jid, now)

    def _settle_requests(self) -> None:
        """A request is answered once the roster says they see our presence (approved on any resource)."""
        for jid in [j for j in self._requests if self._items.get(j, RosterItem(j)).subscription in ("from", "both")]:
            del self._requests[jid]

    def _availability(self, note: PresenceNote, now: float) -> None:
        resources = self._online.setdefault(note.jid, {})
        if note.kind == "unavailable":
            if note.resource:
                resources.pop(note.resource, None)
            else:
                resources.clear()  # from the bare JID: no resource is available (RFC 6121 section 4.3.2)
        elif note.resource:  # a device is a resource: an available presence from a bare JID names none
            seen = resources.get(note.resource)
            if seen is None or seen.node != note.node or seen.statement != note.statement:
                resources[note.resource] = _Seen(note.node, now, now, note.statement)
            else:
                resources[note.resource] = replace(seen, last_seen=now)
        if not resources:
            del self._online[note.jid]

    def _devices(self) -> dict[str, Device]:
        devices = {}
        for jid in self.friends():
            for resource, seen in self._online.get(jid, {}).items():
                if seen.node:
                    full = f"{jid}/{resource}"
                    devices[full] = Device(full, jid, resource, seen.since, seen.last_seen, seen.statement)
        return devices

    def _apply(self, change: Callable[[], object], now: float) -> list[FriendEvent]:
        """Run `change` and report the difference it made. Every input goes through here, so an event means
        the same whatever input caused it."""
        friends, devices, requests = set(self.friends()), self._devices(), set(self._requests)
        change()
        friends_after, devices_after = set(self.friends()), self._devices()
        # A device whose statement changed (a new key on the same resource) leaves and comes back as new.
        renewed = {
            j for j in devices.keys() & devices_after.keys() if devices[j].statement != devices_after[j].statement
        }
        for jid in renewed:
            devices_after.pop(jid)
        events: list[FriendEvent] = []
        events += [DeviceOffline(devices[jid]) for jid in sorted(devices.keys() - devices_after.keys())]
        events += [FriendRemoved(jid) for jid in sorted(friends - friends_after)]
        events += [FriendAdded(jid) for jid in sorted(friends_after - friends)]
        devices_after = self._devices()
        events += [
            DeviceOnline(devices_after[jid])
            for jid in sorted((devices_after.keys() - devices.keys()) | (renewed & devices_after.keys()))
        ]
        events += [FriendRequest(jid, self.expects(jid)) for jid in sorted(self._requests.keys() - requests)]
        return events

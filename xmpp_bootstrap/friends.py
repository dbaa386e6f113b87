"""SocialVPN's friend commands and the watch that keeps a FriendRoster (xmpp_bootstrap/roster.py) in step with
a live slixmpp session.

`FriendWatch` feeds the session's roster pushes and presences to the pure FriendRoster (roster pushes reach every
resource of the account, RFC 6121 section 2.1.6, so a friendship made or ended from Pidgin on the same account
shows up the same way); `friend_add`, `friend_accept`, `friend_remove` and `friend_list` are the commands.
Nobody is accepted automatically: slixmpp's default would approve every request and subscribe back
(auto_authorize=True, auto_subscribe=True); a SocialVPN session holds requests for a person instead
(`hold_subscription_requests`). The one request a node approves by itself is the answer to a request it sent
(`FriendRequest.expected`): `friend add` already said yes to that contact.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

from slixmpp import JID, ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.jid import InvalidJID

from xmpp_bootstrap.roster import (
    PING_NS,
    PREAPPROVAL_FEATURE,
    ROSTER_NS,
    FriendEntry,
    FriendEvent,
    FriendRequest,
    FriendRoster,
    node_marker,
    parse_presence,
    parse_roster,
    split_jid,
)
from xmpp_bootstrap.session import BootstrapError

log = logging.getLogger(__name__)

# --- The driver -----------------------------------------------------------------------------------------------

DEFAULT_TIMEOUT = 10.0
# FriendWatch attached to each client, so friend_list and friend_remove see the requests it has received.
_watches: weakref.WeakKeyDictionary[ClientXMPP, FriendWatch] = weakref.WeakKeyDictionary()


def hold_subscription_requests(client: ClientXMPP) -> None:
    """Make slixmpp leave subscription requests to a person. Its defaults approve everyone and subscribe back
    (auto_authorize=True, auto_subscribe=True); auto_authorize=False would decline everyone, also the requests
    a person means to accept later, here or from Pidgin. None holds them."""
    client.auto_authorize = None
    client.auto_subscribe = False


def _account(client: ClientXMPP) -> str:
    return str(client.boundjid.bare)


def _check_session(client: ClientXMPP, what: str) -> None:
    if not client.is_connected() or not client.session_bind_event.is_set():
        raise BootstrapError(f"not logged in to an XMPP server, so {what} cannot be done: log in first", transient=True)


def _contact(client: ClientXMPP, text: str, what: str) -> str:
    """`text` as the bare JID of another account, or a BootstrapError naming the value."""
    try:
        jid = JID(text)
    except InvalidJID as exc:
        raise BootstrapError(f"friend {text!r} is not a valid JID ({exc}): write it as user@domain") from None
    if not jid.user or not jid.domain:
        raise BootstrapError(f"friend {text!r} is not user@domain: write it as user@domain")
    if jid.resource:
        raise BootstrapError(f"friend {text!r} has a resource (/{jid.resource}): give the bare JID {jid.bare}")
    _check_session(client, f"{what} {jid.bare}")
    if jid.bare == client.boundjid.bare:
        raise BootstrapError(f"{jid.bare} is your own account: a friend is another account")
    return str(jid.bare)


def _send_presence(client: ClientXMPP, jid: str, kind: str) -> None:
    client.make_presence(pto=JID(jid), ptype=kind).send()  # type: ignore[arg-type]


async def _settle(client: ClientXMPP, timeout: float, what: str) -> None:
    """Wait until the server has handled what we sent: a server handles a session's stanzas in order, so its
    answer to a ping (XEP-0199) comes after theirs. Any answer will do, an error too."""
    iq = client.make_iq_get(ito=JID(client.boundjid.domain))
    iq.append(ET.Element(f"{{{PING_NS}}}ping"))
    try:
        await iq.send(timeout=timeout)  # type: ignore[no-untyped-call]
    except IqError:
        pass
    except IqTimeout:
        raise BootstrapError(
            f"the XMPP server did not confirm {what} within {timeout:g} s: check the connection and try again",
            transient=True,
        ) from None


async def _roster_iq(client: ClientXMPP, item: ET.Element | None, timeout: float, what: str) -> ET.Element:
    """A roster get (item None) or set of one item (RFC 6121 sections 2.2 and 2.3): the answer's query.

    The get carries no version, so the answer is always the whole roster (section 2.6.3). Raises IqError for
    the caller to explain; a timeout is a transient BootstrapError."""
    iq = client.make_iq_get() if item is None else client.make_iq_set()
    query = ET.Element(f"{{{ROSTER_NS}}}query")
    if item is not None:
        query.append(item)
    iq.append(query)
    try:
        result: Any = await iq.send(timeout=timeout)  # type: ignore[no-untyped-call]
    except IqTimeout:
        raise BootstrapError(
            f"the XMPP server did not answer {what} within {timeout:g} s: try again", transient=True
        ) from None
    found = result.xml.find(f"{{{ROSTER_NS}}}query")
    return found if found is not None else ET.Element(f"{{{ROSTER_NS}}}query")


def _refused(exc: IqError, what: str, account: str) -> BootstrapError:
    text = f": {exc.text}" if exc.text else ""
    return BootstrapError(f"the server refused {what} for {account} ({exc.condition}{text})")


def _roster_addition(roster: ET.Element, contact: str, name: str) -> ET.Element | None:
    """The <item/> of a roster set that adds `contact` (or renames it), or None when it is there already.

    A roster set replaces the item's name and groups (RFC 6121 section 2.4), so the ones a chat client gave
    an existing contact are carried over; subscription and ask are the server's to set (section 2.1.2)."""
    current = next(
        (e for e in roster.iterfind(f"{{{ROSTER_NS}}}item") if split_jid(e.get("jid")) == (contact, "")), None
    )
    if current is not None and (not name or current.get("name") == name):
        return None
    item = ET.Element(f"{{{ROSTER_NS}}}item", {"jid": contact, **({"name": name} if name else {})})
    for group in current.iterfind(f"{{{ROSTER_NS}}}group") if current is not None else ():
        ET.SubElement(item, f"{{{ROSTER_NS}}}group").text = group.text
    return item


async def friend_add(client: ClientXMPP, jid: str, *, name: str = "", timeout: float = DEFAULT_TIMEOUT) -> None:
    """Ask `jid` to be a friend: add it to the roster (RFC 6121 section 2.3), say yes in advance to its request
    for our presence (section 3.4 pre-approval, when the server offers it; or approve the request it already
    sent, section 3.1.4), and ask for its presence (section 3.1.1). The subscription becomes "both" when the
    other side agrees: by `friend_accept`, or from its chat client."""
    contact = _contact(client, jid, "adding friend")
    account = _account(client)
    what = f"adding {contact} to the roster"
    try:
        item = _roster_addition(await _roster_iq(client, None, timeout, what), contact, name)
        if item is not None:
            await _roster_iq(client, item, timeout, what)
    except IqError as exc:
        raise _refused(exc, what, account) from None
    # Without pre-approval the contact's request comes back later and a FriendWatch approves it (expected).
    watch = _watches.get(client)
    requested = watch is not None and contact in watch.roster.requests()
    if PREAPPROVAL_FEATURE in client.features or requested:
        _send_presence(client, contact, "subscribed")
    _send_presence(client, contact, "subscribe")
    await _settle(client, timeout, f"the friend request to {contact}")


async def friend_accept(client: ClientXMPP, jid: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Say yes to `jid`'s request to see our presence (RFC 6121 section 3.1.4) and ask for theirs back (section
    3.1.1), so the subscription becomes "both". With no request pending this is a pre-approval (section 3.4)."""
    contact = _contact(client, jid, "accepting friend")
    _send_presence(client, contact, "subscribed")
    _send_presence(client, contact, "subscribe")
    await _settle(client, timeout, f"accepting {contact}")


async def friend_remove(client: ClientXMPP, jid: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """End a friendship: remove `jid` from the roster, which cancels the subscriptions both ways (RFC 6121
    section 2.5.2; the server tells the contact). For someone who only asked (no roster item) this declines
    the request (section 3.1.4)."""
    contact = _contact(client, jid, "removing friend")
    account = _account(client)
    item = ET.Element(f"{{{ROSTER_NS}}}item", {"jid": contact, "subscription": "remove"})
    try:
        await _roster_iq(client, item, timeout, f"removing {contact} from the roster")
        return
    except IqError as exc:
        if exc.condition != "item-not-found":
            raise _refused(exc, f"removing {contact} from the roster", account) from None
    watch = _watches.get(client)
    known_request = watch is not None and contact in watch.roster.requests()
    _send_presence(client, contact, "unsubscribed")  # declines a request the server holds; ignored otherwise
    await _settle(client, timeout, f"declining {contact}")
    if not known_request:
        raise BootstrapError(
            f"{contact} is not in the roster of {account}: nothing to remove (a friend request from it, if any, "
            "was declined)"
        )


async def friend_list(client: ClientXMPP, *, timeout: float = DEFAULT_TIMEOUT) -> list[FriendEntry]:
    """Every contact with its subscription and pending flags, sorted by JID.

    Pending requests reach only an available session (the server redelivers them on initial presence, RFC
    6121 section 3.1.3), so on a session without a FriendWatch this starts one without the node marker: the
    session becomes available to friends, as a chat client, not a device."""
    _check_session(client, "listing friends")
    watch = _watches.get(client) or FriendWatch(client, node=False)
    if watch.started:
        await _settle(client, timeout, "listing friends")  # pushes already on their way land first
    else:
        await watch.start(timeout)
    return watch.roster.entries()


class FriendWatch:
    """Keeps a FriendRoster in step with one slixmpp session and hands its events to `on_event`.

    Create it before or after login; `start()` on a logged-in session fetches the roster, sends our presence
    (with the node marker when `node`), and returns once the server has answered, so the friends' current
    presences and the pending requests have arrived. Start it before anything else sends a broadcast presence:
    contacts' presences are probed only on the first one (RFC 6121 section 4.2.2). A request that answers our
    own (`FriendRequest.expected`) is approved at once; every other request waits for a person.
    `close()` detaches it; a dropped session reports every device offline."""

    def __init__(
        self,
        client: ClientXMPP,
        *,
        node: bool = True,
        statement: bytes = b"",
        on_event: Callable[[FriendEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        roster: FriendRoster | None = None,
    ) -> None:
        self.client = client
        self.node = node
        self.statement = statement  # what our node marker says (overlay/social/devices.py)
        self.on_event = on_event
        self.clock = clock
        self.roster = roster if roster is not None else FriendRoster(str(client.requested_jid.bare))
        self._started = False
        hold_subscription_requests(client)
        client.add_event_handler("roster_update", self._on_roster)
        client.add_event_handler("presence", self._on_presence)
        client.add_event_handler("disconnected", self._on_disconnected)
        client.add_filter("out_sync", self._on_sent)
        _watches[client] = self

    @property
    def started(self) -> bool:
        """start() has loaded the roster of the current session."""
        return self._started

    async def start(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        _check_session(self.client, "watching friends")
        try:
            query = await _roster_iq(self.client, None, timeout, "the roster request")
        except IqError as exc:
            raise _refused(exc, "the roster request", _account(self.client)) from None
        self._feed(self.roster.load(parse_roster(query), self.clock()))
        self._started = True
        self.announce()
        await _settle(self.client, timeout, "our presence")

    def announce(self) -> None:
        """Send our presence to every contact that sees it, with the node marker when we are a device."""
        presence = self.client.make_presence()
        if self.node:
            presence.append(node_marker(self.statement))
        presence.send()

    def close(self) -> None:
        self.client.del_event_handler("roster_update", self._on_roster)
        self.client.del_event_handler("presence", self._on_presence)
        self.client.del_event_handler("disconnected", self._on_disconnected)
        with contextlib.suppress(ValueError):
            self.client.del_filter("out_sync", self._on_sent)
        if _watches.get(self.client) is self:
            del _watches[self.client]

    # -- inputs from the session --

    def _on_roster(self, iq: Any) -> None:
        query = iq.xml.find(f"{{{ROSTER_NS}}}query")
        if query is None:
            return  # a versioned result: the roster did not change (RFC 6121 section 2.6.3)
        now = self.clock()
        if iq["type"] == "set":
            for item in parse_roster(query):
                self._feed(self.roster.push(item, now))
        elif self._started:
            self._feed(self.roster.load(parse_roster(query), now))

    def _on_presence(self, presence: Any) -> None:
        note = parse_presence(presence.xml)
        if note is not None:
            self._feed(self.roster.presence(note, self.clock()))

    def _on_sent(self, stanza: Any) -> Any:
        xml = stanza.xml
        if xml.tag == "{jabber:client}presence" and xml.get("type") in ("subscribed", "unsubscribed"):
            target = split_jid(xml.get("to"))
            if target is not None:
                self._feed(self.roster.answered(target[0], self.clock()))
        return stanza

    def _on_disconnected(self, _reason: object) -> None:
        self._started = False
        self._feed(self.roster.session_lost(self.clock()))

    def _feed(self, events: list[FriendEvent]) -> None:
        for event in events:
            if isinstance(event, FriendRequest) and event.expected:
                # The other half of a friendship we asked for (friend_add said yes already): approve it.
                _send_presence(self.client, event.jid, "subscribed")
            if self.on_event is not None:
                try:
                    self.on_event(event)
                except Exception:
                    log.exception("the node layer failed on friend event %s", event)

"""Group administration as the room's owner over XMPP: create the members-only room, add, remove and list members.

A group is a members-only MUC room (XEP-0045), so running a group is setting affiliations in that room. The
helpers take an already-connected slixmpp client, so a node's own session (the certificate issuer's, say) can
call them; `admin_session` and the `group_*` entry points log in for one command, as the CLI does. Every
failure is a BootstrapError with one line; `transient` marks a server that did not answer in time.

What Prosody 0.12 answers, checked against a real server (tests/test_group_admin.py):
- a list query (muc#admin get) by a member: forbidden; the owner list asked by an admin: forbidden;
- an affiliation change by a member, or an admin granting admin/owner: not-allowed;
- the last owner giving up ownership: not-acceptable;
- any request to a room that does not exist: item-not-found;
- only the first <item> of a multi-item change is applied, so every change is its own IQ;
- a syntactically invalid JID is stored as given, so JIDs are checked here before anything is sent.
ejabberd 23.01 differs where it matters here: a join that would create a room the account may not create is
refused with forbidden (Prosody: not-allowed), and new rooms are public, moderated and capped at 200 occupants
until their owner configures them, which create_room does and then checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slixmpp import JID, ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.jid import InvalidJID
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from xmpp_bootstrap.client import XmppBootstrap, XmppSettings
from xmpp_bootstrap.protocol import room_config_problems
from xmpp_bootstrap.session import (
    DISCO_INFO_NS,
    MUC_NS,
    MUC_USER_NS,
    SELF_PRESENCE_STATUS,
    BootstrapError,
    stanza_error,
)

log = logging.getLogger(__name__)

MUC_ADMIN_NS = "http://jabber.org/protocol/muc#admin"
MUC_OWNER_NS = "http://jabber.org/protocol/muc#owner"
DATA_NS = "jabber:x:data"

# XEP-0045 section 5.2: the affiliations a room keeps. "none" removes one; outcasts are banned.
AFFILIATIONS = ("owner", "admin", "member", "none", "outcast")
# The lists fetch_affiliations reads (section 9.5 members, 10.5 owners and admins), lowest rank first.
LISTED = ("member", "admin", "owner")
# XEP-0045 section 10.1.3: the self-presence of an occupant whose join created the room carries status 201.
ROOM_CREATED_STATUS = "201"

# The room configuration a group needs (XEP-0045 section 10.2, muc#roomconfig). Only fields the server's own
# form offers are submitted; real JIDs stay visible to moderators only (muc#roomconfig_whois is left alone).
ROOM_CONFIG = {
    "muc#roomconfig_membersonly": "1",  # the membership check: the server refuses a non-member's join
    "muc#roomconfig_persistentroom": "1",  # the group outlives its last occupant: most nodes are not in it
    "muc#roomconfig_publicroom": "0",
    "muc#roomconfig_moderatedroom": "0",
    # Invitations by members would add members behind the owner's back: XEP-0045's field and Prosody's own.
    "muc#roomconfig_allowinvites": "0",
    "{http://prosody.im/protocol/muc}roomconfig_allowmemberinvites": "0",
}
MAXUSERS_FIELD = "muc#roomconfig_maxusers"
FORM_TYPE = "http://jabber.org/protocol/muc#roomconfig"
# Our occupant nick while creating a room: not hex, so it cannot be a node's nick (a node ID in hex).
ADMIN_NICK = "group-admin"


@dataclass(frozen=True)
class AdminSettings:
    """Where and as whom the group's owner logs in, and which room is the group."""

    jid: str
    """The owner's account, user@domain (a resource is allowed and ignored for affiliations)."""
    password: str
    """The account's password."""
    room: str
    """The group: room@conference.domain."""
    host: str | None = None
    """Server to connect to; default: the JID's domain."""
    port: int = 5222
    """Client port; STARTTLS is required on it."""
    ca_file: Path | None = None
    """PEM file of a CA to trust (self-signed servers); else system trust. TLS is always verified."""
    timeout: float = 10.0
    """Bound on the login and on each request to the room."""


# -- JIDs --


def _parse_jid(text: str, what: str) -> JID:
    """`text` as a user@domain JID (a resource allowed), or a BootstrapError naming `what` and the value."""
    try:
        jid = JID(text)
    except InvalidJID as exc:
        raise BootstrapError(f"{what} {text!r} is not a valid JID ({exc}): write it as user@domain") from None
    if not jid.user or not jid.domain:
        raise BootstrapError(f"{what} {text!r} is not user@domain: write it as user@domain")
    return jid


def bare_jid(text: str, what: str = "JID") -> str:
    """`text` as a bare user@domain JID, or a BootstrapError naming `what` and the value."""
    jid = _parse_jid(text, what)
    if jid.resource:
        raise BootstrapError(f"{what} {text!r} has a resource (/{jid.resource}): give the bare JID {jid.bare}")
    return str(jid.bare)


def _bare_jids(texts: list[str], what: str = "member") -> list[str]:
    """Each JID checked and made bare, duplicates dropped, order kept."""
    return list(dict.fromkeys(bare_jid(text, what) for text in texts))


# -- requests to the room --


def _refusal(exc: IqError, room: str, account: str, what: str) -> BootstrapError:
    """One line for a room's error answer to `what` (XEP-0045's conditions as Prosody 0.12 uses them)."""
    condition = str(exc.condition)
    if condition in ("forbidden", "not-authorized"):
        return BootstrapError(f"you ({account}) are not an owner/admin of {room}: {what} needs one")
    if condition == "item-not-found":
        return BootstrapError(f"no such room {room}: check the room name, or create the group first")
    text = f": {exc.text}" if exc.text else ""
    return BootstrapError(f"{room} refused {what} ({condition}{text})")


async def _request(
    client: ClientXMPP, room: str, iq_type: str, ns: str, child: ET.Element | None, timeout: float, what: str
) -> ET.Element:
    """Send <query xmlns=ns>child</query> to the room, return the answer's query (empty when it has none).

    Raises IqError for the caller to explain; a timeout becomes a transient BootstrapError here."""
    iq = client.make_iq_get(ito=room) if iq_type == "get" else client.make_iq_set(ito=room)
    query = ET.Element(f"{{{ns}}}query")
    if child is not None:
        query.append(child)
    iq.append(query)
    try:
        result: Any = await iq.send(timeout=timeout)  # type: ignore[no-untyped-call]
    except IqTimeout:
        raise BootstrapError(f"{room} did not answer {what} within {timeout:g} s: try again", transient=True) from None
    found = result.xml.find(f"{{{ns}}}query")
    return found if found is not None else ET.Element(f"{{{ns}}}query")


async def fetch_affiliations(client: ClientXMPP, room: str, timeout: float = 10.0) -> dict[str, str]:
    """Bare JID -> "owner", "admin" or "member" for the room's affiliated accounts (outcasts left out).

    An admin may not read the owner list (XEP-0045 section 10.5): that refusal is skipped, so an admin gets
    the members and admins."""
    room = bare_jid(room, "room")
    account = str(client.boundjid.bare)
    affiliations: dict[str, str] = {}
    for affiliation in LISTED:
        item = ET.Element(f"{{{MUC_ADMIN_NS}}}item", {"affiliation": affiliation})
        what = f"listing its {affiliation}s"
        try:
            query = await _request(client, room, "get", MUC_ADMIN_NS, item, timeout, what)
        except IqError as exc:
            if affiliation == "owner" and exc.condition == "forbidden":
                continue
            raise _refusal(exc, room, account, what) from None
        for found in query.iterfind(f"{{{MUC_ADMIN_NS}}}item"):
            jid = found.get("jid")
            if jid:
                affiliations[jid] = found.get("affiliation", affiliation)
    return dict(sorted(affiliations.items()))


async def set_affiliation(client: ClientXMPP, room: str, jid: str, affiliation: str, timeout: float = 10.0) -> None:
    """Give `jid` an affiliation in the room; "none" removes it (and the server kicks it from a members-only
    room). One item per IQ: Prosody 0.12 applies only the first item of a multi-item change."""
    room = bare_jid(room, "room")
    jid = bare_jid(jid)
    if affiliation not in AFFILIATIONS:
        raise BootstrapError(f"affiliation {affiliation!r} is not one of {', '.join(AFFILIATIONS)}")
    account = str(client.boundjid.bare)
    what = f"making {jid} {affiliation}"
    item = ET.Element(f"{{{MUC_ADMIN_NS}}}item", {"affiliation": affiliation, "jid": jid})
    try:
        await _request(client, room, "set", MUC_ADMIN_NS, item, timeout, what)
    except IqError as exc:
        if exc.condition == "not-allowed":
            # Prosody's answer both to a member changing anyone and to an admin touching admins or owners.
            raise BootstrapError(
                f"{account} may not make {jid} {affiliation} in {room}: members need an owner/admin, "
                "admins and owners need an owner"
            ) from None
        if exc.condition == "not-acceptable":
            raise BootstrapError(
                f"{room} refused {what} (not-acceptable): is {jid} its only owner? a room keeps one"
            ) from None
        raise _refusal(exc, room, account, what) from None


async def _add_members(client: ClientXMPP, room: str, jids: list[str], timeout: float) -> None:
    """Make each JID a member, leaving alone our own account and anyone already member, admin or owner (so
    adding never demotes)."""
    current = await fetch_affiliations(client, room, timeout)
    for jid in jids:
        if jid != client.boundjid.bare and jid not in current:
            await set_affiliation(client, room, jid, "member", timeout)


# -- creating and configuring the room --


async def _room_features(client: ClientXMPP, room: str, timeout: float) -> set[str] | None:
    """Disco#info the room (XEP-0045 section 6.4): the features it advertises, or None when it does not exist.
    A join would create a missing room, so look first."""
    what = "a room lookup"
    try:
        query = await _request(client, room, "get", DISCO_INFO_NS, None, timeout, what)
    except IqError as exc:
        if exc.condition == "item-not-found":
            return None
        raise _refusal(exc, room, str(client.boundjid.bare), what) from None
    return {f.get("var", "") for f in query.iterfind(f"{{{DISCO_INFO_NS}}}feature")}


async def _room_exists(client: ClientXMPP, room: str, timeout: float) -> bool:
    return await _room_features(client, room, timeout) is not None


async def _check_configured(client: ClientXMPP, room: str, timeout: float) -> None:
    """Read back what the room advertises after our config: not members-only is an error (the membership check
    would be gone); public or moderated (a server whose form lacks the field) is a warning."""
    features = await _room_features(client, room, timeout)
    if features is None:
        raise BootstrapError(f"room {room} disappeared while it was configured: try again", transient=True)
    if "muc_open" in features:
        raise BootstrapError(
            f"room {room} is still open after configuring it members-only: the server ignored the setting, "
            "so it cannot hold a group"
        )
    for problem in room_config_problems(room, features):
        log.warning("%s, even after configuring it: the server's form has no field for that", problem)


async def _join(client: ClientXMPP, room: str, nick: str, timeout: float) -> bool:
    """Enter the room as `nick`; True when our join created it (status 201)."""
    account = str(client.boundjid.bare)
    joined: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def on_presence(pres: Any) -> None:
        sender = pres["from"]
        if sender.bare != room or joined.done():
            return
        if pres["type"] == "error":
            # Prosody's refusal lacks the MUC <x/> child, so it is matched by the room's JID (as client.py does).
            condition = stanza_error(pres)
            # We join only a room that did not exist: a members-only room made meanwhile refuses us with
            # registration-required, and a refused creation is not-allowed (Prosody) or forbidden (ejabberd).
            if condition == "registration-required":
                message = f"{room} exists and {account} is not its owner"
            elif condition in ("not-allowed", "forbidden"):
                message = f"room {room} does not exist and {account} may not create rooms: ask the server's admin"
            elif condition == "conflict":
                message = f"nick {nick} is already in use in {room}: is another group admin running?"
            else:
                message = f"joining {room} to create it was refused ({condition})"
            joined.set_exception(BootstrapError(message))
            return
        codes = {s.get("code") for s in pres.xml.iterfind(f"{{{MUC_USER_NS}}}x/{{{MUC_USER_NS}}}status")}
        if sender.resource == nick and SELF_PRESENCE_STATUS in codes:
            joined.set_result(ROOM_CREATED_STATUS in codes)

    name = f"group admin join {room}/{nick} {id(joined)}"
    client.register_handler(Callback(name, MatchXPath("{jabber:client}presence"), on_presence))
    try:
        pres = client.make_presence(pto=JID(f"{room}/{nick}"))
        muc = ET.Element(f"{{{MUC_NS}}}x")
        ET.SubElement(muc, f"{{{MUC_NS}}}history", {"maxstanzas": "0"})
        pres.append(muc)
        pres.send()
        try:
            return await asyncio.wait_for(joined, timeout)
        except TimeoutError:
            raise BootstrapError(
                f"joining {room} to create it got no answer within {timeout:g} s: try again", transient=True
            ) from None
    finally:
        client.remove_handler(name)


def _occupant_limit(field: ET.Element) -> str | None:
    """The loosest occupant limit a muc#roomconfig_maxusers field offers: "none" (no limit) or its largest
    number; None when it offers no choices, since a free-text limit's ceiling is the server's secret."""
    options = [v.text or "" for v in field.iterfind(f"{{{DATA_NS}}}option/{{{DATA_NS}}}value")]
    if "none" in options:
        return "none"
    numbers = [int(o) for o in options if o.isdigit()]
    return str(max(numbers)) if numbers else None


def config_submission(form: ET.Element) -> ET.Element:
    """The submit form for a group's room from the form the server offered: our values for the fields it has,
    nothing for fields it lacks (a server may refuse unknown fields), everything else left as it is."""
    submit = ET.Element(f"{{{DATA_NS}}}x", {"type": "submit"})
    values = {"FORM_TYPE": FORM_TYPE}
    for field in form.iterfind(f"{{{DATA_NS}}}field"):
        var = field.get("var")
        if var in ROOM_CONFIG:
            values[var] = ROOM_CONFIG[var]
        elif var == MAXUSERS_FIELD and (limit := _occupant_limit(field)) is not None:
            values[var] = limit
    for var, value in values.items():
        field = ET.SubElement(submit, f"{{{DATA_NS}}}field", {"var": var})
        ET.SubElement(field, f"{{{DATA_NS}}}value").text = value
    return submit


async def _configure(client: ClientXMPP, room: str, timeout: float) -> None:
    """Fetch the owner's config form (XEP-0045 section 10.2) and submit the group's settings."""
    account = str(client.boundjid.bare)
    what = "configuring it"
    try:
        query = await _request(client, room, "get", MUC_OWNER_NS, None, timeout, what)
        form = query.find(f"{{{DATA_NS}}}x")
        if form is None:
            raise BootstrapError(f"{room} sent no configuration form: is it a XEP-0045 room?")
        await _request(client, room, "set", MUC_OWNER_NS, config_submission(form), timeout, what)
    except IqError as exc:
        if exc.condition == "forbidden":
            raise BootstrapError(f"{room} exists and {account} is not its owner") from None
        raise _refusal(exc, room, account, what) from None


async def create_room(client: ClientXMPP, room: str, nick: str, members: list[str], timeout: float = 10.0) -> None:
    """Make `room` a group: create it if missing (joining as `nick`, then leaving), configure it members-only,
    persistent, hidden and unmoderated with the loosest occupant cap, check that it took, and add each member.
    A room we already own is reconfigured and gets the members."""
    room = bare_jid(room, "room")
    jids = _bare_jids(members)
    if await _room_exists(client, room, timeout):
        await _configure(client, room, timeout)
        await _check_configured(client, room, timeout)
        await _add_members(client, room, jids, timeout)
        return
    await _join(client, room, nick, timeout)
    try:
        await _configure(client, room, timeout)
        await _check_configured(client, room, timeout)
        await _add_members(client, room, jids, timeout)
    finally:
        client.make_presence(pto=JID(f"{room}/{nick}"), ptype="unavailable").send()


# -- one command, one login --


@contextlib.asynccontextmanager
async def admin_session(settings: AdminSettings) -> AsyncIterator[ClientXMPP]:
    """A logged-in client for one command (STARTTLS, verified certificate), logged out at the end.

    The login is XmppBootstrap's own, so a refused password, a certificate that does not verify or a server
    that cannot be reached reads the same here as when a node starts."""
    account = _parse_jid(settings.jid, "jid")
    room = bare_jid(settings.room, "room")
    node = XmppBootstrap(
        XmppSettings(
            jid=settings.jid,
            password=settings.password,
            room=room,
            nick=ADMIN_NICK,
            host=settings.host or account.domain,
            port=settings.port,
            ca_file=str(settings.ca_file) if settings.ca_file is not None else None,
            timeout=settings.timeout,
        )
    )
    try:
        await node._connect()
        assert node._client is not None
        yield node._client
    finally:
        await node.stop()


async def group_create(settings: AdminSettings, members: list[str]) -> None:
    """Create the group's room as its owner (or reconfigure one we own) and add `members`."""
    jids = _bare_jids(members)
    async with admin_session(settings) as client:
        await create_room(client, settings.room, ADMIN_NICK, jids, settings.timeout)


async def group_add(settings: AdminSettings, jids: list[str]) -> None:
    """Make each JID a member of the group (owners and admins stay what they are)."""
    checked = _bare_jids(jids)
    async with admin_session(settings) as client:
        await _add_members(client, settings.room, checked, settings.timeout)


async def group_remove(settings: AdminSettings, jids: list[str]) -> None:
    """Take each JID out of the group (affiliation none); the server kicks it if it is in the room."""
    checked = _bare_jids(jids)
    async with admin_session(settings) as client:
        for jid in checked:
            await set_affiliation(client, settings.room, jid, "none", settings.timeout)


async def group_list(settings: AdminSettings) -> dict[str, str]:
    """Bare JID -> owner/admin/member for the group, sorted by JID."""
    async with admin_session(settings) as client:
        return await fetch_affiliations(client, settings.room, settings.timeout)

"""The bootstrap protocol's pure rules: the hello payload codec and the anchor role decisions.

Both bootstrap implementations (XMPP and in-memory) use these functions, so the rules are written once and
tested without a server. Peer bytes are hostile: `decode_hello` returns None for anything it will not accept
and never raises.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Our choice: the node layer's signed hello (key, certificate, addresses) fits in 4 KiB with room to spare.
MAX_HELLO = 4096
# Base64 length of MAX_HELLO bytes (RFC 4648 section 4: 4 output characters per 3 input bytes, padded).
MAX_HELLO_TEXT = 4 * ((MAX_HELLO + 2) // 3)

NS = "urn:ipop-overlay:bootstrap:0"
HELLO_TAG = f"{{{NS}}}hello"
ANCHOR_TAG = f"{{{NS}}}anchor"
# <issuer/>: the occupant issues the group's certificates and stays in the room, so a joiner can ask it for one.
ISSUER_TAG = f"{{{NS}}}issuer"
# An answer carries <hello type='answer'>. Without the mark, an answer that arrives after exchange() gave up
# would look like a request, be answered, and two nodes could bounce hellos at each other forever. A one-way
# message (a link signal an anchor passes between a joiner and the overlay) carries <hello type='signal'>.
ANSWER_ATTR = "type"
ANSWER_VALUE = "answer"
SIGNAL_VALUE = "signal"
# <anchor overlay='HEX'/>: which overlay the anchor belongs to (overlay/membership.py), 16 hex digits.
OVERLAY_ATTR = "overlay"

DEFAULT_ANCHORS = 3

# XEP-0045 sections 9.1, 8.2, 9.4 and 9.7: the status code of an unavailable self-presence saying why the room
# threw us out -> the reason as logged and kept in `removed_from_room`.
REVOKED_STATUS = "321"
REMOVAL_REASONS = {
    "301": "banned",
    "307": "kicked",
    REVOKED_STATUS: "membership revoked",
    "322": "the room became members-only",
}

# XEP-0045 section 6.4 and its disco registry (section 15.3): a feature a room advertises that a group's room must
# not have -> the room config field that sets it and what it costs the group. Prosody and ejabberd both advertise
# these; ejabberd's new rooms are public and moderated unless their owner says otherwise.
ROOM_FEATURE_PROBLEMS = {
    "muc_open": ("not members-only (muc#roomconfig_membersonly off)", "any account of the server can enter it"),
    "muc_public": ("public (muc#roomconfig_publicroom on)", "the server lists it in its room directory"),
    "muc_moderated": ("moderated (muc#roomconfig_moderatedroom on)", "a moderator can take a member's voice"),
}

log = logging.getLogger(__name__)

# Whitespace XML tools may add around or inside base64 text (RFC 4648 section 3.3 lets a decoder skip it).
_XML_SPACE = b" \t\r\n"


def encode_hello(hello: bytes) -> str:
    """Base64 text for a <hello/> element; refuses our own oversized payloads (a bug on our side)."""
    if len(hello) > MAX_HELLO:
        raise ValueError(f"hello is {len(hello)} bytes, the limit is {MAX_HELLO}")
    return base64.b64encode(hello).decode("ascii")


def decode_hello(text: str | None) -> bytes | None:
    """The payload of a peer's <hello/>, or None when it is missing, oversized or not canonical base64."""
    if text is None:
        return None
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        return None
    raw = raw.translate(None, _XML_SPACE)
    if not raw or len(raw) > MAX_HELLO_TEXT:
        return None
    try:
        payload = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not payload or len(payload) > MAX_HELLO:
        return None
    return payload


@dataclass(frozen=True, slots=True)
class Occupant:
    """What a room occupant's presence says: whether it is an anchor, and of which overlay; whether it issues
    the group's certificates; and its real bare JID when the room shows it to us, else None (XEP-0045 section
    7.2.3: a semi-anonymous room shows real JIDs to moderators, i.e. its owners and admins; Prosody also shows
    each occupant those of the occupants logged in as the same account, itself included)."""

    anchor: bool = False
    overlay: int | None = None
    issuer: bool = False
    jid: str | None = None


def parse_overlay(text: str | None) -> int | None:
    """An anchor presence's overlay attribute, or None when missing or not 1-16 hex digits."""
    if text is None or not 0 < len(text) <= 16:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


def removal_reason(codes: Iterable[str]) -> str | None:
    """Why an unavailable self-presence with these status codes means we were thrown out, or None when it
    does not (we left, or the room was destroyed)."""
    for code, reason in REMOVAL_REASONS.items():
        if code in codes:
            return reason
    return None


def room_config_problems(room: str, features: Iterable[str]) -> list[str]:
    """One line per setting of `room` (from the features of its disco#info answer) that a group's room should
    not have, naming the config field and what it costs; [] for a room set up as `group create` does."""
    have = set(features)
    return [
        f"room {room} is {setting}: {cost}"
        for feature, (setting, cost) in ROOM_FEATURE_PROBLEMS.items()
        if feature in have
    ]


def should_stand_down(own_nick: str, anchor_nicks: Iterable[str], anchors: int) -> bool:
    """Whether this anchor should leave because more than `anchors` anchors are present.

    Several nodes settling at once each see a free slot and all take it; afterwards every anchor sees the same
    set, so keeping the `anchors` smallest nicks is a choice they all agree on without talking.
    `anchor_nicks` includes our own nick.
    """
    ranked = sorted(set(anchor_nicks) | {own_nick})
    return len(ranked) > anchors and own_nick not in ranked[:anchors]


HelloHandler = Callable[[bytes, str], "bytes | None"]


def answer_for(on_hello: HelloHandler | None, payload: bytes, sender: str) -> bytes | None:
    """The node layer's answer to a peer's hello request (or None; for a one-way signal the answer is
    ignored). The node layer verifies hellos; a failure there is logged and swallowed, so one bad hello cannot
    take the XMPP session down."""
    if on_hello is None:
        return None
    try:
        return on_hello(payload, sender)
    except Exception:
        log.exception("the node layer failed on a hello from %s", sender)
        return None

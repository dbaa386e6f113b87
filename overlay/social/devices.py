"""Which key is a friend's device: signed statements in presence, keys pinned on first use, names on the VNIC.

A SocialVPN node announces its node key in its XMPP presence, signed for its full JID (`statement`): the XMPP
server authenticates who sends a presence (TLS, the account's login), so the statement binds the key to that
account and resource, and the signature shows the sender holds the key. The first key seen for a device (a
full JID) is pinned (`Pins`, like SSH's known_hosts); a later, different key for the same device is never
taken silently: the device is not linked and `status` and the log say why, until a person forgets the old key
(`ipop-overlay friend forget JID/RESOURCE`). Pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from overlay.identity import Identity, verify
from overlay.ids import node_id_from_public_key
from overlay.wire import SIGNATURE_LEN

_STATEMENT_CONTEXT = b"ipop-overlay social device v1\x00"
KEY_LEN = 32
STATEMENT_LEN = KEY_LEN + SIGNATURE_LEN


def statement(identity: Identity, full_jid: str) -> bytes:
    """Our node key and its signature over our full JID: what our presence's node marker carries."""
    key = identity.public_key
    return key + identity.sign(_STATEMENT_CONTEXT + full_jid.encode() + b"\x00" + key)


def statement_key(data: bytes, full_jid: str) -> bytes | None:
    """The node key in a statement `full_jid`'s presence carried, or None unless it is one, signed for that JID."""
    if len(data) != STATEMENT_LEN:
        return None
    key, signature = data[:KEY_LEN], data[KEY_LEN:]
    if not verify(key, _STATEMENT_CONTEXT + full_jid.encode() + b"\x00" + key, signature):
        return None
    return key


class Pins:
    """The key first seen for each friend device (full JID), kept across restarts by the caller."""

    def __init__(self, pinned: Mapping[str, bytes] | None = None) -> None:
        self._keys: dict[str, bytes] = dict(pinned or {})

    def judge(self, device: str, key: bytes) -> str:
        """ "new" (pin it with `pin`), "known" (the pinned key) or "changed" (another key: do not link)."""
        pinned = self._keys.get(device)
        if pinned is None:
            return "new"
        return "known" if pinned == key else "changed"

    def pin(self, device: str, key: bytes) -> None:
        self._keys.setdefault(device, key)

    def forget(self, device: str) -> bool:
        """Drop a device's pinned key (a person confirmed its new key): True if there was one."""
        return self._keys.pop(device, None) is not None

    def export(self) -> dict[str, str]:
        return {device: base64.b64encode(key).decode() for device, key in sorted(self._keys.items())}

    @classmethod
    def load(cls, table: Mapping[str, str]) -> Pins:
        """Inverse of `export`; raises ValueError naming a bad entry."""
        keys = {}
        for device, text in table.items():
            try:
                key = base64.b64decode(text, validate=True)
            except ValueError:
                raise ValueError(f"pinned key of {device!r} is not base64") from None
            if len(key) != KEY_LEN:
                raise ValueError(f"pinned key of {device!r} is {len(key)} bytes, not {KEY_LEN}")
            keys[device] = key
        return cls(keys)


def dns_label(text: str) -> str:
    """`text` as one DNS label (RFC 1035 §2.3.1: letters, digits, hyphens; at most 63): lower case, anything
    else a hyphen. An XMPP resource or user name may hold any character; a name must not."""
    label = "".join(c if c.isascii() and c.isalnum() else "-" for c in text.lower()).strip("-")
    return label[:63] or "device"


@dataclass(frozen=True, slots=True)
class NamedDevice:
    """What names need of a friend device: its friend's bare JID, its resource, when last seen, our address for
    it."""

    friend: str
    resource: str
    last_seen: float
    address: int


def names(devices: Iterable[NamedDevice], domain: str) -> dict[str, int]:
    """Name -> address: `<resource>.<user>.<domain>` for each device, `<user>.<domain>` for the friend's most
    recently seen device. Two friends with the same user name on different servers: the first by JID keeps the
    short names (their devices stay reachable by resource name only if resources differ)."""
    table: dict[str, int] = {}
    latest: dict[str, tuple[float, int]] = {}
    owner: dict[str, str] = {}
    for d in sorted(devices, key=lambda d: (d.friend, d.resource)):
        user = dns_label(d.friend.split("@")[0])
        if owner.setdefault(user, d.friend) != d.friend:
            continue
        table.setdefault(f"{dns_label(d.resource)}.{user}.{domain}", d.address)
        if user not in latest or d.last_seen > latest[user][0]:
            latest[user] = (d.last_seen, d.address)
    for user, (_, address) in latest.items():
        table[f"{user}.{domain}"] = address
    return table


@dataclass
class FriendLink:
    """A friend device this node knows: online in XMPP, or offline there with its link still answering."""

    jid: str  # full JID
    friend: str
    resource: str
    key: bytes
    said: bytes  # the statement its presence carried (judged again after `forget`)
    local: int  # the address we gave it in our subnet
    last_seen: float
    warning: str | None = None  # why it is not linked (a changed key)
    # Its presence says it is online. An unavailable presence ends only its XMPP session (or ours, or the
    # server's): a link that still answers stays until the device closes it or goes silent.
    online: bool = True
    remote: int | None = None  # its own TAP address, once it told us (LinkMsg.PLACES)
    remote_view: int | None = None  # where it placed us
    last_try: float = -1e18
    last_ping: float = -1e18
    last_heard: float = -1e18

    @property
    def peer_id(self) -> int:
        return node_id_from_public_key(self.key)

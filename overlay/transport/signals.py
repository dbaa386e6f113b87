"""ICE signalling: the offers and answers that set up a link, as they travel in an XMPP hello or a routed SIGNAL
packet. Decoders raise overlay.wire.DecodeError on bad peer bytes and nothing else (tests/test_wire.py)."""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from overlay.wire import Contact, DecodeError, decode_contact

# --- link signalling: ICE offers and answers --------------------------------------------------------------
# A Signal travels in an XMPP hello (the first link of a joiner) or in a routed SIGNAL packet (every later
# link). It carries the sender's signed contact and, for ICE, the credentials and candidates of one link
# attempt (RFC 8445 section 5.3: ufrag, pwd and candidates are what an offer/answer exchange must carry).


class SignalType(enum.IntEnum):
    OFFER = 1  # "link to me": contact, and ICE parameters when the sender runs ICE
    ANSWER = 2  # the responder's contact and ICE parameters for the same attempt
    CANCEL = 3  # the attempt is over (linked another way, or given up): free its ICE state
    OFFER_RELAY = 4  # a second offer after host/srflx pairs failed, with TURN relays (where needed: transport/ice.py)


# In the type byte of an offer: the offering side takes a direct or ICE path only, never a tunnel through a
# neighbour (an on-demand link: a tunnel would still be relayed), and the answering side's call back must not end
# in one either (overlay/linksetup.py).
DIRECT_ONLY = 0x80


CANDIDATE_TYPES = ("host", "srflx", "prflx", "relay")
MAX_CANDIDATES = 16  # our choice: host addresses + one srflx per STUN server + one relay per TURN server
_ICE_CANDIDATE = struct.Struct("!BBHI")  # type, address length (4|16), port, priority
_SIGNAL_HEAD = struct.Struct("!BI")  # signal type, attempt number


@dataclass(frozen=True, slots=True)
class IceCandidate:
    type: str  # one of CANDIDATE_TYPES
    host: str
    port: int
    priority: int
    foundation: str  # 1-32 ice-chars (RFC 8445 section 5.1.1.3)


@dataclass(frozen=True, slots=True)
class IceParams:
    ufrag: str  # RFC 8445 section 5.3: 4-256 ice-chars; ours are 8
    pwd: str  # at least 22 ice-chars (128 bits)
    candidates: tuple[IceCandidate, ...]

    def encode(self) -> bytes:
        parts = [_short_text(self.ufrag), _short_text(self.pwd), bytes([len(self.candidates)])]
        for c in self.candidates:
            packed = ipaddress.ip_address(c.host).packed
            parts.append(_ICE_CANDIDATE.pack(CANDIDATE_TYPES.index(c.type), len(packed), c.port, c.priority))
            parts.append(packed + _short_text(c.foundation))
        return b"".join(parts)


def _short_text(text: str) -> bytes:
    raw = text.encode("ascii")
    if not 0 < len(raw) < 256:
        raise ValueError(f"{text!r} does not fit a one-byte length")
    return bytes([len(raw)]) + raw


_ICE_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def _read_text(data: bytes, at: int, what: str, lo: int, hi: int) -> tuple[str, int]:
    if at >= len(data):
        raise DecodeError(f"{what} missing")
    n = data[at]
    raw = data[at + 1 : at + 1 + n]
    if len(raw) != n or not lo <= n <= hi or not set(raw) <= _ICE_CHARS:
        raise DecodeError(f"{what} is not {lo}-{hi} ice-chars")
    return raw.decode("ascii"), at + 1 + n


def decode_ice_params(data: bytes) -> IceParams:
    ufrag, at = _read_text(data, 0, "ICE ufrag", 4, 64)
    pwd, at = _read_text(data, at, "ICE password", 22, 64)
    if at >= len(data):
        raise DecodeError("ICE candidate count missing")
    count = data[at]
    at += 1
    if count > MAX_CANDIDATES:
        raise DecodeError(f"{count} ICE candidates, at most {MAX_CANDIDATES}")
    candidates = []
    for _ in range(count):
        if len(data) < at + _ICE_CANDIDATE.size:
            raise DecodeError("ICE candidate truncated")
        ctype, alen, port, priority = _ICE_CANDIDATE.unpack_from(data, at)
        at += _ICE_CANDIDATE.size
        if ctype >= len(CANDIDATE_TYPES) or alen not in (4, 16) or len(data) < at + alen or port == 0:
            raise DecodeError("ICE candidate with a bad type, address or port")
        raw = data[at : at + alen]
        host = str(ipaddress.IPv4Address(raw) if alen == 4 else ipaddress.IPv6Address(raw))
        foundation, at = _read_text(data, at + alen, "ICE foundation", 1, 32)
        candidates.append(IceCandidate(CANDIDATE_TYPES[ctype], host, port, priority, foundation))
    if at != len(data):
        raise DecodeError("bytes after the ICE candidates")
    return IceParams(ufrag, pwd, tuple(candidates))


@dataclass(frozen=True, slots=True)
class Signal:
    type: SignalType
    attempt: int  # chosen by the offering side, echoed by the answer: one ICE session per attempt
    contact: Contact
    ice: IceParams | None = None
    direct_only: bool = False  # DIRECT_ONLY: the link this offer is for must not be a tunnel

    def encode(self) -> bytes:
        ice = self.ice.encode() if self.ice is not None else b""
        head = _SIGNAL_HEAD.pack(self.type | (DIRECT_ONLY if self.direct_only else 0), self.attempt)
        return head + self.contact.encode() + ice


def decode_signal(data: bytes) -> Signal:
    """A Signal; the contact's signature is checked by the caller (it needs the group name)."""
    if len(data) < _SIGNAL_HEAD.size:
        raise DecodeError("signal too short")
    stype, attempt = _SIGNAL_HEAD.unpack_from(data)
    try:
        kind = SignalType(stype & ~DIRECT_ONLY)
    except ValueError:
        raise DecodeError(f"unknown signal type {stype}") from None
    contact, rest = decode_contact(data[_SIGNAL_HEAD.size :])
    return Signal(kind, attempt, contact, decode_ice_params(rest) if rest else None, bool(stype & DIRECT_ONLY))


_SIGNAL_ROUTE = struct.Struct("!QQ")  # final destination, reply via (0: route replies to the sender itself)


def encode_routed_signal(final_dst: int, signal: Signal, reply_via: int = 0) -> bytes:
    """The body of a routed SIGNAL packet (and of an XMPP hello): `final_dst` is the member it is for; the
    packet's own destination may be a neighbour of it (a joiner is reachable only through the member it
    joined by). `reply_via`: a neighbour of the sender to route replies to, for a sender the ring may not
    route to yet."""
    return _SIGNAL_ROUTE.pack(final_dst, reply_via) + signal.encode()


def decode_routed_signal(body: bytes) -> tuple[int, int, bytes]:
    """(final destination, reply via or 0, the signal's bytes)."""
    if len(body) < _SIGNAL_ROUTE.size:
        raise DecodeError("routed signal without a destination")
    final, via = _SIGNAL_ROUTE.unpack_from(body)
    return int(final), int(via), body[_SIGNAL_ROUTE.size :]

"""A DNS responder for friends' names on the virtual NIC (RFC 1035): one query datagram in, one response out.

Names are `<user>.<domain>` and `<resource>.<user>.<domain>`; which address a name means is the caller's
business (`lookup`). Pure: no socket, no clock. The driver hands an IPv4 packet sent to the DNS address to
`answer_packet`, writes the reply packet to the TAP if there is one, and counts the outcome.

The query is peer-controlled bytes (any local process can send one). Whatever they are, `answer_query`
returns a `NameReply` and raises nothing: a header that parses gets an error response (FORMERR, NOTIMP), and
bytes that are not a query at all get no response.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from overlay.tap.frames import Bytes, FrameError, internet_checksum, ipv4_header, ipv4_packet

# --- From the specs ------------------------------------------------------------------------------------------
# RFC 1035 §4.1.1: ID, flags, QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT.
_HEADER = struct.Struct("!HHHHHH")
HEADER_LEN = 12
_QR = 0x8000
_OPCODE = 0x7800
_AA = 0x0400
_RD = 0x0100
OPCODE_QUERY = 0
RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
# RFC 1035 §3.2.2-3.2.4, RFC 3596 §2.1, RFC 6891 §6.1.1.
TYPE_A = 1
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_ANY = 255
CLASS_IN = 1
_QUESTION_TAIL = struct.Struct("!HH")  # QTYPE, QCLASS (RFC 1035 §4.1.2)
_RR_FIXED = struct.Struct("!HHIH")  # TYPE, CLASS, TTL, RDLENGTH after an RR's name (RFC 1035 §4.1.3)
_MAX_NAME = 255  # octets on the wire, length bytes and the root label included (RFC 1035 §2.3.4)
_MAX_LABEL = 63
# RFC 1035 §4.1.4: a length byte with both top bits set starts a 14-bit pointer. 0x40 and 0x80 are other label
# types, none of them in use (RFC 6891 §5 retired the only one defined).
_POINTER = 0xC0
# RFC 6891 §6.1.3: the OPT TTL holds the extended RCODE's upper 8 bits, the version, then flags; DO is the top
# flag (RFC 3225 §3).
RCODE_BADVERS = 16
EDNS_VERSION = 0
_EDNS_DO = 0x8000

# --- Our choices ---------------------------------------------------------------------------------------------
# A small TTL: a friend removed and a new one added can be handed the removed one's address, and a cached answer
# would then send traffic for the old name to the new device. The answer comes from the same host, so a
# resolver that asks again often loses microseconds; 5 s still absorbs the bursts in which one program resolves
# the same name several times. Negative answers carry no SOA, so resolvers do not cache them at all (RFC 2308
# §5), and a friend who comes online is found at once.
NAME_TTL = 5
# The UDP payload size we advertise in EDNS (DNS Flag Day 2020's 1232 bytes). Our responses are far smaller:
# one question and one A record stay under 300 bytes, inside RFC 1035's 512, so TC is never needed.
EDNS_UDP_PAYLOAD = 1232

# --- Outcomes, one per kind of reply: the keys a caller counts -----------------------------------------------
ANSWER = "answer"  # NOERROR with the A record
NO_DATA = "no-data"  # NOERROR, no record: a known name asked for another type, or the domain itself
NXDOMAIN = "nxdomain"  # a name under the domain that nobody has
REFUSED = "refused"  # a name outside the domain, or a class other than IN: not ours to answer
NOTIMP = "notimp"  # an opcode other than QUERY
FORMERR = "formerr"  # the header parses, the rest does not
BADVERS = "badvers"  # an EDNS version above 0 (RFC 6891 §6.1.3)
SHORT = "short"  # no response: shorter than a header
NOT_QUERY = "not-query"  # no response: a response (QR set); answering it could start a loop between responders


@dataclass(frozen=True, slots=True)
class NameReply:
    """The datagram to send back (None: send nothing) and the outcome to count."""

    response: bytes | None
    outcome: str


@dataclass(frozen=True, slots=True)
class _Edns:
    version: int
    dnssec_ok: bool


class _FormatError(Exception):
    """The header parsed, the rest of the query did not: answered with FORMERR."""


def _read_name(message: bytes, offset: int) -> tuple[list[bytes], int]:
    """The labels of the name at `offset`, and the offset just past it in the message (RFC 1035 §4.1.4).

    A pointer must point past the header and before the first byte of the run of labels that led to it, so
    targets strictly decrease and a loop is impossible (RFC 9267 §2 lists what goes wrong otherwise). Every
    honest encoder points back at a name it wrote earlier, which satisfies that.
    """
    labels: list[bytes] = []
    wire_size = 1  # the root label
    after: int | None = None
    limit = offset
    while True:
        if offset >= len(message):
            raise _FormatError(f"name runs past the end of a {len(message)}-byte message")
        length = message[offset]
        if length & _POINTER == _POINTER:
            if offset + 2 > len(message):
                raise _FormatError("compression pointer cut off at the end of the message")
            target = ((length & ~_POINTER) << 8) | message[offset + 1]
            if not HEADER_LEN <= target < limit:
                raise _FormatError(f"compression pointer at {offset} to {target} does not point back before {limit}")
            if after is None:
                after = offset + 2
            offset = limit = target
            continue
        if length & _POINTER:
            raise _FormatError(f"label type {length & _POINTER:#04x} at {offset} is not in use")
        offset += 1
        if length == 0:
            return labels, offset if after is None else after
        wire_size += length + 1
        if wire_size > _MAX_NAME or offset + length > len(message):
            raise _FormatError(f"name longer than {_MAX_NAME} bytes or past the end of the message")
        labels.append(message[offset : offset + length])
        offset += length


def _read_edns(message: bytes, offset: int, ancount: int, nscount: int, arcount: int) -> _Edns | None:
    """The query's EDNS OPT record (RFC 6891 §6.1.1), read past every record before it; None without one."""
    edns: _Edns | None = None
    for index in range(ancount + nscount + arcount):
        labels, offset = _read_name(message, offset)
        if offset + _RR_FIXED.size > len(message):
            raise _FormatError(f"record {index} is cut off")
        rtype, _, ttl, rdlength = _RR_FIXED.unpack_from(message, offset)
        offset += _RR_FIXED.size + rdlength
        if offset > len(message):
            raise _FormatError(f"record {index}'s data runs past the end of the message")
        if rtype == TYPE_OPT:
            # RFC 6891 §6.1.1: one OPT at most, in the additional section, owned by the root.
            if index < ancount + nscount or edns is not None or labels:
                raise _FormatError("OPT record outside the additional section, repeated, or not at the root")
            edns = _Edns(version=(ttl >> 16) & 0xFF, dnssec_ok=bool(ttl & _EDNS_DO))
    return edns


def _zone_labels(domain: str) -> list[bytes]:
    try:
        labels = domain.strip().rstrip(".").lower().encode("ascii").split(b".")
    except UnicodeEncodeError:
        labels = []
    if (
        not labels
        or not all(0 < len(label) <= _MAX_LABEL for label in labels)
        or sum(len(x) + 1 for x in labels) + 1 > _MAX_NAME
    ):
        raise ValueError(f"domain {domain!r} is not a DNS name like 'social.example' (labels of 1..63 bytes)")
    return labels


def _message(ident: int, flags: int, question: bytes = b"", answer: bytes = b"", opt: bytes = b"") -> bytes:
    counts = (1 if question else 0, 1 if answer else 0, 0, 1 if opt else 0)
    return _HEADER.pack(ident, _QR | flags, *counts) + question + answer + opt


def _opt_record(edns: _Edns, rcode: int) -> bytes:
    """Our OPT record (RFC 6891 §6.1.2): root owner, our payload size, the extended RCODE's upper bits, version
    0, and the query's DO bit copied (RFC 3225 §3)."""
    ttl = ((rcode >> 4) << 24) | (EDNS_VERSION << 16) | (_EDNS_DO if edns.dnssec_ok else 0)
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, EDNS_UDP_PAYLOAD, ttl, 0)


def answer_query(query: Bytes, domain: str, lookup: Callable[[str], int | None], ttl: int = NAME_TTL) -> NameReply:
    """Answer one DNS query datagram for the names under `domain`.

    `lookup` gets a name under `domain` in lower case without the final dot ("laptop.alice.social") and returns
    its IPv4 address as an integer, or None; a mapping's `get` will do. Names are compared case-insensitively
    in ASCII only (RFC 4343); the question goes back with the asker's case, as resolvers that randomise
    case to resist spoofing check it.
    - A (or ANY) for a known name: NOERROR with one A record, authoritative, TTL `ttl`.
    - Another type (AAAA, MX, ...) for a known name, or any type for `domain` itself: NOERROR, no record.
    - An unknown name under `domain`: NXDOMAIN. A name outside it, or a class other than IN: REFUSED.
    - An opcode other than QUERY: NOTIMP. QDCOUNT other than 1, a bad name (loop, pointer out of range,
      too long, unused label type), a section cut short, or a misplaced or repeated OPT: FORMERR.
    - EDNS (RFC 6891): a query with an OPT record gets one back; a version above 0 gets BADVERS.
    - Shorter than a header, or a response rather than a query: no response.
    """
    if not 0 <= ttl <= 0x7FFFFFFF:
        raise ValueError(f"TTL {ttl} is outside 0..2**31-1 seconds (RFC 2181 §8)")
    zone = _zone_labels(domain)
    message = bytes(query)
    if len(message) < HEADER_LEN:
        return NameReply(None, SHORT)
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(message)
    if flags & _QR:
        return NameReply(None, NOT_QUERY)
    echoed = flags & (_OPCODE | _RD)  # RFC 1035 §4.1.1: the opcode and RD are copied into the response
    if flags & _OPCODE != OPCODE_QUERY << 11:
        return NameReply(_message(ident, echoed | RCODE_NOTIMP), NOTIMP)
    try:
        if qdcount != 1:
            # RFC 9619: a QUERY carries exactly one question.
            raise _FormatError(f"QDCOUNT {qdcount} is not 1")
        labels, offset = _read_name(message, HEADER_LEN)
        if offset + _QUESTION_TAIL.size > len(message):
            raise _FormatError("question is cut off before its type and class")
        qtype, qclass = _QUESTION_TAIL.unpack_from(message, offset)
        edns = _read_edns(message, offset + _QUESTION_TAIL.size, ancount, nscount, arcount)
    except _FormatError:
        return NameReply(_message(ident, echoed | RCODE_FORMERR), FORMERR)

    question = b"".join(bytes((len(label),)) + label for label in labels) + b"\x00" + _QUESTION_TAIL.pack(qtype, qclass)
    if edns is not None and edns.version != EDNS_VERSION:
        return NameReply(_message(ident, echoed, question, opt=_opt_record(edns, RCODE_BADVERS)), BADVERS)

    def reply(rcode: int, outcome: str, answer: bytes = b"", authoritative: bool = True) -> NameReply:
        opt = b"" if edns is None else _opt_record(edns, rcode)
        reply_flags = echoed | (_AA if authoritative else 0) | (rcode & 0x0F)
        return NameReply(_message(ident, reply_flags, question, answer, opt), outcome)

    folded = [label.lower() for label in labels]  # bytes.lower changes A-Z only: RFC 4343
    if qclass != CLASS_IN or len(folded) < len(zone) or folded[-len(zone) :] != zone:
        return reply(RCODE_REFUSED, REFUSED, authoritative=False)
    if len(folded) == len(zone):
        return reply(RCODE_NOERROR, NO_DATA)
    address = None
    # A label holding a dot or a non-ASCII byte cannot be written as the text `lookup` takes: no such name.
    if all(label.isascii() and b"." not in label for label in folded):
        address = lookup(b".".join(folded).decode("ascii"))
    if address is None:
        return reply(RCODE_NXDOMAIN, NXDOMAIN)
    if not 0 <= address <= 0xFFFFFFFF:
        raise ValueError(f"lookup returned {address} for {b'.'.join(folded)!r}, not an IPv4 address")
    if qtype not in (TYPE_A, TYPE_ANY):  # ANY gets the one record there is (RFC 8482 allows a subset anyway)
        return reply(RCODE_NOERROR, NO_DATA)
    # The owner name is a pointer to the question's name, which starts right after the header.
    answer = struct.pack("!HHHIHI", _POINTER << 8 | HEADER_LEN, TYPE_A, CLASS_IN, ttl, 4, address)
    return reply(RCODE_NOERROR, ANSWER, answer)


# --- The packets around it -----------------------------------------------------------------------------------
DNS_PORT = 53
DNS_TTL = 64  # our choice: the IP TTL of DNS answers the node makes (Linux's default ip_default_ttl)
_UDP = struct.Struct("!HHHH")


def answer_packet(packet: bytes, domain: str, lookup: Callable[[str], int | None]) -> tuple[str | None, bytes | None]:
    """An IPv4 packet our kernel sent to the DNS address: (what to count, the reply packet to write back).
    A packet that is not IPv4 counts nothing; one that is not UDP to port 53 counts "drop: not DNS"."""
    try:
        src, dst, header_len, total_len = ipv4_header(packet)
    except FrameError:
        return None, None
    if packet[9] != 17 or total_len < header_len + _UDP.size:
        return "drop: not DNS", None
    sport, dport, _, _ = _UDP.unpack_from(packet, header_len)
    if dport != DNS_PORT:
        return "drop: not DNS", None
    reply = answer_query(packet[header_len + _UDP.size : total_len], domain, lookup)
    response = None if reply.response is None else udp_packet(dst, src, DNS_PORT, sport, reply.response)
    return f"dns {reply.outcome}", response


def udp_packet(src: int, dst: int, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet with both checksums (RFC 791, RFC 768)."""
    length = _UDP.size + len(payload)
    pseudo = struct.pack("!IIBBH", src, dst, 0, 17, length)
    udp = _UDP.pack(sport, dport, length, 0) + payload
    checksum = internet_checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", checksum) + udp[8:]
    return ipv4_packet(src, dst, 17, DNS_TTL, udp)

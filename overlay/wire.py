"""Wire format: the byte layouts of links and routing, and the one error that bad peer bytes raise.

Three layers, outermost first:
1. Link packets (UDP payloads): handshake initiation/response and encrypted transport packets. The first byte
   is >= 0x80 so no packet can parse as STUN (RFC 8489 section 5: the two most significant bits of a STUN
   message are zero), which lets ICE share the socket.
2. Link messages (the plaintext of a transport packet): keepalive, neighbour lists, relaying, routed packets.
3. Routed packets: a header (TTL, flags, source, destination, watermark) and a kind-specific body.
Two bodies live with what they serve: address records (the DHT's values) in overlay/dht/records.py, ICE offers
and answers in overlay/transport/signals.py.

Decoders take peer bytes and either return a value or raise `DecodeError`; nothing else escapes them
(tests/test_wire.py fuzzes each one).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass


class DecodeError(ValueError):
    """Peer bytes that do not parse. The receiver counts and drops the packet; its state is unchanged."""


# --- link packets -----------------------------------------------------------------------------------------


class PacketType(enum.IntEnum):
    HANDSHAKE_INIT = 0x81
    HANDSHAKE_RESP = 0x82
    TRANSPORT = 0x83
    # A routed packet whose body is sealed end to end (overlay/e2e.py): the link encrypts only the routed header
    # and binds the body through its end-to-end tag, so a relay never touches the body's bytes with a cipher.
    SEALED = 0x84
    # A part of a datagram bigger than one path MTU (overlay/transport/chunks.py): the underlay joins the parts
    # back into the link packet before anything else sees it.
    CHUNK = 0x85
    # A link packet of a tunnel (RELAY/RELAYED): as SEALED, the link encrypts only the 9-byte relay head and
    # binds the tunnel's own transport packet through its tag, so the relay runs no cipher over the data and
    # the ends one each. Sent only to a neighbour whose HELLO carried HELLO_TUNNEL.
    TUNNEL = 0x86
    # "No session of mine has that index" (type, index: 5 bytes), sent back unauthenticated to where a
    # transport, sealed or tunnel packet for an unknown index came from (a tunnel's through its relay): a peer
    # still sending to our former process (we restarted) handshakes again at once instead of losing packets
    # until its keepalives fail (3 s on a busy link, 19 s on an idle one). It only ever costs a handshake: the
    # receiver acts on it only for the index of the session it sends on, on the path that session uses.
    UNKNOWN_SESSION = 0x87


SIGNATURE_LEN = 64
KEY_LEN = 32
AEAD_TAG_LEN = 16

# Handshake packets carry Noise IK messages (overlay/transport/session.py): the initiation is the type byte and
# message 1 (e, s, payload: 32 + 48 + at least 16 bytes); the response is the type byte, the index of the
# initiation it answers (so the initiator finds its state) and message 2 (e, payload: 32 + at least 16 bytes).
# Both fit one unfragmented datagram: 1,200 bytes leaves room for a certificate with a long JID.
MAX_HANDSHAKE_LEN = 1200
_MIN_INIT = 1 + 32 + 48 + 16
_RESP_HEAD = struct.Struct("!BI")  # type, receiver index
_MIN_RESP = _RESP_HEAD.size + 32 + 16
TRANSPORT_HEADER = struct.Struct("!BIQ")  # type, receiver index, counter; the AEAD's associated data
# SEALED: TRANSPORT_HEADER (type 0x84) | link AEAD of the routed header (29 + 16 bytes) | end-to-end packet.
# The end-to-end packet is a transport packet of the pair's own session (type 0x83, the receiver's end-to-end
# index, counter, AEAD(kind byte + data body)), its last 16 bytes the tag.
MIN_E2E = TRANSPORT_HEADER.size + 1 + AEAD_TAG_LEN  # the smallest end-to-end packet: kind byte only
# TUNNEL: TRANSPORT_HEADER (type 0x86) | link AEAD of the relay head (RELAY or RELAYED, peer: 9 + 16 bytes) with
# the inner packet's tag as more associated data | the inner packet: a transport packet (0x83) of the tunnel's
# own session, at least MIN_E2E bytes. What a relay learns is what it learnt from RELAY: who talks to whom.
RELAY_HEAD = 9
TUNNEL_LINK_PART = RELAY_HEAD + AEAD_TAG_LEN


@dataclass(frozen=True, slots=True)
class HandshakeInit:
    message: bytes  # Noise message 1

    def encode(self) -> bytes:
        return bytes([PacketType.HANDSHAKE_INIT]) + self.message


@dataclass(frozen=True, slots=True)
class HandshakeResp:
    receiver_index: int  # the initiator's index, from its (encrypted) initiation payload
    message: bytes  # Noise message 2

    def encode(self) -> bytes:
        return _RESP_HEAD.pack(PacketType.HANDSHAKE_RESP, self.receiver_index) + self.message


def decode_handshake(data: bytes) -> HandshakeInit | HandshakeResp:
    if not data:
        raise DecodeError("empty packet")
    if len(data) > MAX_HANDSHAKE_LEN:
        raise DecodeError(f"handshake packet of {len(data)} bytes, at most {MAX_HANDSHAKE_LEN}")
    if data[0] == PacketType.HANDSHAKE_INIT:
        if len(data) < _MIN_INIT:
            raise DecodeError(f"handshake initiation of {len(data)} bytes, at least {_MIN_INIT}")
        return HandshakeInit(bytes(data[1:]))
    if data[0] == PacketType.HANDSHAKE_RESP:
        if len(data) < _MIN_RESP:
            raise DecodeError(f"handshake response of {len(data)} bytes, at least {_MIN_RESP}")
        _, ridx = _RESP_HEAD.unpack_from(data)
        return HandshakeResp(ridx, bytes(data[_RESP_HEAD.size :]))
    raise DecodeError(f"not a handshake packet (type 0x{data[0]:02x})")


UNKNOWN_SESSION = struct.Struct("!BI")  # type, the receiver index nobody holds


def encode_unknown_session(index: int) -> bytes:
    return UNKNOWN_SESSION.pack(PacketType.UNKNOWN_SESSION, index)


def decode_unknown_session(data: bytes | memoryview) -> int:
    """The index of an UNKNOWN_SESSION notice."""
    if len(data) != UNKNOWN_SESSION.size or data[0] != PacketType.UNKNOWN_SESSION:
        raise DecodeError(f"unknown-session notice of {len(data)} bytes")
    return int(UNKNOWN_SESSION.unpack_from(data)[1])


def decode_transport_header(data: bytes | memoryview) -> tuple[int, int]:
    """(receiver index, counter) of a transport, sealed or tunnel packet; the rest is ciphertext with its tag."""
    if len(data) < TRANSPORT_HEADER.size + AEAD_TAG_LEN:
        raise DecodeError(f"transport packet of {len(data)} bytes is too short")
    ptype, idx, counter = TRANSPORT_HEADER.unpack_from(data)
    if ptype == PacketType.SEALED:
        if len(data) < TRANSPORT_HEADER.size + SEALED_LINK_PART + MIN_E2E:
            raise DecodeError(f"sealed packet of {len(data)} bytes is too short")
    elif ptype == PacketType.TUNNEL:
        if len(data) < TRANSPORT_HEADER.size + TUNNEL_LINK_PART + MIN_E2E:
            raise DecodeError(f"tunnel packet of {len(data)} bytes is too short")
        if data[TRANSPORT_HEADER.size + TUNNEL_LINK_PART] != PacketType.TRANSPORT:
            raise DecodeError("tunnel packet around something other than a transport packet")
    elif ptype != PacketType.TRANSPORT:
        raise DecodeError(f"not a transport packet (type 0x{ptype:02x})")
    return idx, counter


# --- link messages ----------------------------------------------------------------------------------------


class LinkMsg(enum.IntEnum):
    PING = 0x01  # token(8): the peer echoes it in a PONG; RTT and liveness
    PONG = 0x02
    NEIGHBOURS = 0x03  # count(1), node IDs(8 each), overlay(8), beacon sequence(4): gossip
    ROUTED = 0x04  # routed header + body
    RELAY = 0x05  # peer(8), link packet: "send this to peer" (a tunnel through us)
    RELAYED = 0x06  # peer(8), link packet: "peer sent you this through me"
    CLOSE = 0x07  # the peer closes the link on purpose (no failure to repair around... yet)
    REPLICATE = 0x08  # an address record to hold as a replica
    HELLO = 0x09  # flags(1), the sender's signed contact; flags = maintenance USE_* | HELLO_TUNNEL | HELLO_LANES
    ANCHOR = 0x0A  # "please become an anchor": an anchor that sees too few anchors in the room recruits one
    PROBE = 0x0B  # token(8), zero padding to PROBE_SIZE: "does a datagram this big reach you?" (IP fragments)
    PROBE_ACK = 0x0C  # token(8) of the PROBE that arrived
    BEACON = 0x0D  # overlay(8), sequence(4): a newer beacon of the sender's overlay (overlay/beacon.py)
    SUSPECT = 0x0E  # peer(8): "my link to this node died": check yours at once (SWIM's suspicion, by gossip)
    ACK = 0x0F  # no body: "your routed control packet arrived" (the sender watches the link until it hears back)
    REVOKE = 0x10  # a list of signed revocations (overlay/trust/revocations.py): flooded, each node passes news on
    # Between SocialVPN friends (overlay/social/node.py), who link directly and forward nothing:
    DATA = 0x11  # an IPv4 packet, already in the receiver's view of the addresses (overlay/social/translate.py)
    PLACES = 0x12  # the sender's own address (4), where the sender placed the receiver in its subnet (4)
    # The answer to ANCHOR when the receiver will not become one now (an anchor already, in a visit to the room,
    # or asked moments ago): no body. The recruiter asks another neighbour at once instead of a RECRUIT_INTERVAL
    # later. Nodes from before it count it as an unknown message, and their recruiter waits as before.
    ANCHOR_REFUSED = 0x13
    # Between SocialVPN friends: DATA with the virtio_net_hdr of its offload work in front (a TCP super-frame, or a
    # checksum left to complete; overlay/social/offload.py). Sent only to a friend that answered our PROBE: a node
    # from before it drops the PROBE as an unknown message and gets DATA.
    DATA_GSO = 0x14


# In HELLO's flags byte, beside what the sender uses the link for: it opens and passes on TUNNEL packets. A
# capability rather than a use: nodes from before TUNNEL ignore the bit and are sent RELAY messages as before.
HELLO_TUNNEL = 0x80
# ... and it keeps a replay window per counter lane (overlay/_keys.h, LANES), so each of our Engines may send to
# it in its own lane. Nodes from before lanes ignore the bit and are sent lane 0 only, as Python sends.
HELLO_LANES = 0x40


MAX_NEIGHBOURS = 64
_TOKEN = struct.Struct("!Q")
_PEER = struct.Struct("!Q")


def encode_ping(kind: LinkMsg, token: int) -> bytes:
    return bytes([kind]) + _TOKEN.pack(token)


# A PROBE is as big as the biggest super-frame datagram (overlay/tap/device.py GSO_MAX_SIZE, 60,000 bytes, plus
# our headers): it arrives only where IP fragments pass and where every hop takes a datagram that big. An 8,000-
# byte probe passed through coturn while 60 KB datagrams did not, and TCP over TURN ran at 5 Mbit/s
# (bench/nat_links.py). Sent once when a link comes up, and once a minute until it is answered.
PROBE_SIZE = 60_256


def encode_probe(token: int) -> bytes:
    return encode_ping(LinkMsg.PROBE, token).ljust(PROBE_SIZE, b"\x00")


def decode_probe(data: bytes | memoryview) -> int:
    """The token of a PROBE; its padding is ignored (a smaller probe only proves less to its sender)."""
    if len(data) < 1 + _TOKEN.size:
        raise DecodeError(f"probe of {len(data)} bytes has no token")
    return int(_TOKEN.unpack_from(data, 1)[0])


_BEACON = struct.Struct("!QI")  # overlay ID, beacon sequence


def encode_neighbours(ids: list[int], overlay: int = 0, seq: int = 0) -> bytes:
    ids = ids[:MAX_NEIGHBOURS]
    return bytes([LinkMsg.NEIGHBOURS, len(ids)]) + b"".join(_PEER.pack(i) for i in ids) + _BEACON.pack(overlay, seq)


def decode_neighbours(data: bytes | memoryview) -> tuple[list[int], int, int]:
    """Neighbour IDs, and the sender's overlay and beacon sequence."""
    if len(data) < 2:
        raise DecodeError("neighbour list without a count")
    count = data[1]
    end = 2 + 8 * count
    if count > MAX_NEIGHBOURS or len(data) != end + _BEACON.size:
        raise DecodeError(f"neighbour list of {len(data)} bytes does not hold {count} IDs and a beacon")
    overlay, seq = _BEACON.unpack_from(data, end)
    return _decode_ids(data, 2, count), int(overlay), int(seq)


def _decode_ids(data: bytes | memoryview, at: int, count: int) -> list[int]:
    return [int.from_bytes(data[at + 8 * i : at + 8 + 8 * i], "big") for i in range(count)]


def encode_beacon(overlay: int, seq: int) -> bytes:
    return bytes([LinkMsg.BEACON]) + _BEACON.pack(overlay, seq)


def decode_beacon(data: bytes | memoryview) -> tuple[int, int]:
    if len(data) != 1 + _BEACON.size:
        raise DecodeError(f"beacon of {len(data)} bytes")
    overlay, seq = _BEACON.unpack_from(data, 1)
    return int(overlay), int(seq)


def relay_head(kind: LinkMsg, peer: int) -> bytes:
    """RELAY or RELAYED and the peer: a relay message's first RELAY_HEAD bytes, or a TUNNEL packet's head."""
    return bytes([kind]) + _PEER.pack(peer)


def encode_relay(kind: LinkMsg, peer: int, packet: bytes) -> bytes:
    return relay_head(kind, peer) + packet


def encode_suspect(peer: int) -> bytes:
    return bytes([LinkMsg.SUSPECT]) + _PEER.pack(peer)


def decode_suspect(data: bytes | memoryview) -> int:
    if len(data) != 1 + _PEER.size:
        raise DecodeError(f"suspect message of {len(data)} bytes")
    return int(_PEER.unpack_from(data, 1)[0])


def decode_relay(data: bytes | memoryview) -> tuple[int, bytes]:
    if len(data) < 10:
        raise DecodeError("relay message too short")
    return _PEER.unpack_from(data, 1)[0], bytes(data[9:])


def decode_token(data: bytes | memoryview) -> int:
    if len(data) != 9:
        raise DecodeError(f"ping/pong of {len(data)} bytes, expected 9")
    return int(_TOKEN.unpack_from(data, 1)[0])


# --- routed packets ---------------------------------------------------------------------------------------


class Kind(enum.IntEnum):
    DATA = 0x01  # an IPv4 packet for the destination node
    LINK_REQUEST = 0x02  # contact [, first hop (8)]: "link to me" (ring repair); the receiver calls back
    FIND = 0x03  # contact: "who is closest to this key?" (join, long links); flags say if a long link is wanted
    FOUND = 0x04  # contact + neighbour IDs of the node closest to the key
    DHT_PUT = 0x05  # address record, routed to the key's closest node
    DHT_GET = 0x06  # virtual IPv4 (4) or IPv6 (16), routed to the key's closest node
    DHT_VALUE = 0x07  # virtual IPv4 (4), then an address record or nothing
    NO_ROUTE = 0x08  # destination (8), kind (1): the exact destination does not exist
    DATA_GSO = 0x09  # virtio_net_hdr (10, overlay/tap/frames.py) + IPv4 packet, up to a 64 KB TCP super-frame
    SIGNAL = 0x0A  # final destination (8) + Signal: link set-up (ICE offer/answer) between two members
    CERT = 0x0B  # a certificate request or answer (overlay/trust/issuer.py): renewal through the overlay
    SEALED = 0x0C  # an end-to-end packet (a transport packet of the pair's session): data between members not linked
    E2E = 0x0D  # kind (1) + handshake packet or notice: sets up the end-to-end session (overlay/e2e.py)
    GRAPH_GET = 0x0E  # token (4): "your links, please" (overlay/graph.py, `ipop-overlay graph`)
    GRAPH = 0x0F  # token (4), address (4), links: the answer
    # Virtual IPv6 (16), then an IPv6 address record or nothing: a kind of its own, as a DHT_VALUE's parts are
    # told apart by the address's length, and 4 + record and 16 + record cannot be told apart by length.
    DHT_VALUE6 = 0x10


FLAG_EXACT = 0x01  # deliver only at the node whose ID is the destination (else: at the closest node)
FLAG_LONG_LINK = 0x02  # FIND: the sender wants the found node as a long link (counted against its cap)
FLAG_REFUSED = 0x04  # FOUND: the found node's incoming long-link cap is full
FLAG_JOIN = 0x08  # FIND: route to the node nearest the key other than the sender (a joining node's own ID)
# DHT_GET: passed on to the other replicas by a key's root that holds no record (it restarted or just joined):
# answer it, never pass it on again.
FLAG_PASSED = 0x04
FLAG_PROMISE = 0x10  # the watermark is a promise (routing.forwarding.decide_promise), not the sender's distance
PROMISE_HOPS_SHIFT = 5  # bits 5-6: the promise's hop count (0..3)
PROMISE_HOPS_MASK = 0x60
# Background traffic (an owner's periodic check of its own record, and the answer): hops neither watch their
# link for an answer nor acknowledge it (LinkMsg.ACK); a lost one is sent again at the next check. An idle
# node's checks were a third of its packets with acknowledgements (bench/scale.py).
FLAG_QUIET = 0x80

ROUTED_HEADER = struct.Struct("!BBBQQQB")  # LinkMsg.ROUTED, ttl, flags, src, dst, watermark, kind
SEALED_LINK_PART = ROUTED_HEADER.size + AEAD_TAG_LEN  # a SEALED link packet's encrypted routed header


@dataclass(frozen=True, slots=True)
class Routed:
    ttl: int
    flags: int
    src: int
    dst: int
    watermark: int
    kind: Kind
    body: bytes

    @property
    def exact(self) -> bool:
        return bool(self.flags & FLAG_EXACT)

    def encode(self) -> bytes:
        return (
            ROUTED_HEADER.pack(LinkMsg.ROUTED, self.ttl, self.flags, self.src, self.dst, self.watermark, self.kind)
            + self.body
        )


def decode_routed(data: bytes | memoryview) -> Routed:
    if len(data) < ROUTED_HEADER.size:
        raise DecodeError(f"routed packet of {len(data)} bytes is shorter than its header")
    _, ttl, flags, src, dst, wm, kind = ROUTED_HEADER.unpack_from(data)
    try:
        k = Kind(kind)
    except ValueError:
        raise DecodeError(f"unknown routed kind 0x{kind:02x}") from None
    return Routed(ttl, flags, src, dst, wm, k, bytes(data[ROUTED_HEADER.size :]))


def reroute(packet: Routed, ttl: int, watermark: int) -> bytes:
    """The same packet for the next hop: only TTL and watermark change."""
    return (
        ROUTED_HEADER.pack(LinkMsg.ROUTED, ttl, packet.flags, packet.src, packet.dst, watermark, packet.kind)
        + packet.body
    )


_NO_ROUTE = struct.Struct("!QB")


def encode_no_route(dst: int, kind: Kind) -> bytes:
    return _NO_ROUTE.pack(dst, kind)


def decode_no_route(body: bytes) -> tuple[int, int]:
    if len(body) != _NO_ROUTE.size:
        raise DecodeError("malformed no-route report")
    dst, kind = _NO_ROUTE.unpack(body)
    return int(dst), int(kind)


# --- contacts: who a node is and where to reach it -------------------------------------------------------

Endpoint = tuple[str, int]
_CONTACT_HEAD = struct.Struct("!B32s4sHB")  # version, public key, virtual IPv4, port, address length (4|16)
_CONTACT_TAIL = struct.Struct("!Q64s")  # timestamp (ms), signature
CONTACT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Contact:
    """A node's signed self-description: its key, virtual address and underlay endpoint.

    Signed over the group name too, so a contact from one group cannot be replayed into another.
    """

    public_key: bytes
    address: str  # virtual IPv4
    endpoint: Endpoint
    timestamp_ms: int
    signature: bytes = bytes(SIGNATURE_LEN)

    def _head(self) -> bytes:
        ip = ipaddress.ip_address(self.endpoint[0])
        packed = ip.packed
        return (
            _CONTACT_HEAD.pack(
                CONTACT_VERSION,
                self.public_key,
                ipaddress.IPv4Address(self.address).packed,
                self.endpoint[1],
                len(packed),
            )
            + packed
        )

    def signed_part(self, room: str) -> bytes:
        return (
            b"ipop-overlay contact v1\x00"
            + room.encode()
            + b"\x00"
            + self._head()
            + struct.pack("!Q", self.timestamp_ms)
        )

    def encode(self) -> bytes:
        return self._head() + _CONTACT_TAIL.pack(self.timestamp_ms, self.signature)


def decode_contact(data: bytes) -> tuple[Contact, bytes]:
    """A contact and the bytes after it."""
    if len(data) < _CONTACT_HEAD.size:
        raise DecodeError("contact too short")
    version, pk, vip, port, alen = _CONTACT_HEAD.unpack_from(data)
    if version != CONTACT_VERSION:
        raise DecodeError(f"contact version {version}, expected {CONTACT_VERSION}")
    if alen not in (4, 16):
        raise DecodeError(f"contact address length {alen}")
    end = _CONTACT_HEAD.size + alen + _CONTACT_TAIL.size
    if len(data) < end:
        raise DecodeError("contact truncated")
    addr = bytes(data[_CONTACT_HEAD.size : _CONTACT_HEAD.size + alen])
    ts, sig = _CONTACT_TAIL.unpack_from(data, _CONTACT_HEAD.size + alen)
    host = str(ipaddress.IPv4Address(addr) if alen == 4 else ipaddress.IPv6Address(addr))
    contact = Contact(pk, str(ipaddress.IPv4Address(vip)), (host, port), ts, sig)
    return contact, bytes(data[end:])


def encode_found(contact: Contact, neighbours: list[int]) -> bytes:
    neighbours = neighbours[:MAX_NEIGHBOURS]
    return contact.encode() + bytes([len(neighbours)]) + b"".join(_PEER.pack(i) for i in neighbours)


def decode_found(body: bytes) -> tuple[Contact, list[int]]:
    contact, rest = decode_contact(body)
    if not rest or rest[0] > MAX_NEIGHBOURS or len(rest) != 1 + 8 * rest[0]:
        raise DecodeError("FOUND neighbour list malformed")
    return contact, _decode_ids(rest, 1, rest[0])


def encode_link_request(contact: Contact, via: int | None) -> bytes:
    """ "Link to me": our contact, and the neighbour the request leaves through, for signals back to us."""
    return contact.encode() + (_PEER.pack(via) if via is not None else b"")


def decode_link_request(body: bytes) -> tuple[Contact, int | None]:
    contact, rest = decode_contact(body)
    if rest and len(rest) != _PEER.size:
        raise DecodeError("link request with trailing bytes")
    return contact, (int(_PEER.unpack(rest)[0]) if rest else None)


def encode_find(seq: int, contact: Contact, via: int | None = None) -> bytes:
    """A FIND: request number, the sender's contact, and for a join the member the sender is reachable
    through while it has no other link (the FIND's first hop, or the anchor that introduced it)."""
    return seq.to_bytes(4, "big") + contact.encode() + (_PEER.pack(via) if via is not None else b"")


def decode_find(body: bytes) -> tuple[int, Contact, int | None]:
    if len(body) < 4:
        raise DecodeError("FIND without a request number")
    contact, rest = decode_contact(body[4:])
    if rest and len(rest) != _PEER.size:
        raise DecodeError("FIND with trailing bytes")
    via = int(_PEER.unpack(rest)[0]) if rest else None
    return int.from_bytes(body[:4], "big"), contact, via

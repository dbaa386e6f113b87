"""Signing and checking address records: a record is valid only with its owner's signature over the group."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from overlay.identity import Identity, verify
from overlay.ids import dht_key, node_id_from_public_key
from overlay.wire import SIGNATURE_LEN, DecodeError, Kind

# --- the wire format of address records (the DHT's values) -----------------------------------------------------

_RECORD = struct.Struct("!B4s32sQQ64s")  # version, virtual IPv4, public key, issued (ms), expires (ms), signature
_RECORD6 = struct.Struct("!B16s32sQQ64s")  # the same for a virtual IPv6 address
RECORD_VERSION = 2
RECORD6_VERSION = 3  # the version byte names the address family, so the signed bytes do too
RECORD_SIZE = _RECORD.size  # without the credential
_CRED_LEN = struct.Struct("!H")
# The credential is the signer's group certificate (overlay/trust/certs.py, ~200 bytes); a holder refuses a
# record whose certificate does not give the signer that address.
MAX_CREDENTIAL = 1024


def _packed_address(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


@dataclass(frozen=True, slots=True)
class AddressRecord:
    """ "Virtual IP -> node": which node key answers for a virtual address (IPv4 or IPv6), until when, signed
    by that key, with the certificate that gives the key the address (empty in a group without certificates)."""

    address: str
    public_key: bytes
    issued_ms: int
    expires_ms: int
    signature: bytes = bytes(SIGNATURE_LEN)
    credential: bytes = b""

    def signed_part(self, room: str) -> bytes:
        return b"ipop-overlay record v2\x00" + room.encode() + b"\x00" + self._fixed()[:-SIGNATURE_LEN]

    def _fixed(self) -> bytes:
        packed = _packed_address(self.address)
        layout, version = (_RECORD, RECORD_VERSION) if len(packed) == 4 else (_RECORD6, RECORD6_VERSION)
        return layout.pack(version, packed, self.public_key, self.issued_ms, self.expires_ms, self.signature)

    def encode(self) -> bytes:
        return self._fixed() + _CRED_LEN.pack(len(self.credential)) + self.credential


def decode_record(data: bytes | memoryview) -> AddressRecord:
    data = bytes(data)
    if not data:
        raise DecodeError("empty address record")
    if data[0] == RECORD_VERSION:
        layout = _RECORD
    elif data[0] == RECORD6_VERSION:
        layout = _RECORD6
    else:
        raise DecodeError(f"address record version {data[0]}, expected {RECORD_VERSION} or {RECORD6_VERSION}")
    size = layout.size
    if len(data) < size + _CRED_LEN.size:
        raise DecodeError(f"address record of {len(data)} bytes, at least {size + _CRED_LEN.size}")
    _, vip, pk, issued, expires, sig = layout.unpack_from(data)
    if expires < issued:
        raise DecodeError("address record expires before it is issued")
    (clen,) = _CRED_LEN.unpack_from(data, size)
    if clen > MAX_CREDENTIAL or len(data) != size + _CRED_LEN.size + clen:
        raise DecodeError(f"address record of {len(data)} bytes does not hold its {clen}-byte credential")
    return AddressRecord(str(ipaddress.ip_address(vip)), pk, issued, expires, sig, data[size + _CRED_LEN.size :])


def value_kind(address: str) -> Kind:
    """The routed kind that answers a DHT_GET for `address` (Kind.DHT_VALUE6 says why there are two)."""
    return Kind.DHT_VALUE if ipaddress.ip_address(address).version == 4 else Kind.DHT_VALUE6


def encode_dht_value(address: str, record: AddressRecord | None) -> bytes:
    return _packed_address(address) + (record.encode() if record else b"")


def decode_dht_value(body: bytes, kind: int = Kind.DHT_VALUE) -> tuple[str, AddressRecord | None]:
    """A DHT_VALUE (IPv4) or DHT_VALUE6 body: the address asked for and its record, if any."""
    size = 16 if kind == Kind.DHT_VALUE6 else 4
    if len(body) < size:
        raise DecodeError(f"DHT value of {len(body)} bytes")
    address = str(ipaddress.ip_address(bytes(body[:size])))
    record = decode_record(body[size:]) if len(body) > size else None
    if record is not None and ipaddress.ip_address(record.address).version != ipaddress.ip_address(address).version:
        raise DecodeError(f"DHT value for {address} holds a record for {record.address}")
    return address, record


def decode_address(body: bytes) -> str:
    if len(body) not in (4, 16):
        raise DecodeError(f"virtual address of {len(body)} bytes")
    return str(ipaddress.ip_address(bytes(body)))


# Our choices: a record lives 10 minutes and its owner republishes at half-life, so a departed node's address
# stops resolving within 10 minutes even if nobody notices it leave; lookups never see a gap while it lives.
RECORD_TTL = 600.0
REFRESH_AFTER = RECORD_TTL / 2
# A record issued further in the future than this is refused (clock skew allowance between machines).
MAX_CLOCK_SKEW = 120.0


def make_record(
    identity: Identity, room: str, address: str, now: float, ttl: float = RECORD_TTL, credential: bytes = b""
) -> AddressRecord:
    """Our record for `address`, carrying `credential` (our group certificate) for holders to check."""
    unsigned = AddressRecord(address, identity.public_key, int(now * 1000), int((now + ttl) * 1000))
    sig = identity.sign(unsigned.signed_part(room))
    return AddressRecord(address, identity.public_key, unsigned.issued_ms, unsigned.expires_ms, sig, credential)


def record_key(room: str, address: str) -> int:
    return dht_key(room, address)


def record_owner(record: AddressRecord) -> int:
    return node_id_from_public_key(record.public_key)


def check_record(record: AddressRecord, room: str, now: float) -> str | None:
    """None when the record may be stored or used at `now`; otherwise why not."""
    if record.expires_ms / 1000 <= now:
        return "expired"
    if record.issued_ms / 1000 > now + MAX_CLOCK_SKEW:
        return "issued in the future"
    if (record.expires_ms - record.issued_ms) / 1000 > 2 * RECORD_TTL:
        return "lifetime too long"
    if not verify(record.public_key, record.signed_part(room), record.signature):
        return "bad signature"
    return None

"""Signing and checking address records: a record is valid only with its owner's signature over the group."""

from __future__ import annotations

from overlay.identity import Identity, verify
from overlay.ids import dht_key, node_id_from_public_key
from overlay.wire import AddressRecord

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

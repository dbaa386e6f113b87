"""Node and key identifiers: points on a 64-bit ring, and the distances between them.

A node's ID is a hash of its Ed25519 public key, so nobody picks a ring position without also doing the work
of finding a key that hashes there; DHT keys are hashes of (room, virtual IP) on the same ring.

Why 64 bits: the simulator keeps a million IDs in flat numpy uint64 arrays and the wire header stays small.
The birthday bound for a collision among 10^6 random IDs is ~3e-8. An ID collision does not let a node
impersonate another: links and records are authenticated by the public key, not by the ID.
"""

from __future__ import annotations

import hashlib

RING_BITS = 64
RING_SIZE = 1 << RING_BITS
RING_MASK = RING_SIZE - 1
# Larger than any ring distance (at most 2^63) yet fits the 8-byte wire field: the watermark at the origin.
FAR = RING_MASK

_NODE_ID_CONTEXT = b"ipop-overlay node id v1\x00"
_KEY_CONTEXT = b"ipop-overlay dht key v1\x00"


def node_id_from_public_key(public_key: bytes) -> int:
    """The ring position of the node that holds this Ed25519 public key (32 bytes)."""
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    return int.from_bytes(hashlib.sha256(_NODE_ID_CONTEXT + public_key).digest()[:8], "big")


def dht_key(room: str, name: str) -> int:
    """The ring position of a DHT record: hash of the group (room JID) and the record's name (a virtual IP)."""
    data = _KEY_CONTEXT + room.encode() + b"\x00" + name.encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def clockwise(a: int, b: int) -> int:
    """Distance travelling clockwise (increasing IDs, wrapping) from a to b."""
    return (b - a) & RING_MASK


def ring_distance(a: int, b: int) -> int:
    """Shortest distance between a and b going either way round the ring (links are bidirectional)."""
    d = (b - a) & RING_MASK
    return d if d <= RING_SIZE - d else RING_SIZE - d


def format_id(node_id: int) -> str:
    """The 16-hex-digit form used in logs, status output and the CLI."""
    return f"{node_id:016x}"


def parse_id(text: str) -> int:
    """Inverse of format_id; raises ValueError with the offending text."""
    try:
        value = int(text, 16)
    except ValueError:
        raise ValueError(f"not a node ID (16 hex digits): {text!r}") from None
    if not 0 <= value < RING_SIZE or len(text) > 16:
        raise ValueError(f"not a node ID (16 hex digits): {text!r}")
    return value


def derived_address6(prefix: int, node_id: int) -> int:
    """A node's IPv6 address in a prefix of /64 or shorter: the prefix's upper 64 bits and the node ID as the
    interface ID. Like a cryptographically generated address (RFC 3972), it names its key: a member's inner
    IPv6 source and its address records are checked against its node ID, with no certificate field for it."""
    if not 0 <= node_id < RING_SIZE:
        raise ValueError(f"node ID {node_id} is outside 0..2**64-1")
    return (prefix >> 64 << 64) | node_id


def is_derived_address6(address: int, node_id: int) -> bool:
    """Whether `address`'s interface ID (its lower 64 bits) is `node_id`."""
    return address & RING_MASK == node_id

"""Group certificates: the group key's signed statement "this node key is member JID at this virtual address".

Modelled on Nebula's certificate (cert/): a small fixed-layout struct with validity times and one check
against the group key and the revocation blocklist. Times are unix milliseconds because certificates cross
machines; a certificate from slightly in the future is accepted (MAX_CLOCK_SKEW) since members' clocks differ.

Two error kinds, as in h11: constructing a Certificate with impossible fields is our misuse (ValueError);
bytes from a peer that do not decode raise CertError, and decode_certificate raises nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import secrets
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from overlay.identity import verify
from overlay.ids import node_id_from_public_key

if TYPE_CHECKING:
    from overlay.trust.groupkey import GroupKey
    from overlay.trust.revocations import RevocationSet

VERSION = 1
KEY_LEN = 32
SIGNATURE_LEN = 64
MAX_JID_LEN = 255  # bytes of UTF-8: the 1-byte length field; RFC 7622 §3.1 allows 3071, real JIDs are short
U64_MAX = (1 << 64) - 1

# Our choice: a member whose clock runs up to 2 minutes behind the issuer still accepts a fresh certificate.
MAX_CLOCK_SKEW = 120.0

# Domain separation: a signature over one kind of object never verifies as another (certificate vs revocation).
_CERT_CONTEXT = b"ipop-overlay certificate v1\x00"
# version | group | node key | IPv4 address | prefix length | issued_ms | not_after_ms | serial | JID length
_CERT_HEAD = struct.Struct("!B32s32s4sBQQQB")


class CertError(ValueError):
    """Certificate or revocation bytes that do not decode; the receiver drops them and keeps its state."""


def jid_problem(jid: str) -> str | None:
    """Why `jid` cannot be a member's bare JID on the wire, or None when it can."""
    try:
        size = len(jid.encode())
    except UnicodeEncodeError:
        return f"JID {jid!r} is not valid Unicode"
    if not 1 <= size <= MAX_JID_LEN:
        return f"JID of {size} bytes, expected 1..{MAX_JID_LEN}"
    if "/" in jid:
        return f"JID {jid!r} has a resource part; a certificate names a bare JID"
    return None


def length_problem(what: str, value: bytes, expected: int) -> str | None:
    return None if len(value) == expected else f"{what} of {len(value)} bytes, expected {expected}"


def u64_problem(what: str, value: int) -> str | None:
    return None if 0 <= value <= U64_MAX else f"{what} {value} does not fit in 64 unsigned bits"


def ms(t: float) -> int:
    """Unix seconds to the wire's unix milliseconds."""
    return round(t * 1000)


@dataclass(frozen=True, slots=True)
class Certificate:
    group: bytes
    """The Ed25519 public key of the group that issued this certificate (32 bytes)."""
    jid: str
    """The member's bare JID: who the group admitted."""
    node_key: bytes
    """The member node's Ed25519 public key (32 bytes); links authenticate with it."""
    address: ipaddress.IPv4Interface
    """The member's virtual address, with the group subnet's prefix length."""
    issued_ms: int
    """Unix time in milliseconds when the group signed it; also what a revocation compares against."""
    not_after_ms: int
    """Unix time in milliseconds from which it is expired."""
    serial: int
    """Random unsigned 64-bit number telling apart certificates with otherwise equal fields (logs, support)."""
    signature: bytes
    """The group key's Ed25519 signature over signed_part() (64 bytes)."""

    def __post_init__(self) -> None:
        problem = _certificate_problem(self)
        if problem is not None:
            raise ValueError(problem)

    @property
    def node_id(self) -> int:
        return node_id_from_public_key(self.node_key)

    def _unsigned(self) -> bytes:
        jid = self.jid.encode()
        head = _CERT_HEAD.pack(
            VERSION,
            self.group,
            self.node_key,
            self.address.ip.packed,
            self.address.network.prefixlen,
            self.issued_ms,
            self.not_after_ms,
            self.serial,
            len(jid),
        )
        return head + jid

    def signed_part(self) -> bytes:
        return _CERT_CONTEXT + self._unsigned()

    def encode(self) -> bytes:
        return self._unsigned() + self.signature


def _certificate_problem(cert: Certificate) -> str | None:
    """Why these fields make no certificate; the one place both construction and decoding check."""
    problem = (
        length_problem("group key", cert.group, KEY_LEN)
        or length_problem("node key", cert.node_key, KEY_LEN)
        or length_problem("signature", cert.signature, SIGNATURE_LEN)
        or jid_problem(cert.jid)
        or u64_problem("issued_ms", cert.issued_ms)
        or u64_problem("not_after_ms", cert.not_after_ms)
        or u64_problem("serial", cert.serial)
    )
    if problem is not None:
        return problem
    if cert.not_after_ms <= cert.issued_ms:
        return f"not_after_ms {cert.not_after_ms} is not after issued_ms {cert.issued_ms}"
    network = cert.address.network
    if network.prefixlen <= 30 and cert.address.ip in (network.network_address, network.broadcast_address):
        # RFC 919/922: a subnet's all-zeros and all-ones hosts are not host addresses (/31 is RFC 3021's exception).
        return f"address {cert.address} is the network or broadcast address of its subnet"
    return None


def decode_certificate(data: bytes) -> Certificate:
    """Parse a certificate from peer bytes; strict (exact length, known version); raises only CertError.

    Decoding says nothing about trust: check_certificate decides whether to believe it.
    """
    if len(data) < _CERT_HEAD.size + SIGNATURE_LEN:
        raise CertError(f"certificate of {len(data)} bytes is too short")
    version, group, node_key, addr, prefix, issued_ms, not_after_ms, serial, jid_len = _CERT_HEAD.unpack_from(data)
    if version != VERSION:
        raise CertError(f"certificate version {version}, this node understands {VERSION}")
    expected = _CERT_HEAD.size + jid_len + SIGNATURE_LEN
    if len(data) != expected:
        raise CertError(f"certificate of {len(data)} bytes, its JID length says {expected}")
    if prefix > 32:
        raise CertError(f"certificate prefix length {prefix}, expected 0..32")
    jid_bytes = data[_CERT_HEAD.size : _CERT_HEAD.size + jid_len]
    try:
        jid = jid_bytes.decode()
    except UnicodeDecodeError:
        raise CertError(f"certificate JID {jid_bytes!r} is not UTF-8") from None
    address = ipaddress.IPv4Interface((addr, prefix))
    try:
        return Certificate(group, jid, node_key, address, issued_ms, not_after_ms, serial, data[-SIGNATURE_LEN:])
    except ValueError as e:
        raise CertError(f"bad certificate: {e}") from None


def issue_certificate(
    key: GroupKey,
    *,
    jid: str,
    node_key: bytes,
    address: ipaddress.IPv4Interface,
    now: float,
    lifetime: float,
    serial: int | None = None,
) -> Certificate:
    """The group key's certificate for a member, valid from `now` for `lifetime` seconds."""
    if lifetime <= 0:
        raise ValueError(f"certificate lifetime must be positive, got {lifetime} s")
    unsigned = Certificate(
        group=key.public_key,
        jid=jid,
        node_key=node_key,
        address=address,
        issued_ms=ms(now),
        not_after_ms=ms(now + lifetime),
        serial=secrets.randbits(64) if serial is None else serial,
        signature=bytes(SIGNATURE_LEN),
    )
    return dataclasses.replace(unsigned, signature=key.sign(unsigned.signed_part()))


# A member's certificate comes back in every rekey of each of its links (every REKEY_AFTER_TIME) and in its
# address records. An Ed25519 verification is 90 us (cProfile, 2026-12-06); one at each end is 40 % of what
# certificates add to a handshake. The answer for exactly these bytes never changes, so it is remembered; the
# time checks and revocation below run every time.
@functools.lru_cache(maxsize=1024)
def _issuer_signed(group_public: bytes, signed: bytes, signature: bytes) -> bool:
    return verify(group_public, signed, signature)


def forget_checked_signatures() -> None:
    """Forget every remembered signature check (benchmarks measure the first check this way)."""
    _issuer_signed.cache_clear()


def check_certificate(
    cert: Certificate, group_public: bytes, now: float, revocations: RevocationSet | None = None
) -> str | None:
    """None when `cert` admits its holder to the group at `now`, else a short reason for logs and status.

    The checks run cheapest-first except that the signature is verified before anything the signature covers
    is believed; "revoked" comes last because it needs a trusted issued_ms.
    """
    if cert.group != group_public:
        return "signed by another group"
    if not _issuer_signed(group_public, cert.signed_part(), cert.signature):
        return "bad signature"
    if cert.issued_ms / 1000 > now + MAX_CLOCK_SKEW:
        return "not yet valid"
    if cert.not_after_ms / 1000 <= now:
        return "expired"
    if revocations is not None and revocations.covers(cert):
        return "revoked"
    return None

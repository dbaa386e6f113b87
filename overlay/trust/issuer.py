"""The issuer: the room owner's node signs certificates for the room's members and revokes removed ones.

Pure core, clock passed in: the node hands it a request, the requester's bare JID as the XMPP server vouches
for it (or the JID of the certificate a renewal presents), and the room's member list; it answers with a
certificate or a refusal, and turns removals from the member list into revocations. Its state (who holds which
address, the member list it last saw, the revocations) is one file next to the group key, written atomically,
so revocations and allocations survive restarts.

Requests are signed by the requesting node's key: nobody can get a certificate, or an address, for a key it
does not hold. Several issuer nodes may hold the same group key; each allocates a node's address first at a
place derived from its node key (so two issuers usually agree) and probes on from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from overlay.identity import Identity, verify
from overlay.trust.certs import (
    MAX_CLOCK_SKEW,
    CertError,
    Certificate,
    check_certificate,
    decode_certificate,
    issue_certificate,
    ms,
)
from overlay.trust.groupkey import GroupKey
from overlay.trust.revocations import ALL_NODES, Revocation, RevocationSet, make_revocation

log = logging.getLogger(__name__)

DEFAULT_LIFETIME = 24 * 3600.0
DEFAULT_SUBNET = "10.254.0.0/16"
# Affiliations that make a JID a member of the group (XEP-0045 section 5.2: owners and admins are members too).
MEMBER_AFFILIATIONS = frozenset({"owner", "admin", "member"})

# A request and an answer travel as opaque bytes in an XMPP hello (first certificate) or a routed packet
# (renewal); the magic keeps them apart from the other hellos (routed signals start with a node ID).
REQUEST_MAGIC = b"ipopcsr1"
ANSWER_MAGIC = b"ipopcrt1"
_REQUEST_CONTEXT = b"ipop-overlay certificate request v1\x00"
_REQ = struct.Struct("!8s32s4sBQ")  # magic, node key, wanted address (0.0.0.0: any), prefix, timestamp_ms
_MAX_CREDENTIAL = 1024  # a certificate with the longest JID is ~420 bytes
# A request older than this is refused: a captured one cannot be replayed much later.
REQUEST_MAX_AGE = 300.0
# Our choice: a request for what a node was given less than this share of a lifetime ago gets that same
# certificate again. A joiner that heard nothing for ANSWER_TIMEOUT (enroll.py) asks again, and a renewal asks
# again after RENEW_RETRY; a busy issuer then signed and saved once per ask (140 certificates for 100 joiners
# in a 100-node storm with certificates, docs/scale.md). Renewals ask at half a life, so they are never
# answered from here.
REISSUE_SHARE = 0.25


@dataclass(frozen=True, slots=True)
class CertRequest:
    node_key: bytes
    address: ipaddress.IPv4Address | None  # the address the member's config asks for; None: any free one
    timestamp_ms: int
    current: bytes  # the certificate being renewed (b"" for a first request)
    signature: bytes

    def signed_part(self, room: str) -> bytes:
        return _REQUEST_CONTEXT + room.encode() + b"\x00" + self._unsigned()

    def _unsigned(self) -> bytes:
        addr = (self.address or ipaddress.IPv4Address(0)).packed
        head = _REQ.pack(REQUEST_MAGIC, self.node_key, addr, 0, self.timestamp_ms)
        return head + struct.pack("!H", len(self.current)) + self.current

    def encode(self) -> bytes:
        return self._unsigned() + self.signature


def make_request(
    identity: Identity, room: str, now: float, address: ipaddress.IPv4Address | None = None, current: bytes = b""
) -> CertRequest:
    unsigned = CertRequest(identity.public_key, address, ms(now), current, b"")
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_part(room)))


def decode_request(data: bytes) -> CertRequest:
    """Parse a request from peer bytes; raises only CertError."""
    if len(data) < _REQ.size + 2 + 64 or data[:8] != REQUEST_MAGIC:
        raise CertError("not a certificate request")
    _, node_key, addr, _, ts = _REQ.unpack_from(data)
    (clen,) = struct.unpack_from("!H", data, _REQ.size)
    if clen > _MAX_CREDENTIAL or len(data) != _REQ.size + 2 + clen + 64:
        raise CertError("certificate request of the wrong length")
    current = data[_REQ.size + 2 : _REQ.size + 2 + clen]
    address = ipaddress.IPv4Address(addr)
    return CertRequest(node_key, None if int(address) == 0 else address, ts, current, data[-64:])


def encode_answer(cert: Certificate | None, refusal: str = "") -> bytes:
    if cert is not None:
        return ANSWER_MAGIC + b"\x00" + cert.encode()
    return ANSWER_MAGIC + b"\x01" + refusal.encode()[:300]


def decode_answer(data: bytes) -> Certificate | str:
    """The certificate, or the issuer's reason for refusing; CertError for bytes that are neither."""
    if len(data) < 9 or data[:8] != ANSWER_MAGIC:
        raise CertError("not a certificate answer")
    if data[8] == 0:
        return decode_certificate(data[9:])
    if data[8] == 1:
        return data[9:].decode(errors="replace")
    raise CertError("certificate answer of an unknown kind")


class IssuerError(Exception):
    """A refusal: one line the requester's log and status show."""


@dataclass
class Issuer:
    key: GroupKey
    room: str
    subnet: ipaddress.IPv4Network
    lifetime: float = DEFAULT_LIFETIME
    state_file: Path | None = None
    members: dict[str, str] = dataclasses.field(default_factory=dict)  # bare JID -> affiliation
    allocations: dict[str, str] = dataclasses.field(default_factory=dict)  # node key hex -> address
    holders: dict[str, str] = dataclasses.field(default_factory=dict)  # node key hex -> JID
    revocations: RevocationSet = dataclasses.field(default_factory=RevocationSet)
    members_known: bool = False  # a member list has been seen (from the server or the state file)
    # node key hex -> the certificate last issued to it (REISSUE_SHARE): in memory only, at most one per key
    recent: dict[str, Certificate] = dataclasses.field(default_factory=dict)

    @property
    def public_key(self) -> bytes:
        return self.key.public_key

    # -- requests ----------------------------------------------------------------------------------------------
    def handle(self, data: bytes, jid: str | None, now: float) -> bytes:
        """Answer a request's bytes: `jid` is the requester's bare JID as the XMPP server says (None for a
        renewal through the overlay, which must present its current certificate)."""
        try:
            cert = self.issue(decode_request(data), jid, now)
        except CertError as e:
            return encode_answer(None, f"malformed request: {e}")
        except IssuerError as e:
            log.info("certificate refused: %s", e)
            return encode_answer(None, str(e))
        return encode_answer(cert)

    def issue(self, req: CertRequest, jid: str | None, now: float) -> Certificate:
        if not verify(req.node_key, req.signed_part(self.room), req.signature):
            raise IssuerError("request not signed by the node key it names")
        if abs(req.timestamp_ms / 1000 - now) > REQUEST_MAX_AGE + MAX_CLOCK_SKEW:
            raise IssuerError("request too old or from the future: check the node's clock")
        if req.current:
            try:
                current = decode_certificate(req.current)
            except CertError as e:
                raise IssuerError(f"current certificate malformed: {e}") from None
            problem = check_certificate(current, self.public_key, now, self.revocations)
            if problem is not None or current.node_key != req.node_key:
                raise IssuerError(f"current certificate {problem or 'is of another node'}: ask through XMPP")
            if jid is not None and jid != current.jid:
                raise IssuerError("current certificate names another JID")
            jid = current.jid
        if jid is None:
            raise IssuerError("no JID: a first certificate is asked for through the XMPP room")
        jid = jid.lower()
        if self.members.get(jid) not in MEMBER_AFFILIATIONS:
            raise IssuerError(f"{jid} is not a member of {self.room}")
        key = req.node_key.hex()
        before = (self.allocations.get(key), self.holders.get(key))
        address = self._allocate(req.node_key, req.address)
        again = self._reissue(key, jid, address, now)
        if again is not None:
            return again
        cert = issue_certificate(
            self.key, jid=jid, node_key=req.node_key, address=address, now=now, lifetime=self.lifetime
        )
        self.holders[key] = jid
        self.recent[key] = cert
        if (str(address.ip), jid) != before:  # the allocation is on disk before anyone holds a certificate for it
            self.save()
        log.info("certificate for %s (%s) until %.0f", jid, address, now + self.lifetime)
        return cert

    def _reissue(self, key: str, jid: str, address: ipaddress.IPv4Interface, now: float) -> Certificate | None:
        """The certificate issued to `key` a moment ago (REISSUE_SHARE), if it says what a new one would."""
        cert = self.recent.get(key)
        if cert is None or cert.jid != jid or cert.address != address:
            return None
        if now - cert.issued_ms / 1000 >= REISSUE_SHARE * self.lifetime or now < cert.issued_ms / 1000:
            return None
        if check_certificate(cert, self.public_key, now, self.revocations) is not None:
            return None
        return cert

    def _allocate(self, node_key: bytes, wanted: ipaddress.IPv4Address | None) -> ipaddress.IPv4Interface:
        held = self.allocations.get(node_key.hex())
        taken = {a: k for k, a in self.allocations.items()}
        prefix = self.subnet.prefixlen
        if wanted is not None:
            if wanted not in self.subnet or wanted in (self.subnet.network_address, self.subnet.broadcast_address):
                raise IssuerError(f"address {wanted} is not a host address of the group's subnet {self.subnet}")
            owner = taken.get(str(wanted))
            if owner is not None and owner != node_key.hex():
                raise IssuerError(f"address {wanted} belongs to another member")
            self.allocations[node_key.hex()] = str(wanted)
            return ipaddress.IPv4Interface(f"{wanted}/{prefix}")
        if held is not None and ipaddress.IPv4Address(held) in self.subnet:
            return ipaddress.IPv4Interface(f"{held}/{prefix}")
        hosts = self.subnet.num_addresses - 2
        if hosts < 1 or len(taken) >= hosts:
            raise IssuerError(f"the group's subnet {self.subnet} has no free address")
        start = int.from_bytes(hashlib.sha256(b"ipop-overlay address v1" + node_key).digest()[:8], "big") % hosts
        base = int(self.subnet.network_address) + 1
        for i in range(hosts):
            candidate = str(ipaddress.IPv4Address(base + (start + i) % hosts))
            if candidate not in taken:
                self.allocations[node_key.hex()] = candidate
                return ipaddress.IPv4Interface(f"{candidate}/{prefix}")
        raise IssuerError(f"the group's subnet {self.subnet} has no free address")

    # -- the member list ---------------------------------------------------------------------------------------
    def set_members(self, affiliations: dict[str, str], now: float) -> list[Revocation]:
        """The room's member list as the server gave it; revocations for every JID that left it."""
        new = {j.lower(): a for j, a in affiliations.items() if a in MEMBER_AFFILIATIONS}
        revoked = []
        if self.members_known:
            for jid in sorted(set(self.members) - set(new)):
                revoked.append(self.revoke_jid(jid, now))
        changed = new != self.members or not self.members_known
        self.members, self.members_known = new, True
        if changed or revoked:
            self.save()
        return revoked

    def revoke_jid(self, jid: str, now: float) -> Revocation:
        """Revoke every certificate issued to `jid` until now (on any issuer: by JID, not by node key)."""
        until = now + self.lifetime + MAX_CLOCK_SKEW
        rev = make_revocation(self.key, node_key=ALL_NODES, jid=jid, now=now, until=until)
        self.revocations.add(rev, self.public_key, now)
        for k in [k for k, j in self.holders.items() if j == jid]:
            self.allocations.pop(k, None)
            del self.holders[k]
        for k in [k for k, c in self.recent.items() if c.jid == jid]:
            del self.recent[k]
        log.warning("%s was removed from %s: its certificates are revoked", jid, self.room)
        return rev

    # -- state -------------------------------------------------------------------------------------------------
    def save(self) -> None:
        if self.state_file is None:
            return
        state = {
            "room": self.room,
            "members": self.members,
            "allocations": self.allocations,
            "holders": self.holders,
            "revocations": [r.encode().hex() for r in self.revocations.items()],
        }
        directory = self.state_file.parent
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".issuer-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def load(self, now: float) -> None:
        """Read the state file if there is one; a damaged file is an error (revocations must not be lost)."""
        from overlay.trust.revocations import decode_revocation

        if self.state_file is None or not self.state_file.exists():
            return
        try:
            state = json.loads(self.state_file.read_text())
            self.members = {str(k): str(v) for k, v in state["members"].items()}
            self.allocations = {str(k): str(v) for k, v in state["allocations"].items()}
            self.holders = {str(k): str(v) for k, v in state["holders"].items()}
            for text in state["revocations"]:
                self.revocations.add(decode_revocation(bytes.fromhex(text)), self.public_key, now)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise IssuerError(f"issuer state {self.state_file} is damaged ({e}); restore it from a backup") from None
        self.members_known = True


def open_issuer(
    group_key: Path,
    pinned: bytes,
    room: str,
    subnet: ipaddress.IPv4Network,
    lifetime: float,
    state_file: Path,
    now: float,
) -> Issuer:
    """An [issuer] as `join` runs it and `check` tries it: the group's private key (KeyFileError if unusable),
    which must be the pinned public key's, and its state file; IssuerError names what is wrong."""
    key = GroupKey.load(group_key)
    if key.public_key != pinned:
        raise IssuerError(
            f"[issuer] group_key {group_key} is not the key of [group] public_key: do both come from one 'group init'?"
        )
    issuer = Issuer(key, room, subnet, lifetime, state_file)
    issuer.load(now)
    return issuer

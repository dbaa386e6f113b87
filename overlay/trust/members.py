"""What a member trusts: the pinned group key, its own certificate, its peers' certificates, the revocations.

The link layer asks `admit` during every handshake (overlay/transport/session.py's Credentials); the data path
asks `address_of` before a packet reaches the TAP (cryptokey routing, as WireGuard's allowed IPs); the DHT asks
`record_problem` before it stores or believes an address record. Nothing here does I/O: the node feeds it
certificates and revocations and acts on what it answers (dropping links to revoked peers, for one).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

from overlay.ids import is_derived_address6, node_id_from_public_key
from overlay.transport.session import HandshakeError
from overlay.trust.certs import CertError, Certificate, check_certificate, decode_certificate
from overlay.trust.revocations import Revocation, RevocationSet

log = logging.getLogger(__name__)


class GroupTrust:
    """Credentials for the link handshake and the checks every layer makes against the group key."""

    def __init__(self, group_public: bytes, node_key: bytes, clock: Callable[[], float]) -> None:
        self.group_public = group_public
        self.node_key = node_key
        self.clock = clock
        self.certificate: Certificate | None = None
        self.revocations = RevocationSet()
        self.issuers: set[int] = set()  # node IDs of issuers we have heard of (renewals go to them)
        self._peers: dict[int, Certificate] = {}  # node ID -> the certificate it presented, checked
        self.counters: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # -- our own certificate ---------------------------------------------------------------------------------
    def set_certificate(self, cert: Certificate) -> None:
        """Take a certificate issued to us; ValueError when it is not ours or not valid now."""
        if cert.node_key != self.node_key:
            raise ValueError("the certificate names another node key")
        problem = check_certificate(cert, self.group_public, self.clock(), self.revocations)
        if problem is not None:
            raise ValueError(f"the certificate is {problem}" if problem != "bad signature" else "bad signature")
        self.certificate = cert

    @property
    def address(self) -> ipaddress.IPv4Interface | None:
        return self.certificate.address if self.certificate is not None else None

    def renew_at(self) -> float:
        """When to ask for a new certificate: at half its life (the issue's rule; Nebula renews the same way)."""
        cert = self.certificate
        if cert is None:
            return 0.0
        return (cert.issued_ms + cert.not_after_ms) / 2000

    # -- Credentials (overlay/transport/session.py) ---------------------------------------------------------------
    def prologue(self) -> bytes:
        return self.group_public

    def own(self) -> bytes:
        return self.certificate.encode() if self.certificate is not None else b""

    def admit(self, node_key: bytes, credential: bytes) -> None:
        cert = self.judge(node_key, credential)
        self._peers[cert.node_id] = cert

    def judge(self, node_key: bytes, credential: bytes) -> Certificate:
        """The peer's certificate if it admits `node_key` to the group now; HandshakeError with why not."""
        if not credential:
            self.count("refused: no certificate")
            raise HandshakeError("peer presented no certificate")
        try:
            cert = decode_certificate(credential)
        except CertError as e:
            self.count("refused: malformed certificate")
            raise HandshakeError(f"peer certificate malformed: {e}") from None
        if cert.node_key != node_key:
            self.count("refused: certificate of another node")
            raise HandshakeError("peer presented a certificate issued to another node key")
        problem = check_certificate(cert, self.group_public, self.clock(), self.revocations)
        if problem is not None:
            self.count(f"refused: certificate {problem}")
            raise HandshakeError(f"peer certificate {problem}")
        return cert

    # -- what other layers ask -----------------------------------------------------------------------------
    def peer(self, node_id: int) -> Certificate | None:
        return self._peers.get(node_id)

    def learn(self, cert: Certificate) -> bool:
        """Remember a peer's certificate seen outside a handshake (a DHT record's); True if it is valid now."""
        if check_certificate(cert, self.group_public, self.clock(), self.revocations) is not None:
            return False
        held = self._peers.get(cert.node_id)
        if held is None or held.not_after_ms < cert.not_after_ms:
            self._peers[cert.node_id] = cert
        return True

    def address_of(self, node_id: int) -> ipaddress.IPv4Address | None:
        """The virtual address a node's valid certificate gives it (cryptokey routing); None if unknown."""
        cert = self._peers.get(node_id)
        if cert is None:
            return None
        now = self.clock()
        if cert.not_after_ms / 1000 <= now:
            return None
        return cert.address.ip

    def record_problem(self, address: str, node_key: bytes, credential: bytes) -> str | None:
        """Why an address record for `address` signed by `node_key` must be refused, or None: it must carry
        that node's valid certificate holding that address (for an IPv6 address: one derived from the key)."""
        try:
            cert = decode_certificate(credential)
        except CertError:
            return "no valid certificate"
        if cert.node_key != node_key:
            return "certificate of another node"
        if ":" in address:
            # IPv6: the certificate holds no IPv6 address; the address itself names the key (ids.derived_address6).
            if not is_derived_address6(int(ipaddress.IPv6Address(address)), node_id_from_public_key(node_key)):
                return "IPv6 address not derived from the signer's key"
        elif str(cert.address.ip) != address:
            return "address not in the signer's certificate"
        problem = check_certificate(cert, self.group_public, self.clock(), self.revocations)
        if problem is not None:
            return f"certificate {problem}"
        self.learn(cert)
        return None

    def revoke(self, rev: Revocation) -> list[int] | None:
        """Take a revocation (verified here): the node IDs of known peers it cuts off; None if it is not news
        (already known, superseded, expired, or not the group's)."""
        if not self.revocations.add(rev, self.group_public, self.clock()):
            return None
        self.count("revocations learned")
        cut = [nid for nid, cert in self._peers.items() if self.revocations.covers(cert)]
        for nid in cut:
            del self._peers[nid]
        if self.certificate is not None and self.revocations.covers(self.certificate):
            log.error("our own certificate (%s) has been revoked: this node is no longer a member", rev.jid)
        return cut

    def status(self) -> dict[str, object]:
        cert = self.certificate
        return {
            "group": self.group_public.hex(),
            "jid": cert.jid if cert else None,
            "address": str(cert.address) if cert else None,
            "serial": f"{cert.serial:016x}" if cert else None,
            "expires_in_s": round(cert.not_after_ms / 1000 - self.clock()) if cert else None,
            "revocations": len(self.revocations),
            "counters": dict(self.counters),
        }

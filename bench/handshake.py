#!/usr/bin/env python3
"""Benchmark: the link handshake (Noise IK with group certificates), against the same handshake without
certificates and against its bare X25519 work, measured in the same run; prints medians and ratios.

A full handshake is what two members spend to link (or to open an end-to-end session): initiate, the
responder's open_init + answer (its certificate check included), the initiator's complete (the responder's
certificate checked). A rekey between the same two members finds the peer's key conversion and certificate
signature remembered (overlay/transport/session.py, overlay/trust/certs.py); a first contact computes both.
CPU only, one process; a benchmark, not a test: it exits 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from overlay.identity import Identity
from overlay.transport.session import Handshaker, x25519_public
from overlay.trust.certs import forget_checked_signatures, issue_certificate
from overlay.trust.groupkey import GroupKey
from overlay.trust.members import GroupTrust


def handshakes(a: Handshaker, b: Handshaker, peer_b: bytes, n: int, first: bool = False) -> float:
    """Seconds per full handshake, over n of them. `first`: as between members that never met, with the
    remembered key conversions and certificate signatures forgotten before each one (a rekey finds them)."""
    start = time.perf_counter()
    for i in range(n):
        if first:
            x25519_public.cache_clear()
            forget_checked_signatures()
        pending = a.initiate(peer_b, i, time.time_ns())
        _, resp = b.respond(pending.init, i, 0.0)
        a.complete(pending, resp, 0.0)
    return (time.perf_counter() - start) / n


def bare_dh(n: int) -> float:
    """Seconds for the 8 X25519 operations of an IK handshake (4 per side) plus 2 key generations."""
    keys = [X25519PrivateKey.generate() for _ in range(4)]
    publics = [k.public_key() for k in keys]
    start = time.perf_counter()
    for _ in range(n):
        X25519PrivateKey.generate()
        X25519PrivateKey.generate()
        for k in range(8):
            keys[k % 4].exchange(publics[(k + 1) % 4])
    return (time.perf_counter() - start) / n


def trusted(identity: Identity, key: GroupKey, address: str) -> GroupTrust:
    trust = GroupTrust(key.public_key, identity.public_key, time.time)
    trust.certificate = issue_certificate(
        key,
        jid=f"{address}@example.test",
        node_key=identity.public_key,
        address=ipaddress.IPv4Interface(f"{address}/16"),
        now=time.time(),
        lifetime=3600,
    )
    return trust


def median_of(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="repetitions; the median is reported")
    parser.add_argument("--count", type=int, default=200, help="handshakes per repetition")
    args = parser.parse_args()
    a, b = Identity.from_seed(bytes([1]) * 32), Identity.from_seed(bytes([2]) * 32)
    key = GroupKey.generate()
    ta, tb = trusted(a, key, "10.254.0.1"), trusted(b, key, "10.254.0.2")
    with_certs = median_of(
        args.runs, lambda: handshakes(Handshaker(a, ta), Handshaker(b, tb), b.public_key, args.count)
    )
    first = median_of(
        args.runs, lambda: handshakes(Handshaker(a, ta), Handshaker(b, tb), b.public_key, args.count, first=True)
    )
    open_ = median_of(args.runs, lambda: handshakes(Handshaker(a), Handshaker(b), b.public_key, args.count))
    dh = median_of(args.runs, lambda: bare_dh(args.count))
    print(f"Noise IK handshake with certificates  {with_certs * 1e3:7.3f} ms  (a rekey: the peer seen before)")
    print(f"  the same, peers never met before      {first * 1e3:7.3f} ms  (x{first / with_certs:.2f} of a rekey)")
    print(f"Noise IK handshake, no certificates   {open_ * 1e3:7.3f} ms  (certificates cost x{with_certs / open_:.2f})")
    print(f"bare X25519 work of one handshake      {dh * 1e3:7.3f} ms  (handshake is x{with_certs / dh:.2f} of it)")
    print(f"(median of {args.runs} x {args.count} handshakes, one core, both sides in one process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: the link cipher (AES-256-GCM through overlay._fast.Keys) on each implementation that can run here,
ipsec-mb against OpenSSL's libcrypto (overlay/_gcm.h), measured in the same run; prints medians and the ratio.

One seal and one open of a link packet per round, at the sizes the data path carries: a 64-byte packet, an
MTU-sized one, and a super-frame. The time includes the Python call (a few hundred ns, the same for both), so
the small sizes understate the difference the Engine sees; the super-frame is all cipher. CPU only, one process;
a benchmark, not a test: it exits 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overlay._fast import GCM, GCM_IMPLS, Keys

SIZES = (64, 1400, 60000)


def round_trip_s(impl: str, size: int, n: int) -> float:
    """Seconds per seal + open of a `size`-byte payload, over n of them."""
    k1, k2 = bytes(range(32)), bytes(range(32, 64))
    sender, receiver = Keys(k1, k2, impl=impl), Keys(k2, k1, impl=impl)
    payload = bytes(size)
    start = time.perf_counter()
    for counter in range(n):
        receiver.open(sender.seal(0x83, 1, payload), counter)
    return (time.perf_counter() - start) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per size (median reported)")
    args = parser.parse_args()
    print(f"AES-256-GCM in use: {GCM}; here: {', '.join(GCM_IMPLS)}")
    if len(GCM_IMPLS) < 2:
        print("only one implementation can run here (no ipsec-mb build, or no VAES): nothing to compare")
    print(f"{'bytes':>6} " + " ".join(f"{impl + ' us':>14} {'GB/s':>6}" for impl in GCM_IMPLS) + "   ratio")
    for size in SIZES:
        n = max(200, 4_000_000 // (size + 400))
        medians = []
        for impl in GCM_IMPLS:
            round_trip_s(impl, size, n // 10)  # warm up
            medians.append(statistics.median(round_trip_s(impl, size, n) for _ in range(args.repeats)))
        cells = " ".join(f"{m * 1e6:14.2f} {2 * size / m / 1e9:6.2f}" for m in medians)
        ratio = f"{medians[-1] / medians[0]:6.2f}x" if len(medians) > 1 else ""
        print(f"{size:>6} {cells}   {ratio}")
    if len(GCM_IMPLS) > 1:
        print(f"ratio: {GCM_IMPLS[-1]}'s time over {GCM_IMPLS[0]}'s (above 1: {GCM_IMPLS[0]} is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: frames per second through one node's data path and into another's, in one process.

TAP frame -> VirtualNic -> route -> AES-GCM seal -> (underlay handed straight to the peer) -> open ->
deliver -> TAP write, for 1400-byte IPv4 packets and for 60000-byte TCP super-frames with a virtio_net_hdr
(what a TAP with TSO hands us), and for 64-byte packets (what `iperf3 -u -l 64` sends: the per-packet cost
alone). The baseline, measured in the same run, is AES-GCM seal + open of the same plaintext with
`cryptography` alone: the ratio says how much the node adds around the cipher. `--profile` also prints where
the time goes per frame (cProfile, both nodes' functions; docs/datapath.md). A benchmark, not a test: it prints
numbers and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ipaddress
import os
import pstats
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from overlay.node import Node
from overlay.tap.device import MemoryTap
from overlay.tap.frames import ETH_P_IP, VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VnetHeader, ethernet_frame
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC
from overlay.wire import ROUTED_HEADER, TRANSPORT_HEADER
from tests.support.memgroup import linked_pair, vaddr

ADDRESSES = (vaddr(0), vaddr(1))
BATCH = 64  # frames per TAP wakeup, as the node reads them


def ipv4_packet(src: str, dst: str, size: int, protocol: int) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, size, 0, 0x4000, 64, protocol, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    return header + os.urandom(size - len(header))


async def linked_pair_direct(vnet: bool) -> tuple[Node, Node, MemoryTap, MemoryTap]:
    a, b, tap_a, tap_b = await linked_pair(vnet, vnet)
    # From here on a's datagrams reach b synchronously: the loop's per-datagram scheduling is not measured.
    a.underlay.send = lambda data, endpoint: b.links.on_datagram(data, a.underlay.local_endpoint)  # type: ignore[method-assign]
    return a, b, tap_a, tap_b


def node_rate(a: Node, tap_a: MemoryTap, tap_b: MemoryTap, frame: bytes, seconds: float) -> float:
    """Frames per second from tap_a to tap_b through both nodes."""
    sent = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for _ in range(BATCH):
            tap_a.inject(frame)
        a.datapath.on_tap_readable()
        sent += BATCH
        tap_b.written.clear()
    return sent / (time.perf_counter() - start)


def aead_rate(size: int, seconds: float) -> float:
    """Seal + open per second of `size` plaintext bytes, AES-256-GCM, header as associated data."""
    key = AESGCM(AESGCM.generate_key(256))
    plaintext = os.urandom(size)
    header = bytes(TRANSPORT_HEADER.size)
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for counter in range(n, n + BATCH):
            nonce = b"\0\0\0\0" + counter.to_bytes(8, "big")
            key.decrypt(nonce, key.encrypt(nonce, plaintext, header), header)
        n += BATCH
    return n / (time.perf_counter() - start)


def profile(a: Node, tap_a: MemoryTap, tap_b: MemoryTap, frame: bytes, seconds: float) -> None:
    """The functions that take the most time per frame (their own time, not their callees'), under cProfile.

    cProfile's own cost per call inflates small functions; the shares, not the absolute µs, are the finding."""
    profiler = cProfile.Profile()
    profiler.enable()
    frames = node_rate(a, tap_a, tap_b, frame, seconds) * seconds
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
    total = sum(v[2] for _, v in rows)
    print(f"  profile: {total / frames * 1e6:.1f} µs per frame under cProfile; own time by function:")
    for (path, line, name), (_, calls, own, _, _) in rows[:12]:
        where = f"{Path(path).name}:{line}" if line else "C"
        print(f"    {own / frames * 1e6:6.2f} µs  {own / total:5.1%}  {calls / frames:5.1f}/frame  {name} ({where})")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each measurement")
    parser.add_argument("--profile", action="store_true", help="also profile each case: µs per frame by function")
    args = parser.parse_args()
    cases = [
        ("64 B IPv4", False, 64, 17),
        ("1400 B IPv4", False, 1400, 17),
        ("60000 B TSO super-frame", True, 60000, 6),
    ]
    for label, vnet, size, protocol in cases:
        a, b, tap_a, tap_b = await linked_pair_direct(vnet)
        try:
            packet = ipv4_packet(ADDRESSES[0], ADDRESSES[1], size, protocol)
            frame = ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, packet)
            if vnet:
                # What the kernel hands over for a TSO4 frame: segment at MSS 1360, TCP checksum to finish.
                frame = VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 54, 1360, 34, 16).encode() + frame
            node_rate(a, tap_a, tap_b, frame, 0.2)  # warm-up: the first packet resolves and caches the route
            if not tap_b.written and b.counters:
                print(f"{label}: frames did not arrive: {b.counters}")
            rate = node_rate(a, tap_a, tap_b, frame, args.seconds)
            plain = ROUTED_HEADER.size + size + (10 if vnet else 0)
            base = aead_rate(plain, args.seconds)
            print(
                f"{label:<24} node path {rate:9.0f} frames/s {rate * size * 8 / 1e9:6.2f} Gbit/s | "
                f"AES-GCM seal+open alone {base:9.0f}/s | ratio {rate / base:.3f}"
            )
            if args.profile:
                profile(a, tap_a, tap_b, frame, args.seconds)
        finally:
            await a.stop()
            await b.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

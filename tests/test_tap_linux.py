"""TAP devices: the in-memory one under the asyncio reader, and a real Linux TAP inside a lab namespace."""

from __future__ import annotations

import asyncio
import json
import os
import select
import sys
from pathlib import Path

import pytest

from overlay.tap.device import GSO_MAX_SIZE, MemoryTap, TapError
from tests.support.netlab import NetLab

ROOT = Path(__file__).resolve().parent.parent


# -- MemoryTap: the same driver code as the Linux device -------------------------------------------------


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_memory_tap_is_readable_exactly_while_frames_wait() -> None:
    tap = MemoryTap()
    assert not readable(tap.fileno())
    for i in range(100):
        tap.inject(bytes([i]) * 60)
    assert readable(tap.fileno())
    first = tap.read_batch(64)
    assert len(first) == 64 and first[0] == b"\x00" * 60
    assert readable(tap.fileno()), "frames left over must keep the fd readable"
    assert len(tap.read_batch(64)) == 36
    assert not readable(tap.fileno())
    assert tap.read_batch() == []
    tap.close()


def test_memory_tap_drains_through_loop_add_reader_in_batches() -> None:
    async def run() -> list[int]:
        tap = MemoryTap()
        loop = asyncio.get_running_loop()
        batches: list[int] = []
        done = asyncio.Event()

        def on_readable() -> None:
            batches.append(len(tap.read_batch(64)))
            if sum(batches) == 150:
                done.set()

        loop.add_reader(tap.fileno(), on_readable)
        for _ in range(150):
            tap.inject(b"f" * 60)
        await asyncio.wait_for(done.wait(), 2)
        loop.remove_reader(tap.fileno())
        tap.close()
        return batches

    assert asyncio.run(run()) == [64, 64, 22]


def test_memory_tap_counts_drops_when_full_and_refuses_use_after_close() -> None:
    tap = MemoryTap(queue_limit=2)
    for _ in range(3):
        tap.write(b"x" * 60)
    assert tap.written == [b"x" * 60] * 2
    assert tap.counters == {"write-queue-full": 1}
    tap.close()
    tap.close()
    with pytest.raises(TapError):
        tap.write(b"x")


# -- LinuxTap inside a namespace -------------------------------------------------------------------------

# Runs inside the lab namespace (the TAP is created where the process runs). Prints one JSON object.
NAMESPACE_SCRIPT = r"""
import asyncio, ipaddress, json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from overlay.tap.device import LinuxTap, TapError
from overlay.tap.frames import internet_checksum
from overlay.tap.vnic import Outbound, Reply, VirtualNic

def ip(text):
    return int(ipaddress.IPv4Address(text))

def sh(*argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=10)

def echo6_reply(request):
    # Swapped addresses, type 129 (RFC 4443 §4.2); the pseudo-header's sum is the same either way round.
    icmp = bytearray(request[40:])
    icmp[0], icmp[2:4] = 129, b"\x00\x00"
    pseudo = request[8:40] + len(icmp).to_bytes(4, "big") + bytes([0, 0, 0, 58])
    icmp[2:4] = internet_checksum(pseudo + bytes(icmp)).to_bytes(2, "big")
    return request[:8] + request[24:40] + request[8:24] + bytes(icmp)

def echo_reply(request):
    header_len = (request[0] & 0x0F) * 4
    # Swapping source and destination leaves the IPv4 header checksum unchanged.
    header = request[:12] + request[16:20] + request[12:16] + request[20:header_len]
    icmp = bytearray(request[header_len:])
    icmp[0], icmp[2:4] = 0, b"\x00\x00"
    icmp[2:4] = internet_checksum(bytes(icmp)).to_bytes(2, "big")
    return header + bytes(icmp)

async def main():
    out = {"replies": 0, "echo_requests": 0, "batches": []}
    tap = await LinuxTap.create("ipt0", "198.19.0.1/24", 1400, address6="fd00:99::1/64")
    out["mac"] = tap.mac.hex()
    out["addr"] = json.loads(sh("ip", "-j", "addr", "show", "dev", "ipt0").stdout)
    # Taken name; bad prefix; a non-TAP device's name; an MTU the kernel refuses after the device exists
    # (TAP max_mtu is 65535 minus the Ethernet header), which must not leave ipt2 behind.
    attempts = [
        ("ipt0", "198.19.9.1/24", 1400),
        ("ipt1", "198.19.9.1/33", 1400),
        ("lo", "198.19.9.1/24", 1400),
        ("ipt2", "198.19.9.1/24", 65535),
    ]
    for name, address, mtu in attempts:
        try:
            await LinuxTap.create(name, address, mtu)
        except TapError as e:
            out.setdefault("errors", []).append(str(e))
    try:
        await LinuxTap.create("ipt4", "198.19.9.1/24", 1200, address6="fd00:99::1/64")
    except TapError as e:
        out.setdefault("errors", []).append(str(e))
    out["leftovers"] = [n for n in ("ipt1", "ipt2") if sh("ip", "link", "show", n).returncode == 0]
    offloaded = await LinuxTap.create("ipt3", "198.19.3.1/24", 1400, offload=True)
    out["offload_link"] = json.loads(sh("ip", "-d", "-j", "link", "show", "dev", "ipt3").stdout)[0]
    offloaded.close()
    nic = VirtualNic(ip("198.19.0.1"), 24, tap.mac, address6=int(ipaddress.IPv6Address("fd00:99::1")))
    out["echo6_requests"] = 0

    def on_readable():
        frames = tap.read_batch()
        out["batches"].append(len(frames))
        for frame in frames:
            result = nic.from_tap(frame)
            if isinstance(result, Reply):
                out["replies"] += 1
                tap.write(result.frame)
            elif isinstance(result, Outbound) and result.packet[0] >> 4 == 6:
                if result.packet[6] == 58 and result.packet[40] == 128:
                    out["echo6_requests"] += 1
                    tap.write(nic.to_tap(echo6_reply(bytes(result.packet))))
            elif isinstance(result, Outbound) and result.packet[9] == 1 and result.packet[20] == 8:
                out["echo_requests"] += 1
                out["echo_dst"] = result.dst_ip
                tap.write(nic.to_tap(echo_reply(bytes(result.packet))))

    loop = asyncio.get_running_loop()
    loop.add_reader(tap.fileno(), on_readable)
    ping = await asyncio.create_subprocess_exec(
        "ping", "-c", "2", "-i", "0.2", "-W", "3", "198.19.0.2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    ping_out, _ = await asyncio.wait_for(ping.communicate(), 15)
    ping6 = await asyncio.create_subprocess_exec(
        "ping", "-6", "-c", "2", "-i", "0.2", "-W", "3", "fd00:99::2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    ping6_out, _ = await asyncio.wait_for(ping6.communicate(), 15)
    loop.remove_reader(tap.fileno())
    out["ping_rc"], out["ping_out"] = ping.returncode, ping_out.decode()
    out["ping6_rc"], out["ping6_out"] = ping6.returncode, ping6_out.decode()
    out["neigh"] = json.loads(sh("ip", "-j", "neigh", "show", "dev", "ipt0").stdout)
    out["learnt_mac"] = nic.tap_mac.hex()
    tap.close()
    tap.close()
    out["exists_after_close"] = sh("ip", "link", "show", "ipt0").returncode == 0
    out["read_after_close"] = tap.read_batch()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="TAP devices and namespaces need root")
def test_linux_tap_in_namespace_answers_arp_and_neighbour_discovery_carries_ping_and_vanishes_on_close() -> None:
    with NetLab() as lab:
        lab.add_hub()
        host = lab.add_host("tap")
        result = lab.run(host, sys.executable, "-c", NAMESPACE_SCRIPT, str(ROOT), timeout=60)
        out = json.loads(result.stdout)
        (link,) = out["addr"]
        assert link["ifname"] == "ipt0" and link["mtu"] == 1400
        assert "UP" in link["flags"]
        assert {"local": "198.19.0.1", "prefixlen": 24} in [
            {"local": a["local"], "prefixlen": a["prefixlen"]} for a in link["addr_info"] if a["family"] == "inet"
        ]
        assert link["address"].replace(":", "") == out["mac"]
        # The IPv6 address is there at once: no duplicate address detection ("tentative") to wait for.
        (inet6,) = [a for a in link["addr_info"] if a["family"] == "inet6" and a["scope"] == "global"]
        assert (inet6["local"], inet6["prefixlen"]) == ("fd00:99::1", 64)
        assert not inet6.get("tentative") and inet6.get("nodad")
        assert len(out["errors"]) == 5, out
        assert "already in use" in out["errors"][0]
        assert "198.19.9.1/33" in out["errors"][1]
        assert "not a TAP" in out["errors"][2]
        assert "MTU 65535" in out["errors"][3]
        assert "below IPv6's minimum of 1280" in out["errors"][4]
        assert out["leftovers"] == []
        # With offload the kernel's super-frames are capped so that one, with our headers, fits a datagram.
        assert out["offload_link"]["gso_max_size"] == GSO_MAX_SIZE
        assert out["offload_link"]["mtu"] == 1400 and "UP" in out["offload_link"]["flags"]
        # The kernel asked for 198.19.0.2, we answered with the gateway MAC, the echo came through.
        assert out["replies"] >= 1
        assert [n["lladdr"] for n in out["neigh"] if n["dst"] == "198.19.0.2"] == ["02:49:50:4f:50:01"]
        assert out["learnt_mac"] == out["mac"]
        assert out["echo_requests"] == 2
        assert out["echo_dst"] == 0xC6130002
        assert out["ping_rc"] == 0, out["ping_out"]
        # The same over IPv6: the kernel's solicitation answered with the gateway MAC, the echo came through.
        assert [n["lladdr"] for n in out["neigh"] if n["dst"] == "fd00:99::2"] == ["02:49:50:4f:50:01"]
        assert out["echo6_requests"] == 2
        assert out["ping6_rc"] == 0, out["ping6_out"]
        assert not out["exists_after_close"]
        assert out["read_after_close"] == []

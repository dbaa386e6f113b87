"""The TAP device seam: a Linux TAP (/dev/net/tun + pyroute2) and an in-memory one with the same interface.

Both hand the driver a file descriptor that becomes readable when frames are waiting, so one
`loop.add_reader(tap.fileno(), ...)` driver serves both, and both drain many frames per wakeup: on this
2-core machine Python costs ~5 µs per frame whatever its size, and batching up to 64 frames per wakeup took
a forwarder from 0.7-0.9 to 1.2-1.6 Gbit/s (ARCHITECTURE.md, measured facts).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import ipaddress
import os
import struct
from typing import Protocol

from pyroute2 import AsyncIPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

# From linux/if_tun.h.
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
# From linux/if.h: interface names are at most 15 bytes plus the terminating NUL.
IFNAMSIZ = 16
# Ethernet header plus one 802.1Q tag: a read buffer of MTU + this never truncates a frame.
FRAME_OVERHEAD = 18
# RFC 791: every IPv4 host must accept 68-byte datagrams unfragmented; 65535 is the IPv4 maximum.
MIN_MTU = 68
MAX_MTU = 65535


class TapError(Exception):
    """A TAP device could not be created, configured or used; the message says what to do."""


class TapDevice(Protocol):
    """What the node's driver needs from a TAP device.

    `fileno()` becomes readable when frames are waiting (level-triggered: it stays readable while any are).
    """

    name: str
    mac: bytes
    mtu: int
    counters: dict[str, int]

    def fileno(self) -> int: ...

    def read_batch(self, max_frames: int = 64) -> list[bytes]:
        """Up to `max_frames` frames the kernel sent; never blocks, [] when none are waiting."""
        ...

    def write(self, frame: bytes) -> None:
        """Hand one frame to the kernel; never blocks. A full queue drops the frame and counts it."""
        ...

    def close(self) -> None:
        """Release the device (the Linux device disappears); calling it again does nothing."""
        ...


def _count(counters: dict[str, int], key: str) -> None:
    counters[key] = counters.get(key, 0) + 1


def _check_name(name: str) -> None:
    bad = not name or len(name) >= IFNAMSIZ or not name.isascii() or any(c in name for c in "/%: \t\n")
    if bad or name in (".", ".."):
        raise TapError(f"TAP name {name!r} is invalid: use 1-15 ASCII characters, no '/', '%', ':' or space")


class LinuxTap:
    """A non-persistent Linux TAP device (IFF_TAP | IFF_NO_PI) in the current network namespace.

    Non-persistent means the kernel removes the device when its fd is closed, including when the process
    dies, so a crash never leaves a half-made device behind. The fd is opened in the namespace the process
    runs in (the namespace at open() time is the one that counts); run the node with `ip netns exec`.
    """

    def __init__(self, fd: int, name: str, mac: bytes, mtu: int) -> None:
        """Wrap an already attached TAP fd; use `LinuxTap.create`."""
        self._fd = fd
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self.counters: dict[str, int] = {}
        self._read_size = mtu + FRAME_OVERHEAD

    @classmethod
    async def create(cls, name: str, address: str, mtu: int) -> LinuxTap:
        """Create TAP `name`, give it `address` ("10.254.0.1/16") and `mtu`, and bring it up."""
        _check_name(name)
        try:
            interface = ipaddress.IPv4Interface(address)
        except ValueError as e:
            raise TapError(f"TAP address {address!r} is not IPv4/prefix: write it like 10.254.0.1/16") from e
        if "/" not in address:
            raise TapError(f"TAP address {address!r} has no prefix length: write it like 10.254.0.1/16")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise TapError(f"TAP MTU {mtu} is outside {MIN_MTU}..{MAX_MTU}")
        fd = _open_tap(name)
        try:
            mac = await _configure(name, interface, mtu)
        except BaseException:
            os.close(fd)  # the device goes with its only fd
            raise
        return cls(fd, name, mac, mtu)

    def fileno(self) -> int:
        return self._fd

    def read_batch(self, max_frames: int = 64) -> list[bytes]:
        frames: list[bytes] = []
        if self._fd < 0:
            return frames
        read, fd, size = os.read, self._fd, self._read_size
        try:
            while len(frames) < max_frames:
                frames.append(read(fd, size))
        except BlockingIOError:
            pass
        except OSError as e:
            if not frames:
                raise TapError(f"reading TAP {self.name} failed: {e.strerror}; recreate the device") from e
        return frames

    def write(self, frame: bytes) -> None:
        if self._fd < 0:
            raise TapError(f"write to TAP {self.name} after close()")
        try:
            os.write(self._fd, frame)
        except BlockingIOError:
            _count(self.counters, "write-queue-full")
        except OSError as e:
            # EIO: the device is administratively down; EINVAL: a frame the kernel refuses (e.g. too big).
            _count(self.counters, f"write-{errno.errorcode.get(e.errno or 0, 'error')}")

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def _open_tap(name: str) -> int:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise TapError("/dev/net/tun is missing: load the tun module (modprobe tun)") from e
    except PermissionError as e:
        raise TapError("opening /dev/net/tun was refused: run as root or with CAP_NET_ADMIN") from e
    request = struct.pack("16sH", name.encode("ascii"), IFF_TAP | IFF_NO_PI)
    try:
        fcntl.ioctl(fd, TUNSETIFF, request)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EPERM:
            raise TapError(f"creating TAP {name} was refused: run as root or with CAP_NET_ADMIN") from e
        if e.errno == errno.EBUSY:
            raise TapError(f"TAP name {name} is already in use: pick another name or stop its owner") from e
        if e.errno == errno.EINVAL:
            raise TapError(f"name {name} belongs to a device that is not a TAP: pick another name") from e
        raise TapError(f"creating TAP {name} failed: {e.strerror}") from e
    return fd


async def _configure(name: str, interface: ipaddress.IPv4Interface, mtu: int) -> bytes:
    """Set MTU, address and up through rtnetlink in the current namespace; return the device's MAC."""
    try:
        async with AsyncIPRoute() as ipr:
            indices = await ipr.link_lookup(ifname=name)
            if not indices:
                raise TapError(f"TAP {name} vanished right after it was created; try again")
            index = indices[0]
            await ipr.link("set", index=index, mtu=mtu)
            await ipr.addr("add", index=index, address=str(interface.ip), prefixlen=interface.network.prefixlen)
            await ipr.link("set", index=index, state="up")
            mac = ""
            for link in await ipr.link("get", index=index):
                mac = link.get("address") or ""
    except NetlinkError as e:
        raise TapError(f"configuring TAP {name} with {interface} and MTU {mtu} failed: {os.strerror(e.code)}") from e
    try:
        return bytes.fromhex(mac.replace(":", ""))
    except ValueError as e:
        raise TapError(f"TAP {name} reported MAC {mac!r}, not a 6-byte MAC") from e


class MemoryTap:
    """An in-memory TAP: `inject()` plays the kernel sending a frame, `written` collects what we wrote.

    Readiness uses an os.pipe: its read end is `fileno()`, and it holds exactly one byte while frames are
    queued and none otherwise, so the same level-triggered `loop.add_reader` driver serves both devices.
    `queue_limit` bounds `written` to exercise the driver's full-queue path (None = unbounded).
    """

    def __init__(
        self,
        name: str = "mem0",
        mac: bytes = b"\x02\x00\x00\x00\x00\x01",
        mtu: int = 1500,
        queue_limit: int | None = None,
    ) -> None:
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self.counters: dict[str, int] = {}
        self.written: list[bytes] = []
        self.queue_limit = queue_limit
        self._pending: collections.deque[bytes] = collections.deque()
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def inject(self, frame: bytes) -> None:
        if self._rfd < 0:
            raise TapError(f"inject into MemoryTap {self.name} after close()")
        if not self._pending:
            os.write(self._wfd, b"\x00")
        self._pending.append(frame)

    def fileno(self) -> int:
        return self._rfd

    def read_batch(self, max_frames: int = 64) -> list[bytes]:
        frames: list[bytes] = []
        pending = self._pending
        while pending and len(frames) < max_frames:
            frames.append(pending.popleft())
        if frames and not pending:
            os.read(self._rfd, 1)
        return frames

    def write(self, frame: bytes) -> None:
        if self._rfd < 0:
            raise TapError(f"write to MemoryTap {self.name} after close()")
        if self.queue_limit is not None and len(self.written) >= self.queue_limit:
            _count(self.counters, "write-queue-full")
            return
        self.written.append(bytes(frame))

    def close(self) -> None:
        if self._rfd >= 0:
            os.close(self._rfd)
            os.close(self._wfd)
            self._rfd = self._wfd = -1
            self._pending.clear()

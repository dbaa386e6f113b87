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

from overlay.tap.frames import VNET_HDR_LEN, Bytes

# From linux/if_tun.h.
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
# From linux/if.h: interface names are at most 15 bytes plus the terminating NUL.
IFNAMSIZ = 16
# Ethernet header plus one 802.1Q tag: a read buffer of MTU + this never truncates a frame.
FRAME_OVERHEAD = 18
# RFC 791: every IPv4 host must accept 68-byte datagrams unfragmented; 65535 is the IPv4 maximum.
MIN_MTU = 68
MAX_MTU = 65535
# Our choice: the largest TCP super-frame the kernel hands us with TSO on. A super-frame plus our headers
# (transport 13 + tag 16, routed 28, virtio_net_hdr 10, and for a tunnel another 13 + 16 + 9) must fit one
# UDP datagram (65507 bytes over IPv4); 60000 leaves room. ARCHITECTURE.md measured 6.2 Gbit/s with
# TSO super-frames against 1.2-1.6 with 1500-byte frames: Python costs the same per frame whatever its size.
GSO_MAX_SIZE = 60000


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
    vnet_hdr: bool  # every frame read or written starts with a virtio_net_hdr (frames.VNET_HDR_LEN bytes)

    def fileno(self) -> int: ...

    def read_batch(self, max_frames: int = 64) -> list[bytes]:
        """Up to `max_frames` frames the kernel sent; never blocks, [] when none are waiting."""
        ...

    def write(self, frame: bytes) -> None:
        """Hand one frame to the kernel; never blocks. A full queue drops the frame and counts it."""
        ...

    def write_parts(self, parts: list[Bytes]) -> None:
        """Like write() of the concatenated parts, without concatenating them first."""
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

    With offload it is opened with IFF_VNET_HDR and TUNSETOFFLOAD (checksum, TSO4, TSO6): the
    kernel hands us TCP super-frames of up to GSO_MAX_SIZE bytes with a virtio_net_hdr in front saying how to
    cut them into segments, and accepts the same from us, segmenting (or passing them whole to a local
    socket) itself.

    Non-persistent means the kernel removes the device when its fd is closed, including when the process
    dies, so a crash never leaves a half-made device behind. The fd is opened in the namespace the process
    runs in (the namespace at open() time is the one that counts); run the node with `ip netns exec`.
    """

    def __init__(self, fd: int, name: str, mac: bytes, mtu: int, vnet_hdr: bool = False) -> None:
        """Wrap an already attached TAP fd; use `LinuxTap.create`."""
        self._fd = fd
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self.vnet_hdr = vnet_hdr
        self.counters: dict[str, int] = {}
        self._read_size = VNET_HDR_LEN + MAX_MTU + FRAME_OVERHEAD if vnet_hdr else mtu + FRAME_OVERHEAD

    @classmethod
    async def create(cls, name: str, address: str, mtu: int, *, offload: bool = False) -> LinuxTap:
        """Create TAP `name`, give it `address` ("10.254.0.1/16") and `mtu`, and bring it up.

        `offload`: TSO/checksum offload with a virtio_net_hdr on every frame (see the class docstring)."""
        _check_name(name)
        try:
            interface = ipaddress.IPv4Interface(address)
        except ValueError as e:
            raise TapError(f"TAP address {address!r} is not IPv4/prefix: write it like 10.254.0.1/16") from e
        if "/" not in address:
            raise TapError(f"TAP address {address!r} has no prefix length: write it like 10.254.0.1/16")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise TapError(f"TAP MTU {mtu} is outside {MIN_MTU}..{MAX_MTU}")
        fd = _open_tap(name, offload)
        try:
            mac = await _configure(name, interface, mtu, GSO_MAX_SIZE if offload else None)
        except BaseException:
            os.close(fd)  # the device goes with its only fd
            raise
        return cls(fd, name, mac, mtu, offload)

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
        self.write_parts([frame])

    def write_parts(self, parts: list[Bytes]) -> None:
        if self._fd < 0:
            raise TapError(f"write to TAP {self.name} after close()")
        try:
            os.writev(self._fd, parts)
        except BlockingIOError:
            _count(self.counters, "write-queue-full")
        except OSError as e:
            # EIO: the device is administratively down; EINVAL: a frame the kernel refuses (e.g. too big).
            _count(self.counters, f"write-{errno.errorcode.get(e.errno or 0, 'error')}")

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def _open_tap(name: str, offload: bool = False) -> int:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise TapError("/dev/net/tun is missing: load the tun module (modprobe tun)") from e
    except PermissionError as e:
        raise TapError("opening /dev/net/tun was refused: run as root or with CAP_NET_ADMIN") from e
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
    request = struct.pack("16sH", name.encode("ascii"), flags)
    try:
        fcntl.ioctl(fd, TUNSETIFF, request)
        if offload:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETVNETLE, struct.pack("i", 1))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
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


async def _configure(name: str, interface: ipaddress.IPv4Interface, mtu: int, gso_max_size: int | None) -> bytes:
    """Set MTU, address and up through rtnetlink in the current namespace; return the device's MAC."""
    try:
        async with AsyncIPRoute() as ipr:
            indices = await ipr.link_lookup(ifname=name)
            if not indices:
                raise TapError(f"TAP {name} vanished right after it was created; try again")
            index = indices[0]
            await ipr.link("set", index=index, mtu=mtu)
            if gso_max_size is not None:
                # IFLA_GSO_MAX_SIZE is settable since Linux 5.19; older kernels keep 64 KiB super-frames,
                # which still fit one UDP datagram directly (not through a tunnel): carry on without it.
                try:
                    await ipr.link("set", index=index, gso_max_size=gso_max_size)
                except NetlinkError:
                    pass
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
    `vnet_hdr`: frames carry a virtio_net_hdr in front, as a LinuxTap with offload does.
    """

    def __init__(
        self,
        name: str = "mem0",
        mac: bytes = b"\x02\x00\x00\x00\x00\x01",
        mtu: int = 1500,
        queue_limit: int | None = None,
        vnet_hdr: bool = False,
    ) -> None:
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self.counters: dict[str, int] = {}
        self.written: list[bytes] = []
        self.queue_limit = queue_limit
        self.vnet_hdr = vnet_hdr
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

    def write_parts(self, parts: list[Bytes]) -> None:
        self.write(b"".join(parts))

    def close(self) -> None:
        if self._rfd >= 0:
            os.close(self._rfd)
            os.close(self._wfd)
            self._rfd = self._wfd = -1
            self._pending.clear()

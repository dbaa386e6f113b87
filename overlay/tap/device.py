"""The TAP device seam: a Linux TAP (/dev/net/tun and the interface ioctls) and an in-memory one with the same
interface.

Both hand the driver a file descriptor that becomes readable when frames are waiting, so one
`loop.add_reader(tap.fileno(), ...)` driver serves both, and both drain many frames per wakeup: on this
2-core machine Python costs ~5 µs per frame whatever its size, and batching up to 64 frames per wakeup took
a forwarder from 0.7-0.9 to 1.2-1.6 Gbit/s (ARCHITECTURE.md, measured facts).

The device is configured with the classic interface ioctls (netdevice(7)) and one rtnetlink message, not
pyroute2: importing pyroute2 costs every node ~10 MB of resident memory for five calls made once at start.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import ipaddress
import os
import socket
import struct
from typing import Protocol

from overlay.tap.frames import VNET_HDR_LEN, Bytes
from overlay.tap.ndp import IPV6_MIN_MTU

# From linux/if_tun.h.
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
# From linux/if.h: interface names are at most 15 bytes plus the terminating NUL; struct ifreq is the name and
# a 24-byte union (netdevice(7)).
IFNAMSIZ = 16
IFREQ_UNION = 24
IFF_UP = 0x1
# From linux/sockios.h.
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCGIFHWADDR = 0x8927
SIOCGIFINDEX = 0x8933
# From linux/netlink.h and linux/rtnetlink.h / if_link.h: the one attribute no ioctl sets.
RTM_NEWLINK = 16
RTM_NEWADDR = 20
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
# linux/if_addr.h: the address attribute, its flags attribute, and "no duplicate address detection": the
# address is usable at once instead of after DAD's ~1 s (RFC 4862 §5.4); the overlay, not the link, is
# what makes addresses unique (each is derived from a key or checked against the DHT).
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
IFA_F_NODAD = 0x02
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
IFLA_GSO_MAX_SIZE = 41
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTATTR_U32 = struct.Struct("=HHI")  # length, type, value
_RTATTR_IN6 = struct.Struct("=HH16s")  # length, type, IPv6 address
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
# Ethernet header plus one 802.1Q tag: a read buffer of MTU + this never truncates a frame.
FRAME_OVERHEAD = 18
# RFC 791: every IPv4 host must accept 68-byte datagrams unfragmented; 65535 is the IPv4 maximum.
MIN_MTU = 68
MAX_MTU = 65535
MAX_QUEUES = 8  # the Engine's LANES (overlay/_keys.h)
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

    def __init__(
        self, fd: int, name: str, mac: bytes, mtu: int, vnet_hdr: bool = False, queues: tuple[int, ...] = ()
    ) -> None:
        """Wrap an already attached TAP fd (and the fds of its further queues); use `LinuxTap.create`."""
        self._fd = fd
        # A multi-queue TAP's queues after the first (IFF_MULTI_QUEUE): the kernel hands each flow's frames to
        # one queue, chosen by the flow's hash, and sends a reply out of the queue its request came in by.
        self.queues = queues
        self._write_fd = fd  # use_queue
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self.vnet_hdr = vnet_hdr
        self.counters: dict[str, int] = {}
        self._read_size = VNET_HDR_LEN + MAX_MTU + FRAME_OVERHEAD if vnet_hdr else mtu + FRAME_OVERHEAD

    @classmethod
    async def create(
        cls,
        name: str,
        address: str,
        mtu: int,
        *,
        offload: bool = False,
        address6: str | None = None,
        queues: int = 1,
    ) -> LinuxTap:
        """Create TAP `name`, give it `address` ("10.254.0.1/16"), `address6` if any ("fd00:1::5/64") and `mtu`,
        and bring it up.

        `offload`: TSO/checksum offload with a virtio_net_hdr on every frame (see the class docstring).
        `queues`: above 1, a multi-queue TAP with that many queues (one per Engine: overlay/fastpath.py)."""
        _check_name(name)
        try:
            interface = ipaddress.IPv4Interface(address)
        except ValueError as e:
            raise TapError(f"TAP address {address!r} is not IPv4/prefix: write it like 10.254.0.1/16") from e
        if "/" not in address:
            raise TapError(f"TAP address {address!r} has no prefix length: write it like 10.254.0.1/16")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise TapError(f"TAP MTU {mtu} is outside {MIN_MTU}..{MAX_MTU}")
        try:
            interface6 = ipaddress.IPv6Interface(address6) if address6 is not None else None
        except ValueError as e:
            raise TapError(f"TAP address {address6!r} is not IPv6/prefix: write it like fd00:1::5/64") from e
        if interface6 is not None and mtu < IPV6_MIN_MTU:
            raise TapError(f"TAP MTU {mtu} is below IPv6's minimum of {IPV6_MIN_MTU} (RFC 8200 §5)")
        if not 1 <= queues <= MAX_QUEUES:
            raise TapError(f"TAP queues {queues} is outside 1..{MAX_QUEUES}")
        fds = [_open_tap(name, offload, queues > 1)]
        try:
            while len(fds) < queues:
                fds.append(_open_tap(name, offload, True))
            mac = _configure(name, interface, mtu, GSO_MAX_SIZE if offload else None, interface6)
        except BaseException:
            for fd in fds:
                os.close(fd)  # the device goes with its last fd
            raise
        return cls(fds[0], name, mac, mtu, offload, tuple(fds[1:]))

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

    def use_queue(self, index: int) -> None:
        """Write through queue `index` (0: the first) from now on. The kernel sends a flow out by the queue its last
        packet came in by: writing what an Engine passed up through that Engine's queue keeps the flow there."""
        self._write_fd = self._fd if index == 0 else self.queues[index - 1]

    def write_parts(self, parts: list[Bytes]) -> None:
        if self._fd < 0:
            raise TapError(f"write to TAP {self.name} after close()")
        try:
            os.writev(self._write_fd, parts)
        except BlockingIOError:
            _count(self.counters, "write-queue-full")
        except OSError as e:
            # EIO: the device is administratively down; EINVAL: a frame the kernel refuses (e.g. too big).
            _count(self.counters, f"write-{errno.errorcode.get(e.errno or 0, 'error')}")

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            queues, self.queues = self.queues, ()
            for q in queues:
                os.close(q)
            os.close(fd)


def _open_tap(name: str, offload: bool = False, multi_queue: bool = False) -> int:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise TapError("/dev/net/tun is missing: load the tun module (modprobe tun)") from e
    except PermissionError as e:
        raise TapError("opening /dev/net/tun was refused: run as root or with CAP_NET_ADMIN") from e
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if offload else 0) | (IFF_MULTI_QUEUE if multi_queue else 0)
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


def _configure(
    name: str,
    interface: ipaddress.IPv4Interface,
    mtu: int,
    gso_max_size: int | None,
    interface6: ipaddress.IPv6Interface | None = None,
) -> bytes:
    """Set MTU, addresses and up in the current namespace (netdevice(7) ioctls, rtnetlink for what they cannot
    say); return the device's MAC."""
    request = name.encode("ascii")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fd = s.fileno()
            try:
                answer = fcntl.ioctl(fd, SIOCGIFINDEX, struct.pack(f"{IFNAMSIZ}s{IFREQ_UNION}x", request))
            except OSError as e:
                if e.errno == errno.ENODEV:
                    raise TapError(f"TAP {name} vanished right after it was created; try again") from None
                raise
            index = struct.unpack_from("i", answer, IFNAMSIZ)[0]
            fcntl.ioctl(fd, SIOCSIFMTU, struct.pack(f"{IFNAMSIZ}si20x", request, mtu))
            if gso_max_size is not None:
                _set_gso_max_size(index, gso_max_size)
            for op, value in ((SIOCSIFADDR, interface.ip), (SIOCSIFNETMASK, interface.netmask)):
                sockaddr = struct.pack("=HH4s8x", socket.AF_INET, 0, value.packed)
                fcntl.ioctl(fd, op, struct.pack(f"{IFNAMSIZ}s16s8x", request, sockaddr))
            answer = fcntl.ioctl(fd, SIOCGIFFLAGS, struct.pack(f"{IFNAMSIZ}s{IFREQ_UNION}x", request))
            flags = struct.unpack_from("H", answer, IFNAMSIZ)[0]
            fcntl.ioctl(fd, SIOCSIFFLAGS, struct.pack(f"{IFNAMSIZ}sH22x", request, flags | IFF_UP))
            if interface6 is not None:
                _add_address6(name, index, interface6)
            answer = fcntl.ioctl(fd, SIOCGIFHWADDR, struct.pack(f"{IFNAMSIZ}s{IFREQ_UNION}x", request))
    except OSError as e:
        raise TapError(f"configuring TAP {name} with {interface} and MTU {mtu} failed: {e.strerror}") from e
    return bytes(answer[IFNAMSIZ + 2 : IFNAMSIZ + 8])  # struct sockaddr: family, then the 6-byte MAC


def _add_address6(name: str, index: int, interface: ipaddress.IPv6Interface) -> None:
    """Give the device its IPv6 address without duplicate address detection (one RTM_NEWADDR message)."""
    packed = interface.ip.packed
    body = (
        _IFADDRMSG.pack(socket.AF_INET6, interface.network.prefixlen, IFA_F_NODAD, 0, index)
        + _RTATTR_IN6.pack(_RTATTR_IN6.size, IFA_LOCAL, packed)
        + _RTATTR_IN6.pack(_RTATTR_IN6.size, IFA_ADDRESS, packed)
        + _RTATTR_U32.pack(_RTATTR_U32.size, IFA_FLAGS, IFA_F_NODAD)
    )
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    code = _rtnetlink(_NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), RTM_NEWADDR, flags, 1, 0) + body)
    if code == errno.EACCES:
        raise TapError(
            f"adding {interface} to TAP {name} was refused: IPv6 is disabled here "
            "(sysctl net.ipv6.conf.default.disable_ipv6=1); enable it or leave [vnic] address6 out"
        )
    if code:
        raise TapError(f"adding {interface} to TAP {name} failed: {os.strerror(code)}")


def _rtnetlink(message: bytes) -> int:
    """Send one rtnetlink request and return the errno of its acknowledgement (0: done)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(5.0)  # the kernel answers at once; a bound keeps a broken netlink from hanging the start
        nl.send(message)
        answer = nl.recv(65536)
    if len(answer) < _NLMSG_HEADER.size + 4 or _NLMSG_HEADER.unpack_from(answer)[1] != NLMSG_ERROR:
        raise OSError(errno.EPROTO, "unexpected rtnetlink answer")
    return -int(struct.unpack_from("=i", answer, _NLMSG_HEADER.size)[0])


def _set_gso_max_size(index: int, size: int) -> None:
    """Cap the super-frames the kernel builds for this device (IFLA_GSO_MAX_SIZE, one RTM_NEWLINK message).

    Settable since Linux 5.19; an older kernel refuses it and keeps 64 KiB super-frames, which still fit one
    UDP datagram directly (not through a tunnel): carry on without it."""
    attribute = _RTATTR_U32.pack(_RTATTR_U32.size, IFLA_GSO_MAX_SIZE, size)
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + attribute
    message = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body
    _rtnetlink(message)  # 0 (done) or an errno: both mean carry on (see above)


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

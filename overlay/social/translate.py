"""SocialVPN's 1:1 address translation: each side sees a friend's device at an address it chose itself.

A node places each friend device at an address of its own choosing in its own subnet (`AddressPool`), and the
friend device places us in *its* subnet. Three addresses per friend device therefore matter to us
(`FriendDevice`): `local`, where we put the device; `remote`, the device's own TAP address; `remote_view`, where
the device put us. The device tells us the last two over signalling.

Where the rewrite happens: once, at the sender (`FriendNat.outbound`), into the receiver's view. A packet our
kernel sends to `local` leaves as `remote_view -> remote`, which is exactly what the friend's kernel expects
from us, so the receiver (`FriendNat.inbound`) rewrites nothing and only checks the packet against what it
decided itself: source = the address it gave the sending device, destination = its own address. A friend
that lies about its addresses can only misdirect its own traffic; it cannot make us accept a forged source.
With both ends' tables consistent (A's `local` for B is B's `remote_view` for A, and the other way round; each
`remote` is the other's TAP address), a reply that B's kernel sends (addresses swapped) and B translates
arrives at A as the exact bytes A's kernel would have received from a directly attached host: `translate` by
RFC 1624 is undone by the opposite rewrite, byte for byte.

`translate` is the pure packet rewrite: addresses, the IPv4 header checksum, the transport checksums whose
pseudo-header covers the addresses, and the datagram quoted in an ICMP error. Bytes are hostile: anything
malformed raises `TranslateError`; `FriendNat` turns that into a counted drop.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from overlay.tap.frames import IPPROTO_ICMP, IPPROTO_TCP, IPV4_MIN_HEADER, Bytes, FrameError, ipv4_header


class TranslateError(ValueError):
    """The bytes are not an IPv4 packet that can be translated (too short, not version 4, a bad header length,
    a total length past the bytes present, a transport or quoted header cut off)."""


# --- From the specs ------------------------------------------------------------------------------------------
IPPROTO_UDP = 17  # RFC 768
IPPROTO_DCCP = 33  # RFC 4340
IPPROTO_UDPLITE = 136  # RFC 3828
_ADDRESSES = struct.Struct("!II")  # RFC 791: source and destination at bytes 12..20 of the IPv4 header
_IP_CHECKSUM_AT = 10  # RFC 791
_IP_OFFSET_MASK = 0x1FFF  # RFC 791: fragment offset, in 8-byte units, below the flags
# RFC 792: ICMP messages that quote "the internet header plus the first 64 bits of the original datagram's
# data": destination unreachable, source quench (deprecated by RFC 6633, still an error), redirect, time
# exceeded, parameter problem. Every other type (echo, timestamp, ...) carries no addresses past its IP header.
ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})
_ICMP_HEADER_LEN = 8  # type, code, checksum, 4 type-specific bytes; the quote follows


@dataclass(frozen=True, slots=True)
class _PseudoHeaderChecksum:
    """Where a transport protocol keeps a checksum that covers both IPv4 addresses, and its special values."""

    offset: int  # of the 16-bit checksum within the transport header
    zero_means_none: bool  # the sender computed no checksum
    zero_sent_as_ones: bool  # a computed 0 goes on the wire as 0xFFFF, keeping 0 for "none"


# The transport checksums whose pseudo-header holds the source and destination addresses. ICMP's does not.
_PSEUDO_HEADER_CHECKSUMS = {
    IPPROTO_TCP: _PseudoHeaderChecksum(16, zero_means_none=False, zero_sent_as_ones=False),  # RFC 793 §3.1
    IPPROTO_UDP: _PseudoHeaderChecksum(6, zero_means_none=True, zero_sent_as_ones=True),  # RFC 768
    IPPROTO_DCCP: _PseudoHeaderChecksum(6, zero_means_none=False, zero_sent_as_ones=False),  # RFC 4340 §9
    IPPROTO_UDPLITE: _PseudoHeaderChecksum(6, zero_means_none=False, zero_sent_as_ones=True),  # RFC 3828 §3.1
}


# --- Checksum arithmetic -------------------------------------------------------------------------------------
def _word_sum(data: Bytes) -> int:
    """The plain (not folded) sum of `data`'s 16-bit big-endian words; `data` has an even length."""
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _fold(total: int) -> int:
    """End-around-carry fold of a non-negative sum into 16 bits (RFC 1071): 0 only when `total` is 0."""
    folded = total % 0xFFFF
    return folded if folded or not total else 0xFFFF


def _replace(checksum: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), for the words `old` replaced by `new` (equal, even lengths).

    ~m over n words is n * 0xFFFF - sum(m), so the sum below is the equation's sum exactly, not just modulo
    0xFFFF; it is zero only when every term is, so the result never turns a checksum into the -0 that RFC 1624
    §3 warns eqn. 2 can produce. Because it is an addition in one's-complement arithmetic, m -> m' followed by
    m' -> m gives back HC for every HC except 0xFFFF, which no sender computes (RFC 1071's result is ~sum, and a
    header or pseudo-header sum is never +0); UDP's 0xFFFF round-trips too (see `_update_transport`).
    """
    words = len(old) // 2
    total = (~checksum & 0xFFFF) + words * 0xFFFF - _word_sum(old) + _word_sum(new)
    return ~_fold(total) & 0xFFFF


# --- The packet rewrite --------------------------------------------------------------------------------------
def _parse(packet: Bytes) -> tuple[int, int, int, int]:
    try:
        return ipv4_header(packet)
    except FrameError as exc:
        raise TranslateError(str(exc)) from exc


def _fragment_offset(buf: Bytes, at: int) -> int:
    return ((buf[at + 6] << 8) | buf[at + 7]) & _IP_OFFSET_MASK


def _readdress(buf: bytearray, at: int, src: int, dst: int) -> tuple[bytes, bytes]:
    """Set the addresses of the IPv4 header at `at` and update its header checksum (RFC 1624).

    Returns the old and new bytes 10..20 of the header (checksum, then addresses): the words any checksum that
    covers this header (an ICMP error's, over its quote) has to be updated by.
    """
    old = bytes(buf[at + _IP_CHECKSUM_AT : at + 20])
    addresses = _ADDRESSES.pack(src, dst)
    checksum = _replace(int.from_bytes(old[:2], "big"), old[2:], addresses)
    new = checksum.to_bytes(2, "big") + addresses
    buf[at + _IP_CHECKSUM_AT : at + 20] = new
    return old, new


def _update_transport(
    buf: bytearray, at: int, end: int, protocol: int, old_addresses: bytes, new_addresses: bytes
) -> tuple[bytes, bytes] | None:
    """Update the pseudo-header checksum of the transport header at `at` for the address change (RFC 1624).

    Returns the old and new checksum bytes, or None when `protocol` has no such checksum, the field ends past
    `end`, or a UDP sender sent none. Incremental on purpose: it needs neither the rest of the segment (a first
    fragment or an ICMP quote holds only its start) nor a valid checksum to begin with (a bad one stays bad,
    as in Linux's inet_proto_csum_replace4, so the receiver still drops what it would have dropped).
    """
    rule = _PSEUDO_HEADER_CHECKSUMS.get(protocol)
    if rule is None or at + rule.offset + 2 > end:
        return None
    where = at + rule.offset
    old = bytes(buf[where : where + 2])
    value = int.from_bytes(old, "big")
    if value == 0 and rule.zero_means_none:
        return None  # RFC 768: "all zero ... means that the transmitter generated no checksum"; it stays 0.
    value = _replace(value, old_addresses, new_addresses)
    if value == 0 and rule.zero_sent_as_ones:
        value = 0xFFFF  # RFC 768: a computed 0 is transmitted as all ones (0 would read as "no checksum")
    new = value.to_bytes(2, "big")
    buf[where : where + 2] = new
    return old, new


def _quote_at(buf: Bytes, header_len: int, total_len: int) -> int | None:
    """Where the datagram quoted by the ICMP error in `buf` starts, or None when `buf` is not the first
    fragment of an ICMP error. Raises TranslateError when the quote cannot hold a whole IPv4 header."""
    if buf[9] != IPPROTO_ICMP or _fragment_offset(buf, 0) or total_len == header_len:
        return None
    if buf[header_len] not in ICMP_ERROR_TYPES:
        return None
    quote = header_len + _ICMP_HEADER_LEN
    if total_len < quote + IPV4_MIN_HEADER:
        raise TranslateError(
            f"ICMP error type {buf[header_len]} of {total_len - header_len} bytes cannot quote a 20-byte IPv4 header"
        )
    version, quoted_len = buf[quote] >> 4, (buf[quote] & 0x0F) * 4
    if version != 4 or quoted_len < IPV4_MIN_HEADER or quote + quoted_len > total_len:
        raise TranslateError(
            f"ICMP error quotes IP version {version}, header length {quoted_len}, in {total_len - quote} bytes"
        )
    return quote


def quoted_addresses(packet: Bytes) -> tuple[int, int] | None:
    """(src, dst) of the datagram that an ICMP error quotes (RFC 792), or None when `packet` is not the first
    fragment of an ICMP error. Raises TranslateError when `packet` is malformed."""
    _, _, header_len, total_len = _parse(packet)
    quote = _quote_at(packet, header_len, total_len)
    if quote is None:
        return None
    src, dst = _ADDRESSES.unpack_from(packet, quote + 12)
    return src, dst


def translate(packet: Bytes, src: int | None = None, dst: int | None = None) -> bytes:
    """`packet` with its source and/or destination address replaced (None keeps it), every checksum still valid.

    - The IPv4 header checksum (RFC 791), updated incrementally (RFC 1624).
    - In the first fragment (offset 0) only: TCP, UDP, DCCP and UDP-Lite checksums, whose pseudo-header holds
      both addresses (RFC 793 §3.1, RFC 768, RFC 4340 §9, RFC 3828 §3.1). Updated incrementally, so the
      checksum stays right for the whole datagram although later fragments are not at hand. Later fragments
      carry no transport header: only their IP header changes.
    - ICMP errors (RFC 792): the quoted datagram went the other way, so its source is the old destination and
      its destination the old source, and they are rewritten to the new destination and source. As Linux's
      stateless NAT (act_nat.c) does, a quoted address that is not the outer one (an error from a router
      quoting the final destination) is left alone. The quoted header's checksum and its pseudo-header
      checksum are updated too, and the ICMP checksum for all of those words. The quoted TCP checksum is
      updated whenever the quote reaches it, although the rest of the segment is cut off: incremental update
      needs only the changed words, and Linux's tcp_manip_pkt does the same. RFC 792 promises only 8 quoted
      bytes, which hold UDP's checksum but not TCP's; when it is cut off there is nothing to fix.
    - ICMP queries (echo, timestamp) carry no addresses beyond the IP header: their checksum stays.

    IP options are copied untouched. Source-route options (RFC 791 §3.1) would make a pseudo-header use the
    route's last address instead of the header's; RFC 7126 §4.3-4.4 advise dropping such packets, as Linux
    does by default (accept_source_route), so they are not handled here. Bytes past the IPv4 total length
    (link padding) are dropped.
    """
    for name, value in (("src", src), ("dst", dst)):
        if value is not None and not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{name} address {value} is outside 0..2**32-1")
    old_src, old_dst, header_len, total_len = _parse(packet)
    new_src = old_src if src is None else src
    new_dst = old_dst if dst is None else dst
    out = bytearray(packet[:total_len])
    old, new = _readdress(out, 0, new_src, new_dst)
    if _fragment_offset(out, 0):
        return bytes(out)
    protocol = out[9]
    rule = _PSEUDO_HEADER_CHECKSUMS.get(protocol)
    if rule is not None:
        if header_len + rule.offset + 2 > total_len:
            # RFC 1858's tiny first fragment: the checksum is in a later fragment, where it cannot be fixed.
            raise TranslateError(
                f"IP protocol {protocol} packet with {total_len - header_len} bytes after the IP header ends "
                f"before its checksum at byte {rule.offset}"
            )
        _update_transport(out, header_len, total_len, protocol, old[2:], new[2:])
    quote = _quote_at(out, header_len, total_len)
    if quote is not None:
        _translate_quote(out, header_len, quote, (old_src, old_dst), (new_src, new_dst))
    return bytes(out)


def _translate_quote(buf: bytearray, header_len: int, quote: int, old: tuple[int, int], new: tuple[int, int]) -> None:
    """Rewrite the datagram quoted at `quote` by the ICMP error in `buf` the reverse way, and fix the ICMP
    checksum (RFC 792: it covers the whole ICMP message, quote included; there is no pseudo-header)."""
    (old_src, old_dst), (new_src, new_dst) = old, new
    quoted_src, quoted_dst = _ADDRESSES.unpack_from(buf, quote + 12)
    olds, news = _readdress(
        buf,
        quote,
        new_dst if quoted_src == old_dst else quoted_src,
        new_src if quoted_dst == old_src else quoted_dst,
    )
    if not _fragment_offset(buf, quote):
        quoted_len = (buf[quote] & 0x0F) * 4
        changed = _update_transport(buf, quote + quoted_len, len(buf), buf[quote + 9], olds[2:], news[2:])
        if changed is not None:
            olds, news = olds + changed[0], news + changed[1]
    # Every changed field starts at an even offset from the ICMP header (the IP header lengths are multiples
    # of 4 and the ICMP header is 8 bytes), so the words line up with the ICMP checksum's words.
    at = header_len + 2
    checksum = _replace(int.from_bytes(buf[at : at + 2], "big"), olds, news)
    buf[at : at + 2] = checksum.to_bytes(2, "big")


# --- One node's table of friend devices ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FriendDevice:
    """One friend device's addresses, as IPv4 integers.

    `local`: the address we gave the device in our subnet; our kernel sends to it (`AddressPool` picks it).
    `remote`: the device's own TAP address, in its subnet (the device tells us).
    `remote_view`: the address the device gave us, in its subnet (the device tells us).
    Two ends agree when A's `local` is B's `remote_view`, A's `remote_view` is B's `local`, and each
    `remote` is the other's TAP address.
    """

    local: int
    remote: int
    remote_view: int


@dataclass(frozen=True, slots=True)
class ToFriend:
    """A packet for friend device `device`, already in that device's view of the addresses."""

    device: str
    packet: bytes


@dataclass(frozen=True, slots=True)
class Dropped:
    """Nothing to send or deliver; `reason` is also the key counted in `FriendNat.counters`."""

    reason: str


MALFORMED = Dropped("malformed")
OUTBOUND_SOURCE = Dropped("outbound-source")  # our kernel sent from an address other than our TAP address
OUTBOUND_UNKNOWN = Dropped("outbound-unknown-destination")  # to an address we gave no friend device
OUTBOUND_QUOTE = Dropped("outbound-icmp-quote")  # an ICMP error about something other than that device's packet
INBOUND_UNKNOWN = Dropped("inbound-unknown-device")
INBOUND_SOURCE = Dropped("inbound-source")  # not from the address we gave the sending device
INBOUND_DESTINATION = Dropped("inbound-destination")  # not to our TAP address
INBOUND_QUOTE = Dropped("inbound-icmp-quote")  # an ICMP error about a packet we did not send that device


class FriendNat:
    """The 1:1 NAT between our subnet and each friend device's, for the node whose TAP address is `address`.

    Pure: no I/O. `outbound` takes what our kernel sent and returns it in the friend device's view; `inbound`
    checks what a friend device sent (already in our view, see the module docstring) before our kernel gets it.
    """

    def __init__(self, address: int) -> None:
        if not 0 <= address <= 0xFFFFFFFF:
            raise ValueError(f"IPv4 address {address} is outside 0..2**32-1")
        self.address = address
        self.counters: dict[str, int] = {}
        self._friends: dict[str, FriendDevice] = {}
        self._by_local: dict[int, str] = {}

    def set_friend(self, device: str, friend: FriendDevice) -> None:
        """Add `device`, or replace what we know of it (a device that moved to another subnet tells us again)."""
        if friend.local == self.address:
            raise ValueError(f"device {device!r} cannot have our own address {ipaddress.IPv4Address(self.address)}")
        holder = self._by_local.get(friend.local)
        if holder is not None and holder != device:
            raise ValueError(
                f"address {ipaddress.IPv4Address(friend.local)} for {device!r} is already {holder!r}'s; "
                "take addresses from one AddressPool"
            )
        self.remove_friend(device)
        self._friends[device] = friend
        self._by_local[friend.local] = device

    def remove_friend(self, device: str) -> None:
        friend = self._friends.pop(device, None)
        if friend is not None:
            del self._by_local[friend.local]

    def friend(self, device: str) -> FriendDevice | None:
        return self._friends.get(device)

    def device_at(self, local: int) -> str | None:
        """The device we placed at `local`, if any."""
        return self._by_local.get(local)

    def _drop(self, result: Dropped) -> Dropped:
        self.counters[result.reason] = self.counters.get(result.reason, 0) + 1
        return result

    def outbound(self, packet: Bytes) -> ToFriend | Dropped:
        """Translate a packet our kernel sent to a friend device's `local` address into that device's view:
        source -> `remote_view`, destination -> `remote` (and an ICMP error's quote the reverse way)."""
        try:
            src, dst, _, _ = _parse(packet)
            if src != self.address:
                return self._drop(OUTBOUND_SOURCE)
            device = self._by_local.get(dst)
            if device is None:
                return self._drop(OUTBOUND_UNKNOWN)
            friend = self._friends[device]
            # An ICMP error our kernel sends a friend can only be about a packet that friend sent us; any other
            # quote would hand the friend our view of some other flow.
            quoted = quoted_addresses(packet)
            if quoted is not None and quoted != (friend.local, self.address):
                return self._drop(OUTBOUND_QUOTE)
            return ToFriend(device, translate(packet, friend.remote_view, friend.remote))
        except TranslateError:
            return self._drop(MALFORMED)

    def inbound(self, device: str, packet: Bytes) -> bytes | Dropped:
        """A packet from friend device `device`, trimmed to its total length, if it is in our view and from
        that device: source = the address we gave it, destination = our TAP address."""
        friend = self._friends.get(device)
        if friend is None:
            return self._drop(INBOUND_UNKNOWN)
        try:
            src, dst, _, total_len = _parse(packet)
            if src != friend.local:
                return self._drop(INBOUND_SOURCE)
            if dst != self.address:
                return self._drop(INBOUND_DESTINATION)
            # An ICMP error must be about a packet we sent this device: otherwise a friend could forge errors
            # that reset our connections to other friends (RFC 5927).
            quoted = quoted_addresses(packet)
            if quoted is not None and quoted != (self.address, friend.local):
                return self._drop(INBOUND_QUOTE)
        except TranslateError:
            return self._drop(MALFORMED)
        return bytes(packet[:total_len])


# --- Our addresses for friend devices ------------------------------------------------------------------------
class SubnetFull(ValueError):
    """Every host address of the subnet is taken."""


class AddressPool:
    """Stable addresses for friend devices in our subnet: `address_for(device)` returns the same address for
    the same device until `release(device)`.

    A new device's first candidate is derived from a hash of its key, then the next free host address after it.
    Our choice, for two reasons: a device keeps its address even if the persisted table (`export_table`) is
    lost, unless another device took that slot first; and a released address is not the next one handed out,
    so a name still cached for a removed friend does not point at the next friend added.
    """

    def __init__(self, address: int, prefix_len: int, reserved: Iterable[int] = ()) -> None:
        """`address` is our own TAP address, `prefix_len` the subnet's length, as `VirtualNic` takes them;
        `reserved`: further host addresses no device gets (the node's DNS responder)."""
        # /31 and /32 leave no host address for a friend besides ours (RFC 3021 aside, as in VirtualNic).
        if not 1 <= prefix_len <= 30:
            raise ValueError(f"prefix length /{prefix_len} is outside /1../30")
        if not 0 <= address <= 0xFFFFFFFF:
            raise ValueError(f"IPv4 address {address} is outside 0..2**32-1")
        mask = (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF
        self.address = address
        self.prefix_len = prefix_len
        self._network = address & mask
        self._hosts = (1 << (32 - prefix_len)) - 2  # without the network and broadcast addresses (RFC 919/922)
        if not self._is_host(address):
            raise ValueError(f"{ipaddress.IPv4Address(address)} is the network or broadcast address of /{prefix_len}")
        self._by_device: dict[str, int] = {}
        self._by_address: dict[int, str] = {}
        self._reserved = frozenset(a for a in reserved if self._is_host(a) and a != address) | {address}

    @property
    def capacity(self) -> int:
        """How many friend devices fit: every host address but ours and the reserved ones."""
        return self._hosts - len(self._reserved)

    def __len__(self) -> int:
        return len(self._by_device)

    def _is_host(self, address: int) -> bool:
        return 1 <= address - self._network <= self._hosts

    def lookup(self, device: str) -> int | None:
        return self._by_device.get(device)

    def device_at(self, address: int) -> str | None:
        return self._by_address.get(address)

    def address_for(self, device: str) -> int:
        """The address of `device`, allocated now if it has none. Raises SubnetFull when none is left."""
        known = self._by_device.get(device)
        if known is not None:
            return known
        if len(self._by_device) >= self.capacity:
            raise SubnetFull(
                f"all {self.capacity} addresses of {ipaddress.IPv4Address(self._network)}/{self.prefix_len} are "
                f"given out; release a device or use a shorter prefix to add {device!r}"
            )
        digest = hashlib.sha256(device.encode("utf-8", "surrogatepass")).digest()
        start = int.from_bytes(digest[:8], "big") % self._hosts
        for step in range(self._hosts):
            candidate = self._network + 1 + (start + step) % self._hosts
            if candidate not in self._reserved and candidate not in self._by_address:
                self._by_device[device] = candidate
                self._by_address[candidate] = device
                return candidate
        raise AssertionError("a free address exists: the count was checked above")

    def release(self, device: str) -> None:
        address = self._by_device.pop(device, None)
        if address is not None:
            del self._by_address[address]

    def export_table(self) -> dict[str, str]:
        """Device -> dotted-quad address, for the caller to persist (JSON-ready) and `import_table` later."""
        return {device: str(ipaddress.IPv4Address(address)) for device, address in sorted(self._by_device.items())}

    def import_table(self, table: Mapping[str, str]) -> None:
        """Replace the table with `table` (as `export_table` wrote it). Raises ValueError, leaving the pool as it
        was, when an entry is not a host address of our subnet, is our own address, or repeats another's."""
        by_device: dict[str, int] = {}
        by_address: dict[int, str] = {}
        for device, text in table.items():
            try:
                address = int(ipaddress.IPv4Address(text))
            except ValueError as exc:
                raise ValueError(f"address table entry {device!r}: {exc}") from exc
            if not self._is_host(address) or address in self._reserved:
                raise ValueError(
                    f"address table entry {device!r}: {text} is not a free host address of "
                    f"{ipaddress.IPv4Address(self._network)}/{self.prefix_len} beside ours "
                    f"({ipaddress.IPv4Address(self.address)}); remove the entry to allocate it afresh"
                )
            if address in by_address:
                raise ValueError(f"address table gives {text} to both {by_address[address]!r} and {device!r}")
            by_device[device] = address
            by_address[address] = device
        self._by_device, self._by_address = by_device, by_address

"""TCP super-frames on links whose path may not carry IP fragments.

With TAP offload a TCP super-frame (~60 KB, kind DATA_GSO) travels as one UDP datagram, ~45 IP fragments on a
1500-byte path; a firewall or NAT that drops fragments would lose every one of them, silently. Until a link's
fragment probe has been acknowledged (overlay/probes.py), its sender or relay cuts super-frames into the
TCP segments the receiving kernel would have cut, each an ordinary DATA packet that fits one datagram.
"""

from __future__ import annotations

from collections.abc import Callable

from overlay.link import Link
from overlay.tap.frames import Bytes, FrameError, nic_packets

SEGMENT_DROP = "drop: TCP super-frame that cannot be segmented"


def send_unfragmented(link: Link, header: bytes, head: Bytes, packet: Bytes, count: Callable[[str], None]) -> None:
    """A DATA_GSO body (offload header `head`, IPv4 `packet`) as DATA packets that each fit one datagram: a
    super-frame cut into its TCP segments, a checksum-only frame with its checksum completed. `header`: the
    routed header to put in front, kind DATA. A frame that cannot be cut is counted and dropped."""
    try:
        packets = nic_packets(head, packet)
    except FrameError:
        count(SEGMENT_DROP)
        return
    for p in packets:
        link.send(header + p)

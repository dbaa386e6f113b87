"""Sessions, paths, ICE, TURN and the UDP underlay of a node's links.

aioice, which the ICE and TURN modules here build on, imports its mDNS module whenever any part of it is
imported, and with it dnspython: 2.7 MiB resident in every node that has ICE configured (`import aioice` in a
node's process: +3.27 MiB, +0.53 MiB without it; 2026-12-06). mDNS candidates
(draft-ietf-mmusic-mdns-ice-candidates) hide a browser's addresses behind `.local` names. Ours never carry a name:
a signal's candidates are decoded as IP addresses (signals.py), so aioice's only calls into the module,
`is_mdns_hostname` on a remote candidate, answer False and it never opens an mDNS socket. A stand-in with those
answers takes the module's place, unless aioice was imported before this package (then it stays as it is).
tests/test_aioice.py checks that every name aioice takes from the module is here.
"""

from __future__ import annotations

import sys
import types
from typing import NoReturn


def is_mdns_hostname(name: str) -> bool:
    return False  # our candidates are addresses, never `.local` names


async def create_mdns_protocol() -> NoReturn:
    raise RuntimeError("mDNS candidates are not used: candidates carry addresses only")


def _mdns_stand_in() -> types.ModuleType:
    module = types.ModuleType("aioice.mdns", "Stand-in for aioice's mDNS module (overlay/transport/__init__.py).")
    vars(module).update(
        is_mdns_hostname=is_mdns_hostname,
        create_mdns_protocol=create_mdns_protocol,
        MDnsProtocol=object,  # named in aioice's annotations only
    )
    return module


if "aioice" not in sys.modules:
    sys.modules.setdefault("aioice.mdns", _mdns_stand_in())

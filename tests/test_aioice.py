"""aioice runs without its mDNS module and dnspython (overlay/transport/__init__.py): the stand-in answers every
name aioice takes from the module, and aioice takes our address candidates with it in place. Each check runs in
a fresh interpreter: the stand-in goes in only where the project is imported before aioice, as in a node."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_every_name_aioice_takes_from_its_mdns_module_is_in_the_stand_in() -> None:
    spec = importlib.util.find_spec("aioice")
    assert spec is not None and spec.submodule_search_locations
    used: set[str] = set()
    for path in Path(next(iter(spec.submodule_search_locations))).glob("*.py"):
        if path.name != "mdns.py":
            used |= set(re.findall(r"\bmdns\.([A-Za-z_]\w*)", path.read_text()))
    assert used, "aioice no longer names its mDNS module: the stand-in may go"
    code = (
        "import sys, overlay.transport.ice\n"
        "m = sys.modules['aioice.mdns']\n"
        f"print('Stand-in' in m.__doc__, sorted(n for n in {sorted(used)!r} if not hasattr(m, n)))"
    )
    assert run(code) == "True []"


@pytest.mark.parametrize(
    "imports",
    [
        "import overlay.transport.ice, overlay.transport.turn",  # a node with ICE and TURN configured
        "import overlay.check; overlay.check.binding_request(bytes(12))",  # `ipop-overlay check` asking STUN
    ],
)
def test_a_process_using_aioice_through_the_project_loads_no_dnspython(imports: str) -> None:
    assert run(f"import sys\n{imports}\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'dns'))") == "[]"


def test_address_candidates_are_taken_with_the_stand_in() -> None:
    code = """
import asyncio, sys
import overlay.transport
from aioice import Candidate, Connection

async def main():
    conn = Connection(ice_controlling=True)
    try:
        for host in ("198.18.0.7", "198.18.0.8"):
            await conn.add_remote_candidate(Candidate("1", 1, "udp", 100, host, 5800, "host"))
        await conn.add_remote_candidate(None)
        return [c.host for c in conn.remote_candidates]
    finally:
        await conn.close()

print(overlay.transport.is_mdns_hostname("abcd.local"), "dns" in sys.modules, asyncio.run(main()))
"""
    assert run(code) == "False False ['198.18.0.7', '198.18.0.8']"

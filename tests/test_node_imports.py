"""What a node's process imports: no importlib.metadata (with it `email`, `zipfile` and `csv`, 1.5 MB resident for
a node's life), and slixmpp's version from the stand-in (xmpp_bootstrap/_slixmpp_version.py) as its own module
would give it. Each check runs in a fresh interpreter, as a node starts."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_node_process_never_imports_importlib_metadata() -> None:
    # What `ipop-overlay join` imports before and while the node runs: the CLI's parser (its --version), the node
    # and its XMPP client, the compiled data path and the TAP.
    code = """
import sys
from overlay.cli import parser
parser().parse_args(["join", "--config", "node.toml"])
import overlay.run, xmpp_bootstrap, slixmpp, overlay.fastpath, overlay.tap.device, overlay.transport.ice
print(sorted(m for m in sys.modules if m.split(".")[0] in ("email", "zipfile", "csv") or m == "importlib.metadata"))
"""
    assert run(code) == "[]"


def test_slixmpp_gets_its_version_from_the_stand_in_as_from_its_metadata() -> None:
    code = """
import sys
import xmpp_bootstrap
import slixmpp
import importlib.metadata
stand_in = "Stand-in" in sys.modules["slixmpp.version"].__doc__
print(stand_in, slixmpp.__version__ == importlib.metadata.version("slixmpp"),
      slixmpp.__version_info__ == tuple(int(p) for p in slixmpp.__version__.split(".")[:3]))
"""
    assert run(code) == "True True True"


def test_slixmpp_takes_from_its_version_module_only_what_the_stand_in_has() -> None:
    spec = importlib.util.find_spec("slixmpp")
    assert spec is not None and spec.submodule_search_locations
    taken: set[str] = set()
    root = Path(next(iter(spec.submodule_search_locations)))
    for path in root.rglob("*.py"):
        if path == root / "version.py":
            continue
        text = path.read_text(errors="replace")
        relative = r"|\." if path.parent == root else ""  # `.version` elsewhere is another package's module
        for names in re.findall(rf"from (?:slixmpp{relative})\.version import ([\w, ]+)", text):
            taken |= {n.strip() for n in names.split(",")}
        taken |= set(re.findall(r"\bslixmpp\.version\.(\w+)", text))
    assert taken, "slixmpp no longer imports its version module: the stand-in may go"
    assert taken <= {"__version__", "__version_info__"}, taken

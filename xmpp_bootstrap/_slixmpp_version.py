"""A stand-in for slixmpp's version module.

slixmpp sets its `__version__` at import through `importlib.metadata.version` (slixmpp/version.py), which
imports the `email` package, `zipfile` and `csv` to read its METADATA file: 1.5 MB resident in every node for a
string none of its uses reads (it names the version in XEP-0092 and XEP-0115 answers, plugins a node does not
load; one process with a node's imports, 2026-12-06: 34.5 MB against 33.0). This module's stand-in takes its
place, unless slixmpp was imported before the xmpp_bootstrap package (whose first import this is); it reads the
version from the name of slixmpp's `.dist-info` directory. tests/test_node_imports.py checks it against
importlib.metadata.
"""

import os
import sys
import types
from importlib.util import find_spec


def _slixmpp_version() -> str:
    spec = find_spec("slixmpp")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        site = os.path.dirname(next(iter(spec.submodule_search_locations)))
        with os.scandir(site) as entries:
            for entry in entries:
                name, _, rest = entry.name.partition("-")
                if name.lower() == "slixmpp" and rest.endswith(".dist-info"):
                    return rest.removesuffix(".dist-info")
    return "not-installed"  # what slixmpp says when it finds no metadata


def _version_stand_in() -> types.ModuleType:
    version = _slixmpp_version()
    module = types.ModuleType("slixmpp.version", "Stand-in: xmpp_bootstrap/_slixmpp_version.py")
    parts = version.split(".")[:3]
    info = tuple(int(p) for p in parts) if len(parts) == 3 and all(p.isdigit() for p in parts) else (0, 0, 0)
    vars(module).update(__version__=version, __version_info__=info)
    return module


if "slixmpp" not in sys.modules:
    sys.modules.setdefault("slixmpp.version", _version_stand_in())

"""Members remembered across restarts: a node that starts while its XMPP server is unreachable rejoins the
overlay through the members it last linked with (docs/operations.md, "Restarts without XMPP").

The state file lives next to the node's key (`node.key` -> `node.state`), holds at most MAX_REMEMBERED
members (node key and the UDP endpoint the link used), and is written atomically with mode 0600: a torn or
world-readable file must not be what a restart finds. A contact is a hint, never trust: the link to it is a
Noise handshake like any other, and with certificates the peer must still present a valid one.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from overlay.wire import Endpoint

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Our choice: the ring neighbours and long links of one node (a dozen); any one that answers brings us back.
MAX_REMEMBERED = 16
SAVE_FIRST = 5.0  # our choice: a first look once the join's links are up (a ring forms in 1-2 s)
SAVE_INTERVAL = 30.0  # our choice: a crash loses at most this much of a change in the link set


class StateError(ValueError):
    """The state file is unreadable or malformed (one line, naming the file)."""


@dataclass(frozen=True)
class Remembered:
    public_key: bytes  # the member's Ed25519 node key
    endpoint: Endpoint  # where its link's packets went (its address as we saw it)


def state_path(key: Path) -> Path:
    return key.with_suffix(".state")


def encode(contacts: list[Remembered]) -> bytes:
    doc = {
        "version": STATE_VERSION,
        "contacts": [
            {"key": base64.b64encode(c.public_key).decode(), "endpoint": [c.endpoint[0], c.endpoint[1]]}
            for c in contacts[:MAX_REMEMBERED]
        ],
    }
    return json.dumps(doc, indent=1).encode()


def decode(data: bytes) -> list[Remembered]:
    """The contacts of a state file; StateError for anything but what `encode` writes."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise StateError("not a state file of this version")
        out = []
        for item in doc["contacts"][:MAX_REMEMBERED]:
            key = base64.b64decode(item["key"], validate=True)
            host, port = item["endpoint"]
            ipaddress.ip_address(host)
            if len(key) != 32 or not isinstance(port, int) or not 0 < port < 65536:
                raise StateError("a contact with a bad key or port")
            out.append(Remembered(key, (host, port)))
        return out
    except StateError:
        raise
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError) as e:
        raise StateError(f"malformed: {e}") from None


def load(path: Path) -> list[Remembered]:
    """The contacts remembered in `path`; [] when there is no file, and [] with a warning when it is unusable
    (the node then waits for XMPP as on a first start)."""
    try:
        return decode(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, StateError) as e:
        log.warning("state file %s not used: %s", path, e)
        return []


def save(path: Path, contacts: list[Remembered]) -> None:
    write_private(path, encode(contacts))


def write_private(path: Path, data: bytes) -> None:
    """Write atomically: a temporary file (0600) in the same directory, flushed, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # O_CREAT's mode is masked by the umask and ignored for an existing file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

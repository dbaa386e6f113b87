"""The control socket: a Unix stream socket where `ipop-overlay status` asks the running node about itself.

Protocol: one JSON object per line each way, {"cmd": "status"} -> the node's status object (or
{"error": "..."}). The socket file is mode 0600 (status shows peers and endpoints) and is removed on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_REQUEST = 4096


class ControlError(Exception):
    """One line: the socket path and what went wrong."""


def socket_in_use(path: Path) -> bool:
    """True when a process answers on the socket (so a second node must not take the path)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Callable[[], dict[str, Any]]]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self.path.exists():
            if socket_in_use(self.path):
                raise ControlError(
                    f"control socket {self.path} is in use: is another node running with it? set [node] control_socket"
                )
            self.path.unlink()  # left by a node that died without cleaning up
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            old = os.umask(0o177)
            try:
                self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
            finally:
                os.umask(old)
        except OSError as e:
            raise ControlError(f"cannot create control socket {self.path}: {e.strerror}") from None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5.0)
            try:
                request = json.loads(line[:MAX_REQUEST])
                handler = self.handlers[request["cmd"]]
                reply = handler()
            except (ValueError, KeyError, TypeError):
                reply = {"error": f"unknown request; known: {', '.join(sorted(self.handlers))}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def query(path: Path, cmd: str = "status", timeout: float = 5.0) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except FileNotFoundError:
        raise ControlError(
            f"no node is running with control socket {path} (start one with "
            f"'ipop-overlay join --config FILE', or pass --control PATH)"
        ) from None
    except OSError as e:
        raise ControlError(f"cannot talk to the node at {path}: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ControlError(f"the node at {path} sent an unreadable answer") from None
    if "error" in reply:
        raise ControlError(f"the node at {path} says: {reply['error']}")
    return reply

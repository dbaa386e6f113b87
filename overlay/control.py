"""The control socket: a Unix stream socket where `ipop-overlay status` asks the running node about itself.

Protocol: one JSON object per line each way, {"cmd": "status"} -> the node's status object (or
{"error": "..."}). A streamed command ({"cmd": "graph", "timeout": 30}) answers with several lines, progress
first, the last one holding "result". The socket file is mode 0600 (status shows peers and endpoints) and is
removed on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
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


Stream = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


class ControlServer:
    def __init__(
        self,
        path: Path,
        handlers: dict[str, Callable[[], dict[str, Any]]],
        streams: dict[str, Stream] | None = None,
    ) -> None:
        self.path = path
        self.handlers = handlers
        self.streams = streams or {}
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
                cmd = request["cmd"]
                stream, handler = self.streams.get(cmd), self.handlers.get(cmd)
                if stream is None and handler is None:
                    raise KeyError(cmd)
            except (ValueError, KeyError, TypeError):
                known = sorted([*self.handlers, *self.streams])
                reply = {"error": f"unknown request; known: {', '.join(known)}"}
            else:
                if stream is not None:
                    try:
                        parts = stream(request)
                    except ValueError as e:  # the request's parameters, named by the command
                        reply = {"error": str(e)}
                    else:
                        async for part in parts:
                            writer.write(json.dumps(part).encode() + b"\n")
                            await writer.drain()
                        return
                else:
                    assert handler is not None
                    reply = handler()
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
    """One request, one answer."""
    for reply in stream(path, {"cmd": cmd}, timeout):
        return reply
    raise ControlError(f"the node at {path} closed the connection without an answer")


def stream(path: Path, request: dict[str, Any], timeout: float = 5.0) -> Iterator[dict[str, Any]]:
    """The answers to `request`, one JSON object per line, as they come (`timeout` bounds each wait)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
            s.sendall(json.dumps(request).encode() + b"\n")
        except FileNotFoundError:
            raise ControlError(
                f"no node is running with control socket {path} (start one with "
                f"'ipop-overlay join --config FILE', or pass --control PATH)"
            ) from None
        except OSError as e:
            raise ControlError(f"cannot talk to the node at {path}: {e.strerror or e}") from None
        buffer = b""
        while True:
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield _reply(path, line)
            try:
                chunk = s.recv(65536)
            except OSError as e:
                raise ControlError(f"cannot talk to the node at {path}: {e.strerror or e}") from None
            if not chunk:
                if buffer.strip():
                    yield _reply(path, buffer)
                return
            buffer += chunk
    finally:
        s.close()


def _reply(path: Path, line: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlError(f"the node at {path} sent an unreadable answer") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the node at {path} sent an unreadable answer")
    if "error" in reply:
        raise ControlError(f"the node at {path} says: {reply['error']}")
    return reply

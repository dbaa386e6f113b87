"""Probes of NAT and TURN behaviour from inside lab namespaces: STUN mappings, UDP filtering, TURN relaying.

A probe is an agent process (`python -m tests.support.natlab agent ADDR:PORT`) in a host's namespace that
holds one UDP socket and, on request, one TURN allocation made with aioice. The test drives it with one
JSON line per command on its stdin and reads one JSON line back. One socket for every step matters: a NAT's
mapping and filtering belong to the socket's address and port (RFC 4787 §4, §5), so the agent must not open
a new one between the two STUN requests, or between an unsolicited datagram and the reply.

`python -m tests.support.natlab stun ADDR:PORT...` is the one-shot form: one Binding request per server
(RFC 8489 §6) from one socket, retransmitted until answered or the deadline; it prints the mappings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from aioice import stun
from aioice.turn import TurnTransport, create_turn_endpoint

from tests.support.netlab import Host, NetLab

REPO = Path(__file__).resolve().parents[2]
Address = tuple[str, int]

# NAT kinds by what one socket's mappings show (RFC 4787 §4.1 names the mapping behaviours).
PUBLIC = "public"  # every server saw the socket's own address: no NAT
ENDPOINT_INDEPENDENT = "endpoint-independent"  # one mapping, whatever the destination
SYMMETRIC = "symmetric"  # the mapping changes with the destination (address- and port-dependent)

# Our choice: lab round trips are well under 1 ms, so an unanswered Binding request is sent again after
# 100 ms (RFC 8489 §6.2.1 starts at 500 ms for the Internet); a server still starting is asked until the deadline.
STUN_RETRANSMIT_S = 0.1
# Our choice: how long the driving side waits for an agent's answer beyond the command's own duration.
AGENT_SLACK_S = 5.0
# Our choice: deleting a TURN allocation at the end waits at most this long (the server frees it on expiry).
TURN_CLOSE_S = 2.0


def classify(local: Address, mapped: Sequence[Address]) -> str:
    """The NAT kind from one socket's mappings as seen by two or more STUN servers at different addresses."""
    if len(mapped) < 2:
        raise ValueError(f"classifying a NAT needs mappings from two or more servers, got {len(mapped)}")
    if all(m == local for m in mapped):
        return PUBLIC
    if len(set(mapped)) == 1:
        return ENDPOINT_INDEPENDENT
    return SYMMETRIC


@dataclass(frozen=True, slots=True)
class NatProbe:
    """One socket's own address and the mapped address each STUN server reported, in the servers' order."""

    local: Address
    mapped: tuple[Address, ...]

    @property
    def kind(self) -> str:
        return classify(self.local, self.mapped)


@dataclass(frozen=True, slots=True)
class Datagram:
    data: bytes
    source: Address


# Put in the relay queue when a send through the allocation fails, so a waiting turn_recv wakes up.
_WAKE = Datagram(b"", ("", 0))


def parse_address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {text!r} must be IPv4:PORT")
    return host, int(port)


# -- inside the namespace ---------------------------------------------------------------------------------


class _RelayReceiver(asyncio.DatagramProtocol):
    """What arrives through the TURN allocation, and the errors aioice reports for its sends."""

    def __init__(self, inbox: asyncio.Queue[Datagram], errors: list[str]) -> None:
        self.inbox = inbox
        self.errors = errors
        self.closed = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.inbox.put_nowait(Datagram(data, (addr[0], addr[1])))

    def error_received(self, exc: Exception) -> None:
        self.errors.append(f"{type(exc).__name__}: {exc}")
        self.inbox.put_nowait(_WAKE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


class _Agent:
    """One UDP socket and at most one TURN allocation; every command is answered with a dict."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox: asyncio.Queue[Datagram] = asyncio.Queue()
        # Every Binding transaction we started: a late answer to a retransmitted request must not be taken
        # for a datagram from a peer, so ids are kept after their answer.
        self.transactions: dict[bytes, asyncio.Future[stun.Message]] = {}
        self.turn: TurnTransport | None = None
        self.relayed: asyncio.Queue[Datagram] = asyncio.Queue()
        self.turn_errors: list[str] = []
        self.receiver = _RelayReceiver(self.relayed, self.turn_errors)

    def readable(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError:
                continue  # a pending socket error (an ICMP report), cleared by this read: not a datagram
            try:
                message = stun.parse_message(data)
            except ValueError:
                message = None
            if message is not None and message.transaction_id in self.transactions:
                future = self.transactions[message.transaction_id]
                if not future.done():
                    future.set_result(message)
                continue
            self.inbox.put_nowait(Datagram(data, (addr[0], addr[1])))

    async def mapped_address(self, server: Address, deadline: float) -> Address:
        """XOR-MAPPED-ADDRESS of a Binding request (RFC 8489 §14.2), retransmitted with one transaction id."""
        loop = asyncio.get_running_loop()
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        answer: asyncio.Future[stun.Message] = loop.create_future()
        self.transactions[request.transaction_id] = answer
        while not answer.done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no STUN Binding answer from {server[0]}:{server[1]}")
            self.sock.sendto(bytes(request), server)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(answer), min(STUN_RETRANSMIT_S, left))
        response = answer.result()
        if response.message_class != stun.Class.RESPONSE or "XOR-MAPPED-ADDRESS" not in response.attributes:
            raise ValueError(f"STUN server {server[0]}:{server[1]} answered without a mapping: {response}")
        ip, port = response.attributes["XOR-MAPPED-ADDRESS"]
        return str(ip), int(port)

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "stun":
            deadline = time.monotonic() + float(command.get("timeout", 3.0))
            mapped = [await self.mapped_address(_addr(s), deadline) for s in command["servers"]]
            return {"local": list(self.sock.getsockname()), "mapped": [list(m) for m in mapped]}
        if op == "send":
            for n in range(int(command.get("count", 1))):
                if n:
                    await asyncio.sleep(float(command.get("interval", 0.0)))
                self.sock.sendto(command["data"].encode("latin-1"), _addr(command["to"]))
            return {"sent": int(command.get("count", 1))}
        if op == "recv":
            return {"received": await _collect(self.inbox, command)}
        if op == "turn_allocate":
            return await self.allocate(command)
        if op == "turn_send":
            if self.turn is None:
                raise ValueError("turn_send before turn_allocate")
            # TurnTransport.sendto runs the send in a task of its own, binding a channel (and with it a
            # permission, RFC 8656 §12) before the first datagram to a new peer: wait for that task, so the
            # permission exists, or its error is recorded, when this command answers.
            before = asyncio.all_tasks()
            self.turn.sendto(command["data"].encode("latin-1"), _addr(command["to"]))
            sends = asyncio.all_tasks() - before
            if sends:
                await asyncio.wait(sends, timeout=float(command.get("timeout", 5.0)))
            return {"sent": 1, "errors": list(self.turn_errors)}
        if op == "turn_recv":
            received = await _collect(self.relayed, command, stop=lambda: bool(self.turn_errors))
            return {"received": received, "errors": list(self.turn_errors)}
        raise ValueError(f"unknown command {op!r}")

    async def allocate(self, command: dict[str, Any]) -> dict[str, Any]:
        """An allocation with aioice's client (RFC 8656 §7), over UDP or TCP, with long-term credentials."""
        if self.turn is not None:
            raise ValueError("this agent already holds a TURN allocation")
        transport, _ = await asyncio.wait_for(
            create_turn_endpoint(
                lambda: self.receiver,
                _addr(command["server"]),
                command["username"],
                command["password"],
                transport=command.get("transport", "udp"),
            ),
            float(command.get("timeout", 5.0)),
        )
        self.turn = transport
        relayed = transport.get_extra_info("sockname")
        mapped = transport.get_extra_info("related_address")
        return {"relayed": list(relayed), "mapped": list(mapped)}

    async def close(self) -> None:
        if self.turn is not None:
            # A Refresh with lifetime 0 deletes the allocation (RFC 8656 §8); aioice then closes its socket.
            self.turn.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.receiver.closed.wait(), TURN_CLOSE_S)
        self.sock.close()


def _addr(value: Sequence[Any]) -> Address:
    return str(value[0]), int(value[1])


async def _collect(
    queue: asyncio.Queue[Datagram], command: dict[str, Any], stop: Callable[[], bool] = lambda: False
) -> list[dict[str, Any]]:
    """Datagrams from `queue` until `count` have come (when given), `stop()` is true, or `seconds` pass."""
    deadline = time.monotonic() + float(command["seconds"])
    count = command.get("count")
    got: list[dict[str, Any]] = []
    while (count is None or len(got) < count) and not stop():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            d = await asyncio.wait_for(queue.get(), left)
        except TimeoutError:
            break
        if d is not _WAKE:
            got.append({"data": d.data.decode("latin-1"), "from": list(d.source)})
    return got


def _bound_socket(bind: Address) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(bind)
    sock.setblocking(False)
    return sock


async def _serve(bind: Address) -> None:
    loop = asyncio.get_running_loop()
    agent = _Agent(_bound_socket(bind))
    loop.add_reader(agent.sock.fileno(), agent.readable)
    print(json.dumps({"ready": True, "local": list(agent.sock.getsockname())}), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            try:
                reply = await agent.handle(json.loads(line))
            except (OSError, TimeoutError, ValueError, KeyError, ConnectionError, stun.TransactionError) as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
    finally:
        loop.remove_reader(agent.sock.fileno())
        await agent.close()


async def _probe(bind: Address, servers: Sequence[Address], timeout: float) -> NatProbe:
    loop = asyncio.get_running_loop()
    agent = _Agent(_bound_socket(bind))
    loop.add_reader(agent.sock.fileno(), agent.readable)
    try:
        deadline = time.monotonic() + timeout
        mapped = tuple([await agent.mapped_address(s, deadline) for s in servers])
        local = agent.sock.getsockname()
        return NatProbe((local[0], local[1]), mapped)
    finally:
        loop.remove_reader(agent.sock.fileno())
        await agent.close()


def probe_here(servers: Sequence[Address], *, bind: Address = ("0.0.0.0", 0), timeout: float = 3.0) -> NatProbe:
    """Binding requests to each server from one socket in this process's own namespace."""
    return asyncio.run(_probe(bind, servers, timeout))


def probe_argv(servers: Sequence[Address], *, bind: Address, timeout: float) -> list[str]:
    """The command line of the one-shot probe, to run inside a namespace (prints NatProbe as JSON)."""
    return [sys.executable, "-m", "tests.support.natlab", "stun", "--bind", f"{bind[0]}:{bind[1]}",
            "--timeout", f"{timeout:g}", *(f"{ip}:{port}" for ip, port in servers)]  # fmt: skip


# -- driving it from the test ------------------------------------------------------------------------------


def probe_nat(lab: NetLab, host: Host, servers: Sequence[Address], *, timeout: float = 3.0) -> NatProbe:
    """From one UDP socket in `host`'s namespace, the mapping each STUN server reports."""
    out = lab.run(host, *probe_argv(servers, bind=(host.address, 0), timeout=timeout), cwd=REPO,
                  timeout=timeout + AGENT_SLACK_S)  # fmt: skip
    result = json.loads(out.stdout)
    return NatProbe(_addr(result["local"]), tuple(_addr(m) for m in result["mapped"]))


class NatAgent:
    """A probe process with one UDP socket bound in `host`'s namespace; a context manager.

    Commands wait for the agent's answer (bounded); an agent that reports an error raises RuntimeError.
    """

    def __init__(self, lab: NetLab, host: Host, *, port: int = 0) -> None:
        self.host = host
        self._stderr = tempfile.TemporaryFile()
        self.process = lab.popen(
            host, sys.executable, "-m", "tests.support.natlab", "agent", f"{host.address}:{port}",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, cwd=REPO, bufsize=0,
        )  # fmt: skip
        self._buffer = b""
        ready = self._read_line(AGENT_SLACK_S)
        self.local: Address = _addr(ready["local"])

    def __enter__(self) -> NatAgent:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _read_line(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(
                    f"agent in {self.host.name} did not answer within {timeout:.1f} s{self._stderr_tail()}"
                )
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"agent in {self.host.name} exited {self.process.poll()}{self._stderr_tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return f": {text[-600:]}" if text else ""

    def request(self, op: str, *, duration: float = 0.0, **fields: Any) -> dict[str, Any]:
        """Send one command and return the agent's answer; `duration` is how long the command itself runs."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        reply = self._read_line(duration + AGENT_SLACK_S)
        if "error" in reply:
            raise RuntimeError(f"agent in {self.host.name}: {op} failed: {reply['error']}")
        return reply

    def stun(self, servers: Sequence[Address], *, timeout: float = 3.0) -> NatProbe:
        reply = self.request("stun", duration=timeout, servers=[list(s) for s in servers], timeout=timeout)
        return NatProbe(_addr(reply["local"]), tuple(_addr(m) for m in reply["mapped"]))

    def send(self, to: Address, data: bytes, *, count: int = 1, interval: float = 0.0) -> None:
        self.request("send", duration=count * interval, to=list(to), data=data.decode("latin-1"), count=count,
                     interval=interval)  # fmt: skip

    def recv(self, seconds: float, *, count: int | None = None) -> list[Datagram]:
        """Datagrams that reached the socket (unread ones since the last call first), until `count` or `seconds`."""
        reply = self.request("recv", duration=seconds, seconds=seconds, count=count)
        return [_datagram(d) for d in reply["received"]]

    def turn_allocate(
        self, server: Address, username: str, password: str, *, transport: str = "udp", timeout: float = 5.0
    ) -> tuple[Address, Address]:
        """A TURN allocation through aioice's create_turn_endpoint: (relayed address, mapped address)."""
        reply = self.request("turn_allocate", duration=timeout, server=list(server), username=username,
                             password=password, transport=transport, timeout=timeout)  # fmt: skip
        return _addr(reply["relayed"]), _addr(reply["mapped"])

    def turn_send(self, to: Address, data: bytes, *, timeout: float = 5.0) -> None:
        """Send through the allocation and wait until it left; for a new peer aioice binds a channel first,
        which installs a permission for the peer's IP (RFC 8656 §12). Errors come back from turn_recv."""
        self.request("turn_send", duration=timeout, to=list(to), data=data.decode("latin-1"), timeout=timeout)

    def turn_recv(self, seconds: float, *, count: int | None = None) -> tuple[list[Datagram], list[str]]:
        """Datagrams relayed to us and the errors of our sends, until `count`, the first error, or `seconds`."""
        reply = self.request("turn_recv", duration=seconds, seconds=seconds, count=count)
        return [_datagram(d) for d in reply["received"]], list(reply["errors"])

    def close(self) -> None:
        """Close stdin: the agent deletes its allocation and exits; killed if it does not within the bound."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=TURN_CLOSE_S + 1)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


def _datagram(d: dict[str, Any]) -> Datagram:
    return Datagram(d["data"].encode("latin-1"), _addr(d["from"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.natlab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    agent = commands.add_parser("agent", help="serve JSON-line commands on one UDP socket bound to ADDR:PORT")
    agent.add_argument("bind", type=parse_address)
    probe = commands.add_parser("stun", help="print the mapping each STUN server reports for one socket")
    probe.add_argument("servers", nargs="+", type=parse_address)
    probe.add_argument("--bind", type=parse_address, default=("0.0.0.0", 0))
    probe.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.command == "agent":
        asyncio.run(_serve(args.bind))
        return 0
    try:
        result = probe_here(args.servers, bind=args.bind, timeout=args.timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        print(f"natlab stun: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"local": list(result.local), "mapped": [list(m) for m in result.mapped]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

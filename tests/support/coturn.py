"""A throw-away coturn for tests: STUN (RFC 8489) and TURN (RFC 8656) from one `turnserver` process with
explicit options, its own files in a work dir, started inside a lab namespace and stopped by its PID.

Debian's coturn 4.6.1 reads /etc/turnserver.conf, and opens (creating it if need be) the SQLite user database
/var/lib/turn/turndb, unless told otherwise: `-n` with `-c` naming an empty file in the work dir keeps it off
the system config, and `--db` gives it a database of its own. Without `--log-file` it picks a log file in
/var/log or /tmp by itself, and without `--pidfile` it writes /var/run/turnserver.pid.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.support.natlab import REPO, Address, probe_argv, probe_here

PORT = 3478  # RFC 8489 §18.6 / RFC 8656 §19: the default port for STUN and TURN over UDP and TCP
TLS_PORT = 5349  # RFC 8489 §18.6 / RFC 8656 §19: the default port for STUN and TURN over TLS
USERNAME = "u"
PASSWORD = "p"
REALM = "lab.test"
# coturn's own default range (RFC 6335's dynamic ports). Every node holds an allocation per listener it is given
# (UDP and TCP: two), so bench/scale.py's 100 nodes need 200 relay ports; with 64 of them (this lab's range
# until 2026-12-07) 39 of 100 nodes had no relayed candidate ("508 Cannot create socket") and asked again
# every 30 s, which no deployment with coturn's defaults would see.
MIN_RELAY_PORT = 49152
MAX_RELAY_PORT = 65535
# Our choice: it answered within ~0.2 s here; a loaded 2-core box gets much more.
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
ALL_IPV4 = "0.0.0.0-255.255.255.255"
ALL_IPV6 = "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def peer_range(network: str) -> str:
    """A CIDR network as coturn's `first-last` peer address range."""
    net = ipaddress.ip_network(network)
    return f"{net.network_address}-{net.broadcast_address}"


class CoturnServer:
    """One `turnserver` on `addresses` (UDP and TCP, port `port`; TLS on `tls_port` when given a certificate),
    long-term credentials, no DTLS, no CLI.

    `start()`/`stop()`, or a context manager. A namespace deleted under a running server does not stop it:
    whoever starts one stops it.

    It relays only to `allowed_peers` (CIDR networks): coturn 4.6.1 by itself refuses loopback peers and
    allows everything else, including the private and benchmarking ranges, so the lab denies every address
    and allows back the lab's public segment. Relayed traffic then cannot leave the lab even by mistake.
    """

    def __init__(
        self,
        workdir: Path,
        addresses: Sequence[str],
        *,
        allowed_peers: Sequence[str],
        netns: str | None = None,
        port: int = PORT,
        username: str = USERNAME,
        password: str = PASSWORD,
        realm: str = REALM,
        relay_threads: int = 1,
        tls: tuple[Path, Path] | None = None,
        tls_port: int = TLS_PORT,
        loopback_peers: bool = False,
    ) -> None:
        if not addresses:
            raise ValueError("coturn needs at least one listening address")
        self.workdir = Path(workdir).resolve()
        self.addresses = list(addresses)
        self.allowed_peers = list(allowed_peers)
        self.netns = netns
        self.port = port
        self.username = username
        self.password = password
        self.realm = realm
        self.relay_threads = relay_threads
        self.tls = tls  # (certificate, private key) in PEM: also listen for TURN over TLS on `tls_port`
        self.tls_port = tls_port
        self.loopback_peers = loopback_peers  # relay between allocations on 127.0.0.1 (a test with no namespaces)
        self.log_file = self.workdir / "turnserver.log"
        self.pid_file = self.workdir / "turnserver.pid"
        self._stdout = self.workdir / "turnserver.stdout"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> CoturnServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def servers(self) -> list[Address]:
        """(address, port) of every listener: STUN and TURN share it, over UDP and TCP."""
        return [(a, self.port) for a in self.addresses]

    def url(self, transport: str = "udp", index: int = 0) -> str:
        """A TURN URI (RFC 7065) for the listener `index`: `turn:ADDR:PORT?transport=udp`."""
        return f"turn:{self.addresses[index]}:{self.port}?transport={transport}"

    def argv(self) -> list[str]:
        w = self.workdir
        argv = ["turnserver", "-n", "-c", str(w / "empty.conf")]
        for address in self.addresses:
            argv += ["--listening-ip", address]
        argv += [
            "--listening-port", str(self.port),
            "--relay-threads", str(self.relay_threads),
            "--lt-cred-mech", "--user", f"{self.username}:{self.password}", "--realm", self.realm,
            "--no-dtls", "--no-cli",
            # With two listening addresses coturn turns on RFC 5780 NAT discovery, which also listens on
            # port+1 and answers from other addresses; the lab measures NAT behaviour with plain Binding.
            "--no-rfc5780",
            "--min-port", str(MIN_RELAY_PORT), "--max-port", str(MAX_RELAY_PORT),
            "--db", str(w / "turndb"),
            "--log-file", str(self.log_file), "--simple-log", "--no-stdout-log",
            "--pidfile", str(self.pid_file),
            # Deny every peer, then allow the lab back: the allow list is checked first (coturn's
            # good_peer_addr), and without a deny list coturn would relay to any address it can route to.
            f"--denied-peer-ip={ALL_IPV4}", f"--denied-peer-ip={ALL_IPV6}",
        ]  # fmt: skip
        argv += [f"--allowed-peer-ip={peer_range(n)}" for n in self.allowed_peers]
        if self.loopback_peers:
            argv.append("--allow-loopback-peers")
        if self.tls is None:
            argv.append("--no-tls")
        else:
            cert, key = self.tls
            argv += ["--tls-listening-port", str(self.tls_port), "--cert", str(cert), "--pkey", str(key)]
        return argv

    def _wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def start(self) -> None:
        """Start `turnserver` and wait until every listener answers a STUN Binding request over UDP."""
        if self._proc is not None:
            raise RuntimeError("coturn is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "empty.conf").write_text("")
        out = open(self._stdout, "wb")
        # `ip netns exec` execs turnserver in place: the PID we hold is the server's own.
        self._proc = subprocess.Popen(
            self._wrap(self.argv()), cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
        out.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        if self.netns is None:
            try:
                probe_here(self.servers, bind=(self.addresses[0], 0), timeout=START_TIMEOUT_S)
            except TimeoutError as exc:
                raise RuntimeError(self._not_ready(str(exc))) from exc
            return
        argv = probe_argv(self.servers, bind=(self.addresses[0], 0), timeout=START_TIMEOUT_S)
        probe = subprocess.Popen(
            self._wrap(argv), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + START_TIMEOUT_S + 5
        try:
            while probe.poll() is None:
                if self._proc.poll() is not None:
                    raise RuntimeError(self._not_ready(f"turnserver exited {self._proc.returncode}"))
                if time.monotonic() > deadline:
                    raise RuntimeError(self._not_ready("the STUN probe did not finish"))
                time.sleep(0.05)
            if probe.returncode != 0:
                assert probe.stderr is not None
                raise RuntimeError(self._not_ready(probe.stderr.read().strip()))
        finally:
            if probe.poll() is None:
                probe.kill()
            probe.wait(timeout=5)
            if probe.stderr is not None:
                probe.stderr.close()

    def _not_ready(self, why: str) -> str:
        listeners = ", ".join(f"{a}:{p}" for a, p in self.servers)
        return f"coturn on {listeners} did not answer STUN within {START_TIMEOUT_S:.0f} s ({why})\n{self.log_tail()}"

    def log_tail(self, lines: int = 20) -> str:
        texts = []
        for path in (self.log_file, self._stdout):
            with contextlib.suppress(OSError):
                texts.append("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(t for t in texts if t) or "(no log)"

    def stop(self) -> None:
        """SIGTERM by PID (coturn exits on it at once), SIGKILL if it has not exited within the bound."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

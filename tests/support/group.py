"""A group of overlay nodes, each running the real `ipop-overlay` CLI in its own network namespace.

One lab (tests/support/netlab.py): a hub bridge, a namespace for the XMPP server (Prosody, or ejabberd with
`server="ejabberd"`: tests/support/prosody.py, tests/support/ejabberd.py), one namespace per node and,
on request, spare namespaces for nodes that are expected to fail. Accounts, the members-only room,
keys, passwords and configs are made here; nodes start one at a time so each one finds a running
group. Used by tests/test_e2e.py, scripts/demo.py and bench/iperf_tap.py. On exit every process this
module started is stopped by its PID and every namespace and file is removed.

On request, and only then: NAT clusters (members placed behind a cone or symmetric NAT, on a private LAN)
and a coturn (tests/support/coturn.py) on the public segment with two addresses, whose STUN and TURN
servers an `[ice]` section of each member's config can name.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from overlay.configvalues import resolve_address6
from overlay.control import ControlError, query
from overlay.identity import Identity
from overlay.ids import format_id, parse_id, ring_distance
from tests.support.certs import ServerFiles, make_server
from tests.support.coturn import CoturnServer
from tests.support.ejabberd import EjabberdServer, missing_ejabberd
from tests.support.netlab import Host, NetLab
from tests.support.prosody import ProsodyServer

REPO = Path(__file__).resolve().parents[2]
# Our choice: the virtual network of the example, used only inside lab namespaces.
VIRTUAL_NET = ipaddress.IPv4Network("10.254.0.0/16")
TAP_NAME = "ipop0"
VIRTUAL_MTU = 1400
XMPP_PORT = 5222
OVERLAY_PORT = 5800
PASSWORD = "lab-member-password"
ROOM = "group1"
TURN_USERNAME = "u"
TURN_PASSWORD = "p"
TURN_PASSWORD_FILE = "turn.pass"
# Our choice: a node that has not answered `status` within this long after starting is reported broken.
JOIN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
CLI_TIMEOUT_S = 10.0
# IPOP_LOG_LEVEL=debug makes every node log its link set-up and ICE steps (the logs stay with IPOP_KEEP_WORKDIR).
LOG_LEVEL = os.environ.get("IPOP_LOG_LEVEL", "info")
# The XMPP servers a group can run on, by the name Group(server=...) takes.
SERVERS: dict[str, type[ProsodyServer] | type[EjabberdServer]] = {"prosody": ProsodyServer, "ejabberd": EjabberdServer}


def cli_argv() -> list[str]:
    """The installed console script next to this interpreter, else the module (same code either way).

    Not the pyenv shim on PATH: that is a shell wrapper, one more process between us and the node's PID.
    """
    script = Path(sys.executable).parent / "ipop-overlay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "overlay.cli"]


def missing_prerequisites(server: str = "prosody") -> str | None:
    """Why a group on `server` cannot run on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces, TAP devices and Prosody (run_as_root) need root"
    for tool in ("prosody", "prosodyctl", "turnserver", "ip", "iptables", "ping", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (see the install scripts)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing: TAP devices are unavailable"
    if server == "ejabberd":
        return missing_ejabberd()
    return None


@dataclass
class Member:
    """One node of the group: its namespace, account, files and (while running) its process."""

    index: int
    host: Host
    user: str
    jid: str  # full JID with resource
    address: str  # virtual address with prefix, e.g. "10.254.0.1/16"
    directory: Path
    config: Path
    control: Path
    log: Path
    node_id: str = ""
    ip6: str | None = None  # virtual IPv6 address, without prefix (a group built with `address6`)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Group:
    """Context manager: an XMPP server and `size` member nodes (not yet started) in namespaces on one bridge.

    `server` picks the XMPP server: "prosody" (the default) or "ejabberd".

    `spares` extra namespaces, each with a registered member account, are for configs that should fail
    (`spare_config`, `run_join`); `outsiders` names accounts that exist but are not in the room.

    `clusters` maps a name to a NAT kind ("cone" or "symmetric", see tests/support/netlab.py) and
    `placement[i]` puts member i behind that NAT (None: on the public segment); such a member listens on its
    private address. `turn=True` starts coturn on the public segment and writes each member's `turn.pass`;
    `ice=True` also appends `ice_config` (the `[ice]` section naming coturn) to every member's config.
    """

    def __init__(
        self,
        size: int,
        *,
        spares: int = 0,
        outsiders: Iterable[str] = (),
        prefix: str = "ipg",
        workdir: Path | None = None,
        verbose: bool = False,
        clusters: Mapping[str, str] | None = None,
        placement: Sequence[str | None] | None = None,
        turn: bool = False,
        ice: bool = False,
        turn_tls: bool = False,
        node_extra: str = "",
        trust: bool = False,
        auto_address: Iterable[int] = (),
        server: str = "prosody",
        address6: str | None = None,
        python_path: Iterable[int] = (),
        lanes: int | None = None,
        mtu: int = 1500,
    ) -> None:
        if server not in SERVERS:
            raise ValueError(f"server {server!r} is not one of {', '.join(SERVERS)}")
        self.server_kind = server
        if not 1 <= size <= 200:
            raise ValueError(f"group size {size} must be between 1 and 200")
        self.clusters = dict(clusters or {})
        self.placement: list[str | None] = list(placement) if placement is not None else [None] * size
        if len(self.placement) != size:
            raise ValueError(f"placement names {len(self.placement)} places for a group of {size}")
        unknown = sorted({c for c in self.placement if c is not None} - set(self.clusters))
        if unknown:
            raise ValueError(f"placement names clusters {unknown} that are not in clusters={self.clusters}")
        if ice and not turn:
            raise ValueError("ice=True names the coturn servers: it needs turn=True")
        self.turn = turn
        self.ice = ice
        # coturn also listens for TLS, with a certificate from a CA of the lab's own, and `ice_config` names it
        # as the only TURN server: turns: with that CA as `ca_file`.
        self.turn_tls = turn_tls
        self.turn_ca: ServerFiles | None = None
        self.node_extra = node_extra  # TOML appended to every member's config (e.g. an [overlay] section)
        # With certificates: `group init` makes the group key, member 0 owns the room and is the issuer, every
        # config pins the key; members in `auto_address` leave [vnic] address out and get one from the issuer.
        self.trust = trust
        self.auto_address = set(auto_address)
        # An IPv6 prefix ("fd00:ab::/64") gives every member IPv6 inside the VPN: with certificates each config
        # names the prefix (the address is derived from the node's key), without them member i gets host i + 1.
        self.address6 = ipaddress.IPv6Network(address6) if address6 else None
        # Members whose data path is Python only ([vnic] fast_path = false): the compiled one's peers.
        self.python_path = set(python_path)
        self.lanes = lanes  # [vnic] lanes of every member; None: the config's default
        self.mtu = mtu  # of every link of the lab (hub, clusters, members' eth0)
        self.size = size
        self.spares = spares
        self.outsiders = list(outsiders)
        self.verbose = verbose
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ipop-group-")).resolve()
        self.lab = NetLab(prefix)
        self.server: ProsodyServer | EjabberdServer | None = None
        self.xmpp_host: Host | None = None
        self.coturn: CoturnServer | None = None
        self.turn_host: Host | None = None
        self.members: list[Member] = []
        self.spare_hosts: list[Host] = []
        # After close(): the ERROR, CRITICAL and traceback lines of the members' logs. A normal run has none;
        # leaving the group without an exception fails on any line not matching `expected_errors` (substrings a
        # test that provokes an error names, e.g. a revoked member's own report).
        self.log_problems: list[str] = []
        self.expected_errors: list[str] = []
        self.room = ""

    # -- set-up --------------------------------------------------------------------------------------

    def __enter__(self) -> Group:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        if exc_type is None:
            unexpected = [line for line in self.log_problems if not any(e in line for e in self.expected_errors)]
            assert not unexpected, "errors in node logs:\n" + "\n".join(unexpected[:20])

    def say(self, line: str) -> None:
        if self.verbose:
            print(f"[group] {line}", flush=True)

    def _build(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lab.add_hub(mtu=self.mtu)
        self.xmpp_host = self.lab.add_host("xmpp")
        self.say(f"lab {self.lab.tag}: hub bridge, {self.server_kind} at {self.xmpp_host.address}:{XMPP_PORT}")
        self.server = SERVERS[self.server_kind](
            self.workdir / self.server_kind, bind=self.xmpp_host.address, port=XMPP_PORT, netns=self.xmpp_host.netns
        )
        self.server.start()
        for name, kind in self.clusters.items():
            cluster = self.lab.add_cluster(name, kind)
            self.say(f"NAT cluster {name} ({kind}): LAN {cluster.subnet} behind {cluster.public_address}")
        if self.turn:
            self._start_coturn()
        if self.trust:
            out = subprocess.run(
                [*cli_argv(), "group", "init", "--out", str(self.group_dir)],
                capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
            )  # fmt: skip
            if out.returncode != 0:
                raise RuntimeError(f"ipop-overlay group init failed: {out.stderr.strip()}")
            self.say(f"group key {out.stdout.splitlines()[0]} in {self.group_dir}")
        for i in range(self.size):
            self.members.append(self._make_member(i))
        for i in range(self.spares):
            self.spare_hosts.append(self.lab.add_host(f"spare{i}"))
            self.server.register(f"spare{i}", PASSWORD)
        for name in self.outsiders:
            self.server.register(name, PASSWORD)
        room_members = [f"{m.user}@{self.server.domain}" for m in self.members]
        room_members += [f"spare{i}@{self.server.domain}" for i in range(self.spares)]
        owners = [room_members[0]] if self.trust else []
        self.room = self._create_room(ROOM, room_members, owners)
        self.say(f"{self.size} accounts, members-only room {self.room}")

    def _start_coturn(self) -> None:
        """coturn in its own namespace on the public segment, with two addresses (STUN needs two servers to
        tell an endpoint-independent mapping from a symmetric one), relaying only to public lab addresses."""
        self.turn_host = self.lab.add_host("turn")
        second = self.lab.add_address(self.turn_host)
        tls = None
        if self.turn_tls:
            self.turn_ca = make_server(self.workdir / "pki", [self.turn_host.address, second], label="coturn")
            tls = (self.turn_ca.cert, self.turn_ca.key)
        self.coturn = CoturnServer(
            self.workdir / "coturn",
            [self.turn_host.address, second],
            allowed_peers=[str(self.lab.public_subnet)],
            netns=self.turn_host.netns,
            username=TURN_USERNAME,
            password=TURN_PASSWORD,
            tls=tls,
        )
        self.coturn.start()
        what = "TURN over UDP, TCP and TLS" if tls else "TURN over UDP and TCP"
        self.say(f"coturn (STUN, {what}) at {self.turn_host.address} and {second}:{self.coturn.port}")

    @property
    def ice_config(self) -> str:
        """The `[ice]` section a member's config gets with `ice=True`: coturn's two STUN servers, and its TURN
        server over UDP (password inline) and over TCP (password in `turn.pass` beside the config); with
        `turn_tls`, its TURN server over TLS only, trusted through the lab's CA."""
        if self.coturn is None:
            raise ValueError("the group has no coturn: build it with turn=True")
        c = self.coturn
        stun = ", ".join(f'"{address}:{port}"' for address, port in c.servers)
        user = f'username = "{c.username}"'
        if self.turn_ca is not None:
            url = f"turns:{c.addresses[0]}:{c.tls_port}"
            return (
                "[ice]\n"
                f"stun = [{stun}]\n"
                f'turn = [{{ url = "{url}", {user}, password_file = "{TURN_PASSWORD_FILE}", '
                f'ca_file = "{self.turn_ca.ca}" }}]\n'
            )
        return (
            "[ice]\n"
            f"stun = [{stun}]\n"
            f'turn = [{{ url = "{c.url("udp")}", {user}, password = "{c.password}" }},\n'
            f'        {{ url = "{c.url("tcp")}", {user}, password_file = "{TURN_PASSWORD_FILE}" }}]\n'
        )

    def _write_secrets(self, directory: Path, password: str) -> None:
        (directory / "node.pass").write_text(password + "\n")
        os.chmod(directory / "node.pass", 0o600)
        if self.coturn is not None:
            (directory / TURN_PASSWORD_FILE).write_text(self.coturn.password + "\n")
            os.chmod(directory / TURN_PASSWORD_FILE, 0o600)

    def _make_member(self, i: int) -> Member:
        assert self.server is not None
        host = self.lab.add_host(f"node{i}", cluster=self.placement[i])
        user = f"node{i}"
        self.server.register(user, PASSWORD)
        directory = self.workdir / user
        directory.mkdir()
        address = f"{VIRTUAL_NET.network_address + i + 1}/{VIRTUAL_NET.prefixlen}"
        member = Member(
            index=i,
            host=host,
            user=user,
            jid=f"{user}@{self.server.domain}/lab",
            address=address,
            directory=directory,
            config=directory / "node.toml",
            control=directory / "node.sock",
            log=directory / "node.log",
        )
        member.node_id = self.keygen(directory / "node.key")
        if self.address6 is not None:
            member.ip6 = resolve_address6(self._address6_setting(i), int(member.node_id, 16)).split("/")[0]
        self._write_secrets(directory, PASSWORD)
        member.config.write_text(self.config_text(host, member.jid, address, member.control, extra=self.node_extra))
        return member

    def _address6_setting(self, i: int) -> str:
        assert self.address6 is not None
        if self.trust:
            return str(self.address6)
        return f"{self.address6.network_address + i + 1}/{self.address6.prefixlen}"

    @property
    def group_dir(self) -> Path:
        return self.workdir / "group"

    def _create_room(self, name: str, members: list[str], owners: list[str]) -> str:
        """Create the room from inside the server's namespace: the root namespace has no route to the lab."""
        assert self.server is not None and self.xmpp_host is not None
        s = self.server
        cls = type(s)
        script = (
            f"import asyncio, sys; from pathlib import Path; from {cls.__module__} import {cls.__name__}; "
            f"s = {cls.__name__}(Path({str(s.workdir)!r}), domain={s.domain!r}, bind={s.host!r}, "
            f"port={s.port}, netns={s.netns!r}); "
            f"print(asyncio.run(s.create_room({name!r}, {members!r}, owners={owners!r})))"
        )
        out = self.lab.run(self.xmpp_host, sys.executable, "-c", script, cwd=REPO, timeout=60)
        return out.stdout.strip().splitlines()[-1]

    def keygen(self, path: Path) -> str:
        """The key `ipop-overlay keygen` writes (same code, overlay.identity: tests/test_cli.py runs the command),
        without a process per member."""
        identity = Identity.generate()
        identity.save(path)
        return format_id(identity.node_id)

    def config_text(
        self,
        host: Host,
        jid: str,
        address: str,
        control: Path,
        *,
        password_file: str = "node.pass",
        extra: str = "",
    ) -> str:
        """A node config in the CLI's TOML format; `extra` is appended verbatim (for broken configs), after the
        `[ice]` section when the group was built with `ice=True`."""
        assert self.server is not None
        if self.ice:
            extra = self.ice_config + extra
        return (
            "[node]\n"
            'key = "node.key"\n'
            f'control_socket = "{control}"\n'
            f'listen = "{host.address}:{OVERLAY_PORT}"\n'
            "[xmpp]\n"
            f'jid = "{jid}"\n'
            f'password_file = "{password_file}"\n'
            f'host = "{self.server.host}"\n'
            f"port = {self.server.port}\n"
            f'room = "{self.room or ROOM + "@" + self.server.muc_domain}"\n'
            f'ca_file = "{self.server.ca_file}"\n'
            "[vnic]\n"
            f'name = "{TAP_NAME}"\n'
            + (f'address = "{address}"\n' if address and not self._auto(jid) else "")
            + (f'address6 = "{self._address6_setting(self._index(jid))}"\n' if self.address6 is not None else "")
            + f"mtu = {VIRTUAL_MTU}\n"
            + ("fast_path = false\n" if self._index(jid) in self.python_path else "")
            + (f"lanes = {self.lanes}\n" if self.lanes is not None else "")
            + self.group_section(jid)
            + extra
        )

    def group_section(self, jid: str) -> str:
        """The config's [group] (and for the issuer, [issuer]) part: this group runs without certificates;
        tests/test_trust_netns.py's group pins a key and names an issuer."""
        if not self.trust:
            return "[group]\nopen = true\n"
        text = f'[group]\npublic_key_file = "{self.group_dir / "group.pub"}"\n'
        if jid.startswith("node0@"):
            text += f'[issuer]\ngroup_key = "{self.group_dir / "group.key"}"\nsubnet = "{VIRTUAL_NET}"\n'
        return text

    @staticmethod
    def _index(jid: str) -> int:
        """Member i's account is node<i>; any other account (a spare's) gets 100 + the digits in its name."""
        user = jid.split("@")[0]
        digits = "".join(c for c in user if c.isdigit())
        return (0 if user.startswith("node") else 100) + int(digits or 0)

    def _auto(self, jid: str) -> bool:
        return any(jid.startswith(f"node{i}@") for i in self.auto_address)

    # -- running nodes --------------------------------------------------------------------------------

    def join(self, i: int, *, min_links: int | None = None, timeout: float = JOIN_TIMEOUT_S) -> Member:
        """Start node `i` and wait until its control socket answers and it has `min_links` links
        (default: 1 unless it is the only node running)."""
        m = self.members[i]
        if m.running:
            raise ValueError(f"node {i} is already running")
        others = sum(1 for x in self.members if x.running)
        need = (1 if others else 0) if min_links is None else min_links
        self.spawn(i)

        def ready() -> bool:
            if not m.running:
                raise RuntimeError(f"node {i} exited {self._returncode(m)} while joining:\n{self.log_tail(i)}")
            if not m.control.exists():
                return False
            try:
                return len(self.status(i)["links"]) >= need
            except (RuntimeError, KeyError, ValueError):
                return False

        if not self.wait_until(ready, timeout):
            raise RuntimeError(f"node {i} did not reach {need} link(s) within {timeout:.0f} s:\n{self.log_tail(i)}")
        self.say(f"node{i} {m.node_id} joined as {m.address} on {m.host.address}")
        return m

    def spawn(self, i: int) -> subprocess.Popen[bytes]:
        """Start node `i`'s `ipop-overlay join` process, its output appended to its log, and return at once."""
        m = self.members[i]
        with open(m.log, "ab") as log:
            m.process = self.lab.popen(
                m.host, *cli_argv(), "--log-level", LOG_LEVEL, "join", "--config", str(m.config),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        return m.process

    def join_all(self) -> None:
        for i in range(self.size):
            self.join(i)

    def kill_node(self, i: int) -> None:
        """SIGKILL node `i` by PID: no goodbye to its peers, its control socket file stays behind."""
        m = self.members[i]
        if m.process is None or not m.running:
            raise ValueError(f"node {i} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.process.pid, signal.SIGKILL)
        m.process.wait(timeout=STOP_TIMEOUT_S)
        self.say(f"node{i} killed")

    def restart_node(self, i: int, *, min_links: int | None = None, timeout: float = JOIN_TIMEOUT_S) -> Member:
        """Start node `i` again, after stop_node or kill_node, with the same config and key (same node ID)."""
        m = self.members[i]
        if m.running:
            raise ValueError(f"node {i} is still running: stop_node or kill_node it first")
        m.process = None
        return self.join(i, min_links=min_links, timeout=timeout)

    def stop_node(self, i: int) -> None:
        """SIGTERM node `i` by PID; it must exit 0 and leave neither its TAP nor its control socket."""
        m = self.members[i]
        assert m.process is not None, f"node {i} was never started"
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.process.pid, signal.SIGTERM)
        try:
            code = m.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            m.process.kill()
            m.process.wait(timeout=5)
            raise AssertionError(f"node {i} ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s:\n{self.log_tail(i)}") from None
        assert code == 0, f"node {i} exited {code} on SIGTERM:\n{self.log_tail(i)}"
        assert not self.tap_exists(m.host), f"node {i} left its TAP {TAP_NAME} behind in {m.host.netns}"
        assert not m.control.exists(), f"node {i} left its control socket {m.control} behind"
        self.say(f"node{i} stopped cleanly")

    def _returncode(self, m: Member) -> int | None:
        return None if m.process is None else m.process.poll()

    def log_tail(self, i: int, lines: int = 25) -> str:
        try:
            text = self.members[i].log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def cli(self, host: Host, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run `ipop-overlay ARGS` inside `host`'s namespace and wait (output captured, never raises)."""
        return self.lab.run(host, *cli_argv(), *args, check=False, timeout=timeout)

    def status(self, i: int) -> dict[str, Any]:
        """Node i's status straight from its control socket: what `ipop-overlay status --json` prints, without a
        process per look (the tests poll it; the CLI's own output is checked where a test runs it, e.g.
        `status_text`). RuntimeError when the node does not answer."""
        try:
            return query(self.members[i].control, timeout=CLI_TIMEOUT_S)
        except ControlError as exc:
            raise RuntimeError(f"status of node {i}: {exc}") from None

    def status_text(self, i: int) -> str:
        m = self.members[i]
        out = self.cli(m.host, "status", "--control", str(m.control))
        return out.stdout if out.returncode == 0 else f"(status exited {out.returncode}: {out.stderr.strip()})"

    # -- the network ----------------------------------------------------------------------------------

    def block_udp(self, i: int, j: int) -> None:
        """Drop UDP between nodes i and j (both directions); they can only talk through other nodes."""
        self.lab.block_udp(self.members[i].host, self.members[j].host)

    def block_udp_all(self, i: int, js: Iterable[int]) -> None:
        """Drop UDP between node i and each node of `js` (see NetLab.block_udp for members behind NATs)."""
        for j in js:
            if j != i:
                self.block_udp(i, j)

    def ping(self, i: int, j: int, *, count: int = 1, timeout: float = 2.0, v6: bool = False) -> bool:
        """Ping node j's virtual address (IPv6 with `v6`) from node i's namespace; True when any reply came back."""
        return self.ping_many([(i, j)], count=count, timeout=timeout, v6=v6)[(i, j)]

    def ping_many(
        self, pairs: Iterable[tuple[int, int]], *, count: int = 1, timeout: float = 2.0, v6: bool = False
    ) -> dict[tuple[int, int], bool]:
        """Ping several pairs at once (one `ping` process each); bounded by count and timeout."""
        procs = {}
        for i, j in pairs:
            target = self.members[j].ip6 if v6 else self.members[j].ip
            assert target is not None, f"node{j} has no IPv6 address: build the group with address6"
            family = ["-6"] if v6 else []
            argv = ["ping", *family, "-n", "-q", "-c", str(count), "-i", "0.2", "-W", f"{timeout:g}", target]
            procs[(i, j)] = subprocess.Popen(
                ["ip", "netns", "exec", self.members[i].host.netns, *argv],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        results = {}
        limit = time.monotonic() + count * 0.2 + timeout + 5
        for pair, p in procs.items():
            try:
                results[pair] = p.wait(timeout=max(0.1, limit - time.monotonic())) == 0
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                results[pair] = False
        return results

    def wait_for_pings(
        self, pairs: Iterable[tuple[int, int]], timeout: float, *, attempt_timeout: float = 1.0, v6: bool = False
    ) -> dict[tuple[int, int], float | None]:
        """Ping every pair until each has answered once or `timeout` passes.

        Returns, per pair, the seconds until its first reply (None if it never answered).
        """
        start = time.monotonic()
        waiting = list(pairs)
        answered: dict[tuple[int, int], float | None] = {p: None for p in waiting}
        while waiting:
            left = start + timeout - time.monotonic()
            if left <= 0:
                break
            results = self.ping_many(waiting, count=1, timeout=min(attempt_timeout, max(left, 0.2)), v6=v6)
            now = time.monotonic() - start
            for pair, ok in results.items():
                if ok:
                    answered[pair] = now
            waiting = [p for p in waiting if answered[p] is None]
            if waiting:
                time.sleep(0.1)
        return answered

    def running_pairs(self) -> list[tuple[int, int]]:
        alive = [m.index for m in self.members if m.running]
        return [(i, j) for i in alive for j in alive if i != j]

    def iperf3(
        self, a: int, b: int, seconds: float, *, v6: bool = False, port: int = 5201, streams: int = 1
    ) -> dict[str, Any]:
        """One iperf3 TCP run (of `streams` parallel streams) from node a to node b's virtual address (IPv6 with
        `v6`); its JSON report. Fails the test with iperf3's own words if the run does not complete."""
        target = self.members[b].ip6 if v6 else self.members[b].ip
        assert target is not None, f"node {b} has no IPv{6 if v6 else 4} address inside the VPN"
        server = self.lab.popen(
            self.members[b].host, "iperf3", "-s", "-1", "-p", str(port),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(0.5)
            client = self.lab.run(
                self.members[a].host, "iperf3", "-6" if v6 else "-4", "-c", target, "-p", str(port),
                "-t", f"{seconds:g}", "-P", str(streams), "-J", "--connect-timeout", "3000", check=False,
                timeout=seconds + 30,
            )  # fmt: skip
            assert client.returncode == 0, f"iperf3 node{a} -> node{b}: {client.stderr or client.stdout[-500:]}"
            report: dict[str, Any] = json.loads(client.stdout)
            assert report["start"]["connected"][0]["remote_host"] == target
            return report
        finally:
            server.wait(timeout=10)

    def link_row(self, status: dict[str, Any], j: int) -> dict[str, Any] | None:
        """`status`'s (of some node) row for its link to node j, direct or through a neighbour; None: no link."""
        peer = self.members[j].node_id
        return next((row for row in status["links"] if printed_id(row["peer_id"]) == peer), None)

    def direct_link(self, status: dict[str, Any], j: int) -> bool:
        """Whether `status` (of some node) shows a direct link (no relay) to node j."""
        row = self.link_row(status, j)
        return row is not None and row.get("relay") is None

    def overlay_path(self, statuses: dict[int, dict[str, Any]], src: int, dst: int) -> list[int] | None:
        """The members a packet from `src` to `dst` most likely crosses, read from `status` snapshots.

        A direct link ends the path; a link to `dst` tunnelled through a neighbour adds that neighbour; a
        neighbour directly linked to `dst` comes next (the neighbour-of-neighbour lookahead); otherwise the
        packet goes to the directly linked neighbour closest to `dst` on the ring (the greedy rule of
        overlay/routing/forwarding.py). None when no step gets closer.
        """
        by_id = {m.node_id: m.index for m in self.members}
        target = parse_id(self.members[dst].node_id)
        path, here = [src], src
        while here != dst:
            rows = statuses[here]["links"]
            direct = [
                by_id[printed_id(r["peer_id"])]
                for r in rows
                if r.get("relay") is None and printed_id(r["peer_id"]) in by_id
            ]
            tunnels = [r for r in rows if printed_id(r["peer_id"]) == self.members[dst].node_id and r.get("relay")]
            if dst in direct:
                step = dst
            elif tunnels and printed_id(tunnels[0]["relay"]) in by_id:
                path.append(by_id[printed_id(tunnels[0]["relay"])])
                step = dst
            elif two_hop := [n for n in direct if n in statuses and self.direct_link(statuses[n], dst)]:
                step = two_hop[0]
            else:
                here_d = ring_distance(parse_id(self.members[here].node_id), target)
                closer = [n for n in direct if ring_distance(parse_id(self.members[n].node_id), target) < here_d]
                if not closer:
                    return None
                step = min(closer, key=lambda n: ring_distance(parse_id(self.members[n].node_id), target))
                if step not in statuses:
                    return None
            path.append(step)
            here = step
        return path

    def tap_exists(self, host: Host) -> bool:
        return self.lab.run(host, "ip", "link", "show", TAP_NAME, check=False, timeout=10).returncode == 0

    # -- nodes that should fail -----------------------------------------------------------------------

    def spare_config(self, k: int, *, user: str, password: str = PASSWORD, extra: str = "") -> tuple[Path, Path]:
        """Write a config for an account in spare namespace k; returns (config, control socket path)."""
        assert self.server is not None
        host = self.spare_hosts[k]
        directory = self.workdir / f"spare{k}-{user}-{len(list(self.workdir.glob(f'spare{k}-*')))}"
        directory.mkdir()
        self.keygen(directory / "node.key")
        self._write_secrets(directory, password)
        control = directory / "node.sock"
        address = f"{VIRTUAL_NET.network_address + 200 + k}/{VIRTUAL_NET.prefixlen}"
        jid = f"{user}@{self.server.domain}/spare"
        config = directory / "node.toml"
        config.write_text(self.config_text(host, jid, address, control, extra=extra))
        return config, control

    def run_join(self, k: int, config: Path, *, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run `join` in spare namespace k to completion (for configs that must fail); bounded."""
        try:
            return self.cli(self.spare_hosts[k], "join", "--config", str(config), timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"join --config {config} was still running after {timeout:.0f} s") from exc

    # -- waiting and teardown -------------------------------------------------------------------------

    @staticmethod
    def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
        """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def close(self) -> None:
        """Stop nodes, the XMPP server and coturn (by PID), delete the namespaces and the work directory;
        idempotent."""
        # Nodes first (they leave the room while the server still runs), then it and coturn, then the namespaces.
        running = [m.process for m in self.members if m.running and m.process is not None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        for p in running:
            try:
                p.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.coturn is not None:
            self.coturn.stop()
            self.coturn = None
        self.lab.close()
        self.log_problems = [
            f"node{m.index}: {line}"
            for m in self.members
            if m.log.exists()
            for line in m.log.read_text(errors="replace").splitlines()
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")
        ]
        if self._own_workdir and not os.environ.get("IPOP_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)


def printed_id(value: Any) -> str:
    """Node IDs as the CLI prints them: 16 lowercase hex digits (status may carry them as ints)."""
    return f"{value:016x}" if isinstance(value, int) else str(value).lower()

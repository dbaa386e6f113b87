"""A throw-away Prosody server for tests: own CA, own config, own data dir, one child process.

Prosody from Debian reads /etc/prosody and listens on every address when started bare, so everything here goes
through an explicit `--config FILE` that binds c2s to one address and turns s2s, BOSH, websockets and every
component but MUC off.

What clients cost the server is counted by the server itself: a small plugin written next to the config
(`mod_stanza_counts`) counts every message/presence/iq stanza crossing a client stream, logins, bound sessions
and room occupants in Prosody's internal statistics, and `mod_http_openmetrics` serves them on 127.0.0.1 only
(inside the server's namespace when it has one). `counts()` reads them; `tests/test_scale.py` and
`bench/scale.py` divide them by the joins they caused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.stanza import Iq

MUC_OWNER_NS = "http://jabber.org/protocol/muc#owner"
MUC_ADMIN_NS = "http://jabber.org/protocol/muc#admin"
MUC_NS = "http://jabber.org/protocol/muc"
DATA_NS = "jabber:x:data"

# What a test module with a real Prosody declares: it is an integration test, and it needs root (Prosody runs
# with run_as_root) and the prosody binaries.
NEEDS_PROSODY = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="runs Prosody as root (run_as_root); run the suite as root"),
    pytest.mark.skipif(
        shutil.which("prosody") is None or shutil.which("prosodyctl") is None,
        reason="prosody is not installed (apt-get install prosody, with services blocked)",
    ),
]

ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-password"
START_TIMEOUT = 15.0
# Prosody's default HTTP port; inside the server's own namespace nothing else can hold it. Bound to 127.0.0.1.
METRICS_PORT = 5280
METRICS_TIMEOUT = 10.0

CONFIG_TEMPLATE = """\
-- Generated for one test run; see tests/support/prosody.py.
pidfile = "{workdir}/prosody.pid"
data_path = "{workdir}/data"
daemonize = false
run_as_root = true
admins = {{ "{admin}" }}
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{workdir}/prosody.log" }} }}

plugin_paths = {{ "{workdir}/plugins" }}
modules_enabled = {{ "saslauth"; "tls"; "disco"; "ping"; "roster"; "stanza_counts"; "http_openmetrics" }}
modules_disabled = {{ "s2s"; "s2s_auth_certs"; "offline"; "bosh"; "websocket" }}
-- Counters are read on request (each GET /metrics collects), never on a timer.
statistics = "internal"
statistics_interval = "manual"
authentication = "internal_hashed"
storage = "internal"
allow_registration = false
c2s_require_encryption = true

interfaces = {{ "{bind}" }}
local_interfaces = {{ "{bind}" }}
c2s_ports = {{ {port} }}
c2s_interfaces = {{ "{bind}" }}
c2s_direct_tls_ports = {{ }}
legacy_ssl_ports = {{ }}
s2s_ports = {{ }}
component_ports = {{ }}
http_ports = {{ {metrics_port} }}
http_interfaces = {{ "127.0.0.1" }}
https_ports = {{ }}

ssl = {{ key = "{workdir}/server.key"; certificate = "{workdir}/server.crt" }}

VirtualHost "{domain}"

Component "{muc_domain}" "muc"
    modules_enabled = {{ "stanza_counts" }}
    restrict_room_creation = "admin"
    muc_room_locking = false
    muc_room_default_public = false
    muc_room_default_history_length = 0
    muc_tombstones = false
"""

# Loaded globally and on the MUC component (for its occupant events). Prosody 0.12 has no stanza counter of its
# own; the `util.filters` hooks are the ones its mod_stanza_debug uses to log every stanza of a session.
STANZA_COUNTS_PLUGIN = """\
-- What clients cost the server, as Prosody statistics: c2s stanzas by direction and kind, logins, bound
-- sessions and room occupants (with their peaks). Written by tests/support/prosody.py.
module:set_global();

local filters = require "util.filters";

local stanzas = module:metric("counter", "stanzas", "", "c2s stanzas (message, presence, iq) by direction",
	{ "direction", "kind" });
local events = module:metric("counter", "events", "", "logins, resource binds/unbinds, room joins/leaves",
	{ "event" });
local current = module:metric("gauge", "current", "", "bound c2s sessions and room occupants now", { "what" });
local peak = module:metric("gauge", "peak", "", "most bound c2s sessions and room occupants at once", { "what" });

local KINDS = { message = true, presence = true, iq = true };
local now = { sessions = 0, occupants = 0 };
local highest = { sessions = 0, occupants = 0 };

local function counter(direction)
	return function(stanza, session)
		-- Stream negotiation (starttls, SASL, stream features) passes the same filter with its own namespace.
		if stanza and KINDS[stanza.name] and (stanza.attr.xmlns == nil or stanza.attr.xmlns == "jabber:client")
			and session.type and session.type:sub(1, 3) == "c2s" then
			stanzas:with_labels(direction, stanza.name):add(1);
		end
		return stanza;
	end
end
local count_in, count_out = counter("in"), counter("out");

local function init_session(session)
	-- Highest priority on the way in and lowest on the way out: count what crosses the client's stream.
	filters.add_filter(session, "stanzas/in", count_in, 100000);
	filters.add_filter(session, "stanzas/out", count_out, -100000);
end
filters.add_filter_hook(init_session);

function module.unload()
	filters.remove_filter_hook(init_session);
end

local function step(what, delta)
	now[what] = now[what] + delta;
	current:with_labels(what):set(now[what]);
	if now[what] > highest[what] then
		highest[what] = now[what];
		peak:with_labels(what):set(highest[what]);
	end
end

-- event -> counter label, and the gauge it moves by how much
local HOOKS = {
	["authentication-success"] = { "login" };
	["resource-bind"] = { "bind", "sessions", 1 };
	["resource-unbind"] = { "unbind", "sessions", -1 };
	["muc-occupant-joined"] = { "room_join", "occupants", 1 };
	["muc-occupant-left"] = { "room_leave", "occupants", -1 };
};

function module.add_host(host_module)
	for event, what in pairs(HOOKS) do
		host_module:hook(event, function()
			events:with_labels(what[1]):add(1);
			if what[2] then step(what[2], what[3]); end
		end);
	end
end
"""

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class ServerCounts:
    """Counters read from the server (`ProsodyServer.counts`); all since the server started."""

    stanzas_in: dict[str, int] = field(default_factory=dict)  # kind (message, presence, iq) -> from clients
    stanzas_out: dict[str, int] = field(default_factory=dict)  # kind -> to clients
    logins: int = 0  # successful SASL authentications
    binds: int = 0  # client sessions bound to a resource
    room_joins: int = 0  # occupants entering any room
    sessions: int = 0  # bound client sessions now
    occupants: int = 0  # room occupants now
    peak_sessions: int = 0
    peak_occupants: int = 0

    @property
    def stanzas(self) -> int:
        """Every message, presence and iq stanza that crossed a client stream, either way."""
        return sum(self.stanzas_in.values()) + sum(self.stanzas_out.values())

    def __sub__(self, earlier: ServerCounts) -> ServerCounts:
        """What happened between two readings (the gauges stay those of the later one)."""

        def minus(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: a.get(k, 0) - b.get(k, 0) for k in sorted(set(a) | set(b))}

        return ServerCounts(
            stanzas_in=minus(self.stanzas_in, earlier.stanzas_in),
            stanzas_out=minus(self.stanzas_out, earlier.stanzas_out),
            logins=self.logins - earlier.logins,
            binds=self.binds - earlier.binds,
            room_joins=self.room_joins - earlier.room_joins,
            sessions=self.sessions,
            occupants=self.occupants,
            peak_sessions=self.peak_sessions,
            peak_occupants=self.peak_occupants,
        )


def parse_counts(text: str) -> ServerCounts:
    """ServerCounts from an OpenMetrics page served by mod_http_openmetrics with `mod_stanza_counts` loaded."""
    stanzas: dict[str, dict[str, int]] = {"in": {}, "out": {}}
    events: dict[str, int] = {}
    gauges: dict[tuple[str, str], int] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or not m["name"].startswith("prosody_mod_stanza_counts"):
            continue
        labels = dict(_LABEL.findall(m["labels"] or ""))
        value = int(float(m["value"]))
        name = m["name"].removeprefix("prosody_mod_stanza_counts__")
        if name == "stanzas_total":
            stanzas[labels["direction"]][labels["kind"]] = value
        elif name == "events_total":
            events[labels["event"]] = value
        elif name in ("current", "peak"):
            gauges[(name, labels["what"])] = value
    return ServerCounts(
        stanzas_in=stanzas["in"],
        stanzas_out=stanzas["out"],
        logins=events.get("login", 0),
        binds=events.get("bind", 0),
        room_joins=events.get("room_join", 0),
        sessions=gauges.get(("current", "sessions"), 0),
        occupants=gauges.get(("current", "occupants"), 0),
        peak_sessions=gauges.get(("peak", "sessions"), 0),
        peak_occupants=gauges.get(("peak", "occupants"), 0),
    )


def _free_port(bind: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((bind, 0))
        port: int = sock.getsockname()[1]
        return port


def _run(cmd: list[str], *, cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")


@contextlib.asynccontextmanager
async def admin_session(host: str, port: int, jid: str, password: str, ca_file: str) -> AsyncIterator[ClientXMPP]:
    """A logged-in slixmpp client for the fixture's own set-up (rooms, affiliations), disconnected on exit."""
    client = ClientXMPP(jid, password)
    client.enable_direct_tls = False
    client.auto_authorize = False
    client.auto_subscribe = False
    client.ca_certs = ca_file
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _done(_: object = None) -> None:
        if not ready.done():
            ready.set_result(None)

    def _failed(reason: object = None) -> None:
        if not ready.done():
            ready.set_exception(RuntimeError(f"admin login to {host}:{port} failed: {reason}"))

    client.add_event_handler("session_start", _done)
    client.add_event_handler("failed_all_auth", _failed)
    client.add_event_handler("connection_failed", _failed)
    client.connect(host, port)
    try:
        await asyncio.wait_for(ready, 10)
        yield client
    finally:
        client.cancel_connection_attempt()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 3)


class ProsodyServer:
    """One Prosody process with a private CA, a VirtualHost `domain` and a MUC component."""

    def __init__(
        self,
        workdir: Path,
        *,
        domain: str = "example.test",
        bind: str = "127.0.0.1",
        port: int = 0,
        netns: str | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.domain = domain
        self.muc_domain = "conference." + domain
        self.host = bind
        self.port = port
        self.netns = netns
        self.ca_file = self.workdir / "ca.crt"
        self.config_file = self.workdir / "prosody.cfg.lua"
        self.log_file = self.workdir / "prosody.log"
        self.admin_jid = f"{ADMIN_USER}@{domain}"
        self.metrics_port = METRICS_PORT if netns else 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -- process --

    def _wrap(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def _make_certificates(self) -> None:
        """A CA and a server certificate for the domain and its MUC component (SAN), signed by that CA."""
        w = self.workdir
        _run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=ipop-overlay test CA", "-keyout", str(w / "ca.key"), "-out", str(self.ca_file),
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            ],
            cwd=w,
        )  # fmt: skip
        _run(
            [
                "openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={self.domain}",
                "-keyout", str(w / "server.key"), "-out", str(w / "server.csr"),
            ],
            cwd=w,
        )  # fmt: skip
        (w / "san.ext").write_text(
            f"subjectAltName=DNS:{self.domain},DNS:{self.muc_domain}\nextendedKeyUsage=serverAuth\n"
        )
        _run(
            [
                "openssl", "x509", "-req", "-in", str(w / "server.csr"), "-CA", str(self.ca_file),
                "-CAkey", str(w / "ca.key"), "-CAcreateserial", "-days", "2",
                "-extfile", str(w / "san.ext"), "-out", str(w / "server.crt"),
            ],
            cwd=w,
        )  # fmt: skip
        os.chmod(w / "server.key", 0o600)

    def _port_open(self) -> bool:
        if self.netns:
            probe = f"import socket; socket.create_connection(({self.host!r}, {self.port}), 0.5).close()"
            return subprocess.run(self._wrap(["python3", "-c", probe]), capture_output=True).returncode == 0
        try:
            socket.create_connection((self.host, self.port), 0.5).close()
        except OSError:
            return False
        return True

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        if self.port == 0:
            if self.netns:
                raise ValueError("pass an explicit port when the server runs in a network namespace")
            self.port = _free_port(self.host)
        if self.metrics_port == 0:
            self.metrics_port = _free_port("127.0.0.1")
        self._make_certificates()
        (self.workdir / "plugins").mkdir(exist_ok=True)
        (self.workdir / "plugins" / "mod_stanza_counts.lua").write_text(STANZA_COUNTS_PLUGIN)
        self.config_file.write_text(
            CONFIG_TEMPLATE.format(
                workdir=self.workdir,
                admin=self.admin_jid,
                bind=self.host,
                port=self.port,
                metrics_port=self.metrics_port,
                domain=self.domain,
                muc_domain=self.muc_domain,
            )
        )
        out = open(self.workdir / "prosody.stdout", "wb")
        self._proc = subprocess.Popen(
            self._wrap(["prosody", "--config", str(self.config_file)]),
            cwd=self.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        out.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._port_open():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                stdout = (self.workdir / "prosody.stdout").read_text(errors="replace")[-800:]
                raise RuntimeError(
                    f"prosody did not accept on {self.host}:{self.port} within {START_TIMEOUT:.0f} s\n"
                    f"log: {self.log_tail()}\nstdout: {stdout}"
                )
            time.sleep(0.1)
        self.register(ADMIN_USER, ADMIN_PASSWORD)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # -- statistics --

    def metrics(self) -> str:
        """The server's OpenMetrics page, fetched from 127.0.0.1 inside its namespace (one short process)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        # No proxy from the environment: this request must stay on the loopback interface.
        if not self.netns:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as reply:
                text: str = reply.read().decode()
                return text
        fetch = (
            "import sys, urllib.request as u; "
            f"sys.stdout.write(u.build_opener(u.ProxyHandler({{}})).open({url!r}, timeout=5).read().decode())"
        )
        out = subprocess.run(
            self._wrap([sys.executable, "-c", fetch]),
            capture_output=True,
            text=True,
            timeout=METRICS_TIMEOUT,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"GET {url} in {self.netns} failed: {out.stderr.strip()[-300:]}")
        return out.stdout

    def counts(self) -> ServerCounts:
        """Stanzas, logins, sessions and occupants counted by the server since it started."""
        return parse_counts(self.metrics())

    # -- accounts and rooms --

    def register(self, user: str, password: str) -> str:
        _run(
            self._wrap(["prosodyctl", "--config", str(self.config_file), "register", user, self.domain, password]),
            cwd=self.workdir,
        )
        return f"{user}@{self.domain}"

    async def create_room(self, name: str, members: list[str], owners: list[str] | None = None) -> str:
        """Create a persistent members-only room as the admin and add each member, one request each.

        Prosody 0.12 applies only the first <item> of a multi-item affiliation change: one IQ per member.
        """
        room = f"{name}@{self.muc_domain}"
        async with admin_session(self.host, self.port, self.admin_jid, ADMIN_PASSWORD, self.ca_file) as client:
            await self._create_room_as(client, room, members, owners or [])
        return room

    async def _create_room_as(self, client: ClientXMPP, room: str, members: list[str], owners: list[str]) -> None:
        joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def _presence(pres: object) -> None:
            frm = str(pres["from"])  # type: ignore[index]
            if frm == f"{room}/admin" and not joined.done():
                if pres["type"] == "error":  # type: ignore[index]
                    joined.set_exception(RuntimeError(f"creating {room} failed: {pres}"))
                else:
                    joined.set_result(None)

        client.add_event_handler("presence", _presence)
        join = client.make_presence(pto=f"{room}/admin")
        join.append(ET.Element(f"{{{MUC_NS}}}x"))
        join.send()
        await asyncio.wait_for(joined, 10)

        await self._iq(client, room, MUC_OWNER_NS, _config_form())
        for member in members:
            affiliation = "owner" if member in owners else "member"
            item = ET.Element(f"{{{MUC_ADMIN_NS}}}item", {"affiliation": affiliation, "jid": member})
            await self._iq(client, room, MUC_ADMIN_NS, item)
        leave = client.make_presence(pto=f"{room}/admin", ptype="unavailable")
        leave.send()

    @staticmethod
    async def _iq(client: ClientXMPP, room: str, ns: str, child: ET.Element) -> None:
        iq: Iq = client.make_iq_set(ito=room)
        query = ET.Element(f"{{{ns}}}query")
        query.append(child)
        iq.append(query)
        try:
            await iq.send(timeout=10)
        except (IqError, IqTimeout) as exc:
            raise RuntimeError(f"room set-up request to {room} failed: {exc}") from exc


def _config_form() -> ET.Element:
    form = ET.Element(f"{{{DATA_NS}}}x", {"type": "submit"})
    fields = {
        "FORM_TYPE": "http://jabber.org/protocol/muc#roomconfig",
        "muc#roomconfig_membersonly": "1",
        "muc#roomconfig_persistentroom": "1",
        "muc#roomconfig_publicroom": "0",
    }
    for var, value in fields.items():
        field = ET.SubElement(form, f"{{{DATA_NS}}}field", {"var": var})
        ET.SubElement(field, f"{{{DATA_NS}}}value").text = value
    return form

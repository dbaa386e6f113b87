"""A throw-away Prosody server for tests: own CA, own config, own data dir, one child process.

Prosody from Debian reads /etc/prosody and listens on every address when started bare, so everything here goes
through an explicit `--config FILE` that binds c2s to one address and turns s2s, HTTP and every component
but MUC off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.stanza import Iq

MUC_OWNER_NS = "http://jabber.org/protocol/muc#owner"
MUC_ADMIN_NS = "http://jabber.org/protocol/muc#admin"
MUC_NS = "http://jabber.org/protocol/muc"
DATA_NS = "jabber:x:data"

ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-password"
START_TIMEOUT = 15.0

CONFIG_TEMPLATE = """\
-- Generated for one test run; see tests/support/prosody.py.
pidfile = "{workdir}/prosody.pid"
data_path = "{workdir}/data"
daemonize = false
run_as_root = true
admins = {{ "{admin}" }}
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{workdir}/prosody.log" }} }}

modules_enabled = {{ "saslauth"; "tls"; "disco"; "ping"; "roster" }}
modules_disabled = {{ "s2s"; "s2s_auth_certs"; "offline"; "http"; "bosh"; "websocket" }}
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
http_ports = {{ }}
https_ports = {{ }}

ssl = {{ key = "{workdir}/server.key"; certificate = "{workdir}/server.crt" }}

VirtualHost "{domain}"

Component "{muc_domain}" "muc"
    restrict_room_creation = "admin"
    muc_room_locking = false
    muc_room_default_public = false
    muc_room_default_history_length = 0
    muc_tombstones = false
"""


def _free_port(bind: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((bind, 0))
        port: int = sock.getsockname()[1]
        return port


def _run(cmd: list[str], *, cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")


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
        self._make_certificates()
        self.config_file.write_text(
            CONFIG_TEMPLATE.format(
                workdir=self.workdir,
                admin=self.admin_jid,
                bind=self.host,
                port=self.port,
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

    # -- accounts and rooms --

    def register(self, user: str, password: str) -> str:
        _run(
            self._wrap(["prosodyctl", "--config", str(self.config_file), "register", user, self.domain, password]),
            cwd=self.workdir,
        )
        return f"{user}@{self.domain}"

    async def create_room(self, name: str, members: list[str]) -> str:
        """Create a persistent members-only room as the admin and add each member, one request each.

        Prosody 0.12 applies only the first <item> of a multi-item affiliation change: one IQ per member.
        """
        room = f"{name}@{self.muc_domain}"
        client = ClientXMPP(self.admin_jid, ADMIN_PASSWORD)
        client.enable_direct_tls = False
        client.auto_authorize = False
        client.auto_subscribe = False
        client.ca_certs = self.ca_file
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def _done(_: object = None) -> None:
            if not ready.done():
                ready.set_result(None)

        def _failed(reason: object = None) -> None:
            if not ready.done():
                ready.set_exception(RuntimeError(f"admin login to {self.host}:{self.port} failed: {reason}"))

        client.add_event_handler("session_start", _done)
        client.add_event_handler("failed_all_auth", _failed)
        client.add_event_handler("connection_failed", _failed)
        client.connect(self.host, self.port)
        try:
            await asyncio.wait_for(ready, 10)
            await self._create_room_as(client, room, members)
        finally:
            client.cancel_connection_attempt()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 3)
        return room

    async def _create_room_as(self, client: ClientXMPP, room: str, members: list[str]) -> None:
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
            item = ET.Element(f"{{{MUC_ADMIN_NS}}}item", {"affiliation": "member", "jid": member})
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

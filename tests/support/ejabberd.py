"""A throw-away ejabberd server for tests: own CA, own config, own spool, own epmd, two child processes.

The same interface as tests/support/prosody.py's ProsodyServer where tests/support/group.py uses it (start, stop,
register, create_room, host, port, domain, muc_domain, ca_file, log_tail); no counts() or metrics().

Debian's `ejabberdctl` reads /etc/ejabberd, switches to the `ejabberd` user and spools in /var/lib/ejabberd, so
it is not used: `erl` runs ejabberd in the foreground (`-s ejabberd`, as `ejabberdctl foreground` does) with every
path pointed into the work directory: config (EJABBERD_CONFIG_PATH), log (EJABBERD_LOG_PATH), Mnesia spool,
crash dump, cookie (HOME). Erlang distribution, which accounts are registered through, stays on 127.0.0.1 with an
epmd of our own started in the foreground (`-start_epmd false` keeps erl from starting a daemon that would
outlive us) inside the server's namespace when it has one. Accounts are registered the way `ejabberdctl
register` does it: a hidden Erlang node running `ejabberd_ctl` against the server's node.

The config keeps what a Debian install has where the project must cope with it: the c2s shaper (3000 B/s,
20 KB burst per client), mod_fail2ban, and ejabberd's own default room options (public, moderated, 200
occupants), which the room set-up (xmpp_bootstrap/admin.py) overrides, as it must on a real server.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.prosody import ADMIN_PASSWORD, ADMIN_USER, ProsodyServer, _free_port, admin_session
from xmpp_bootstrap import admin

EJABBERDCTL = Path("/usr/sbin/ejabberdctl")
# Measured on this 2-core box: ejabberd 23.01 accepts clients 1.8-2.0 s after erl starts (its log: "started
# in 1.33s"), and start() with certificates and the admin account takes ~4.3 s; with two busy loops holding both
# cores it took 21-62 s (10 starts, 2026-12-06): 90 s leaves room for a loaded box.
START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
# One `register` (a short-lived hidden Erlang node) takes ~0.6 s.
CTL_TIMEOUT = 30.0
# epmd's well-known port (inside the server's own namespace nothing else holds it).
EPMD_PORT = 4369
NODE = "ejabberd@localhost"
# Our occupant nick while creating a room (not hex, so never a node's nick).
ROOM_ADMIN_NICK = "fixture-admin"

CONFIG_TEMPLATE = """\
# Generated for one test run; see tests/support/ejabberd.py.
hosts:
  - "{domain}"
loglevel: info
log_rotate_count: 0
certfiles:
  - "{workdir}/server.pem"
# Our CA, so ejabberd does not warn that the server certificate's issuer is unknown.
ca_file: "{workdir}/ca.crt"
auth_method: internal
auth_password_format: scram
# No server-to-server traffic: no s2s listener, and outgoing s2s refused (the predefined rule "none").
s2s_access: none
listen:
  -
    port: {port}
    ip: "{bind}"
    module: ejabberd_c2s
    max_stanza_size: 262144
    shaper: c2s_shaper
    access: c2s
    starttls_required: true
acl:
  admin:
    user:
      - "{admin}"
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    deny: blocked
    allow: all
  muc_create:
    allow: local
api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"
# Debian's defaults, kept: every client but the admin is held to 3000 B/s with a 20 KB burst.
shaper:
  normal:
    rate: 3000
    burst_size: 20000
  fast: 100000
shaper_rules:
  max_user_sessions: 10
  c2s_shaper:
    none: admin
    normal: all
modules:
  mod_disco: {{}}
  mod_fail2ban: {{}}
  mod_ping: {{}}
  mod_roster: {{}}
  mod_muc:
    host: "{muc_domain}"
    access:
      - allow
    access_admin:
      - allow: admin
    access_create: muc_create
    access_persistent: muc_create
    # No default_room_options: rooms start as ejabberd makes them (public, moderated, 200 occupants) and the
    # group's owner configures them.
"""


def erl_libs() -> str | None:
    """Where Debian's ejabberd keeps its Erlang applications (ERL_LIBS in ejabberdctl), or None."""
    try:
        text = EJABBERDCTL.read_text()
    except OSError:
        return None
    m = re.search(r"^ERL_LIBS='([^']+)'", text, re.MULTILINE)
    return m.group(1) if m else None


def missing_ejabberd() -> str | None:
    """Why this machine cannot run the fixture (ejabberd, erl or epmd missing), or None."""
    for tool in ("erl", "epmd", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install ejabberd, with services blocked: scripts/setup.sh)"
    if erl_libs() is None:
        return f"ejabberd is not installed ({EJABBERDCTL} is missing; see scripts/setup.sh)"
    return None


class EjabberdServer:
    """One ejabberd node (and its epmd) with a private CA, a virtual host `domain` and a MUC service."""

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
        self.config_file = self.workdir / "ejabberd.yml"
        self.log_file = self.workdir / "log" / "ejabberd.log"
        self.admin_jid = f"{ADMIN_USER}@{domain}"
        # In its own namespace epmd's usual port is free; in the root namespace a system epmd may hold it.
        self.epmd_port = EPMD_PORT if netns else 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._epmd: subprocess.Popen[bytes] | None = None
        self._ctl_count = 0
        self.startup_s: float | None = None
        """Seconds from starting erl until ejabberd accepted clients, after start()."""

    # -- process --

    def _wrap(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def _env(self) -> dict[str, str]:
        """The environment of every Erlang process of this server: nothing read from /etc/ejabberd, no
        cookie but ours (HOME), epmd on 127.0.0.1 at our port."""
        libs = erl_libs()
        if libs is None:
            raise RuntimeError(missing_ejabberd() or "ejabberd is not installed")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ERL_", "EJABBERD_"))}
        env.update(
            HOME=str(self.workdir),
            ERL_LIBS=libs,
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_CRASH_DUMP=str(self.workdir / "log" / "erl_crash.dump"),
            EJABBERD_CONFIG_PATH=str(self.config_file),
            EJABBERD_LOG_PATH=str(self.log_file),
            CONTRIB_MODULES_PATH=str(self.workdir / "modules"),
        )
        return env

    def _erl(self, name: str, *args: str) -> list[str]:
        """An erl command line for node `name` with distribution on 127.0.0.1 and no epmd of its own."""
        return [
            "erl", "-sname", name, "-noinput", "-start_epmd", "false",
            "-kernel", "inet_dist_use_interface", "{127,0,0,1}", *args,
        ]  # fmt: skip

    def _make_certificates(self) -> None:
        """The Prosody fixture's CA and server certificate (SAN: the domain and its MUC service) in the same files;
        ejabberd reads key and certificate from one PEM file."""
        w = self.workdir
        ProsodyServer(w, domain=self.domain)._make_certificates()
        pem = w / "server.pem"
        pem.write_text((w / "server.key").read_text() + (w / "server.crt").read_text())
        os.chmod(pem, 0o600)

    def _port_open(self) -> bool:
        if self.netns:
            probe = f"import socket; socket.create_connection(({self.host!r}, {self.port}), 0.5).close()"
            return subprocess.run(self._wrap(["python3", "-c", probe]), capture_output=True).returncode == 0
        try:
            socket.create_connection((self.host, self.port), 0.5).close()
        except OSError:
            return False
        return True

    def _started_since(self, offset: int) -> bool:
        try:
            with open(self.log_file, "rb") as log:
                log.seek(offset)
                return b" is started in the node " in log.read()
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _stdout_tail(self, name: str) -> str:
        try:
            return (self.workdir / name).read_text(errors="replace")[-800:]
        except OSError:
            return "(none)"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("spool", "log", "modules"):
            (self.workdir / sub).mkdir(exist_ok=True)
        if self.port == 0:
            if self.netns:
                raise ValueError("pass an explicit port when the server runs in a network namespace")
            self.port = _free_port(self.host)
        if self.epmd_port == 0:
            self.epmd_port = _free_port("127.0.0.1")
        self._make_certificates()
        cookie = self.workdir / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        os.chmod(cookie, 0o400)  # erl refuses a cookie file others can read
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
        env = self._env()
        logged = self.log_file.stat().st_size if self.log_file.exists() else 0  # a restart appends to the log
        with open(self.workdir / "epmd.stdout", "wb") as out:
            self._epmd = subprocess.Popen(
                self._wrap(["epmd", "-address", "127.0.0.1", "-port", str(self.epmd_port)]),
                cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        started = time.monotonic()
        with open(self.workdir / "ejabberd.stdout", "wb") as out:
            self._proc = subprocess.Popen(
                self._wrap(
                    self._erl(
                        NODE, "+K", "true", "+P", "250000",
                        "-mnesia", "dir", f'"{self.workdir / "spool"}"', "-s", "ejabberd",
                    )
                ),
                cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = started + START_TIMEOUT
        # The listener's socket takes connections (into its backlog) before ejabberd has created its Mnesia
        # tables: a `register` then fails with {no_exists,passwd,storage_type} (seen on a loaded 2-core box).
        # Ready is the log's "is started in the node" line of this start, and the port open.
        while not (self._started_since(logged) and self._port_open()):
            if self._proc.poll() is not None or self._epmd.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"ejabberd did not start and accept on {self.host}:{self.port} within {START_TIMEOUT:.0f} s\n"
                    f"log: {self.log_tail()}\nstdout: {self._stdout_tail('ejabberd.stdout')}\n"
                    f"epmd: {self._stdout_tail('epmd.stdout')}"
                )
            time.sleep(0.2)
        self.startup_s = time.monotonic() - started
        if not self._started_once:  # the spool keeps accounts across a restart (a test that restarts the server)
            self.register(ADMIN_USER, ADMIN_PASSWORD)
        self._started_once = True

    def stop(self) -> None:
        """SIGTERM ejabberd (the VM shuts down cleanly on it), then its epmd; each by PID, SIGKILL if slow."""
        for attr in ("_proc", "_epmd"):
            proc = getattr(self, attr)
            setattr(self, attr, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # -- accounts and rooms --

    def ctl(self, *args: str) -> str:
        """Run an ejabberdctl command against this server's node (as `ejabberdctl` does, without its script)."""
        self._ctl_count += 1
        name = f"ctl{os.getpid()}x{self._ctl_count}@localhost"
        cmd = self._wrap(self._erl(name, "-hidden", "-s", "ejabberd_ctl", "-extra", NODE, *args))
        out = subprocess.run(
            cmd, cwd=self.workdir, env=self._env(), capture_output=True, text=True, timeout=CTL_TIMEOUT, check=False
        )
        if out.returncode != 0:
            text = (out.stdout + out.stderr).strip()[-400:]
            raise RuntimeError(f"ejabberdctl {args[0]} on {NODE} failed ({out.returncode}): {text}")
        return out.stdout

    def register(self, user: str, password: str) -> str:
        self.ctl("register", user, self.domain, password)
        return f"{user}@{self.domain}"

    async def create_room(self, name: str, members: list[str], owners: list[str] | None = None) -> str:
        """Create the group's room as the admin with the project's own room set-up (xmpp_bootstrap/admin.py:
        members-only, persistent, hidden, unmoderated, the loosest occupant cap offered), then make `owners`
        owners."""
        room = f"{name}@{self.muc_domain}"
        async with admin_session(self.host, self.port, self.admin_jid, ADMIN_PASSWORD, self.ca_file) as client:
            await admin.create_room(client, room, ROOM_ADMIN_NICK, members)
            for owner in owners or []:
                await admin.set_affiliation(client, room, owner, "owner")
        return room

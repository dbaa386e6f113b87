"""A SocialVPN lab: a real Prosody and coturn, people's devices in namespaces (some behind NATs), each running
`ipop-overlay join` with a [social] config, friendships made with `ipop-overlay friend`.

Names: each device's namespace gets /etc/netns/<netns>/resolv.conf naming its node's DNS address, which
`ip netns exec` bind-mounts over /etc/resolv.conf for commands run there, so `ping bob.ipop` resolves through
the node. The directory is removed with the lab.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overlay.control import ControlError, query
from tests.support.coturn import CoturnServer
from tests.support.ejabberd import EjabberdServer
from tests.support.group import CLI_TIMEOUT_S, PASSWORD, SERVERS, TURN_PASSWORD, TURN_USERNAME, cli_argv
from tests.support.netlab import Host, NetLab
from tests.support.prosody import ProsodyServer

XMPP_PORT = 5222
NODE_PORT = 5800
TAP = "ipsoc0"
STOP_TIMEOUT_S = 15.0


@dataclass
class Device:
    user: str
    resource: str
    host: Host
    directory: Path
    subnet: str
    jid: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config(self) -> Path:
        return self.directory / "node.toml"

    @property
    def control(self) -> Path:
        return self.directory / "node.sock"

    @property
    def log(self) -> Path:
        return self.directory / "node.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class SocialLab:
    def __init__(self, prefix: str = "isv", clusters: dict[str, str] | None = None, server: str = "prosody") -> None:
        self.server_kind = server
        self.lab = NetLab(prefix)
        self.workdir = Path(tempfile.mkdtemp(prefix="ipop-social-"))
        self.clusters = clusters or {}
        self.devices: dict[str, Device] = {}
        self.server: ProsodyServer | EjabberdServer | None = None
        self.coturn: CoturnServer | None = None
        self._resolv: list[Path] = []

    def __enter__(self) -> SocialLab:
        try:
            self.lab.add_hub()
            xmpp = self.lab.add_host("xmpp")
            self.server = SERVERS[self.server_kind](
                self.workdir / self.server_kind, bind=xmpp.address, port=XMPP_PORT, netns=xmpp.netns
            )
            self.server.start()
            for name, kind in self.clusters.items():
                self.lab.add_cluster(name, kind)
            turn = self.lab.add_host("turn")
            second = self.lab.add_address(turn)
            self.coturn = CoturnServer(
                self.workdir / "coturn", [turn.address, second], allowed_peers=[str(self.lab.public_subnet)],
                netns=turn.netns, username=TURN_USERNAME, password=TURN_PASSWORD,
            )  # fmt: skip
            self.coturn.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def account(self, user: str) -> str:
        assert self.server is not None
        self.server.register(user, PASSWORD)
        return f"{user}@{self.server.domain}"

    def add_device(self, user: str, resource: str, subnet: str, cluster: str | None = None) -> Device:
        assert self.server is not None and self.coturn is not None
        name = f"{user[:4]}{resource[:3]}"
        host = self.lab.add_host(name, cluster=cluster)
        directory = self.workdir / name
        directory.mkdir()
        device = Device(user, resource, host, directory, subnet, jid=f"{user}@{self.server.domain}/{resource}")
        out = subprocess.run([*cli_argv(), "keygen", str(directory / "node.key")], capture_output=True, text=True,
                             timeout=CLI_TIMEOUT_S)  # fmt: skip
        assert out.returncode == 0, out.stderr
        (directory / "node.pass").write_text(PASSWORD)
        os.chmod(directory / "node.pass", 0o600)
        c = self.coturn
        stun = ", ".join(f'"{address}:{port}"' for address, port in c.servers)
        device.config.write_text(
            "[node]\n"
            'key = "node.key"\n'
            f'control_socket = "{device.control}"\n'
            f'listen = "{host.address}:{NODE_PORT}"\n'
            "[xmpp]\n"
            f'jid = "{device.jid}"\n'
            'password_file = "node.pass"\n'
            f'host = "{self.server.host}"\n'
            f"port = {self.server.port}\n"
            f'ca_file = "{self.server.ca_file}"\n'
            "[social]\n"
            f'subnet = "{subnet}"\n'
            'domain = "ipop"\n'
            "[vnic]\n"
            f'name = "{TAP}"\n'
            "[ice]\n"
            f"stun = [{stun}]\n"
            f'turn = [{{ url = "{c.url("udp")}", username = "{c.username}", password = "{c.password}" }}]\n'
        )
        # Names resolve through the node: `ip netns exec` mounts this over /etc/resolv.conf (ip-netns(8)).
        resolv = Path("/etc/netns") / host.netns / "resolv.conf"
        resolv.parent.mkdir(parents=True, exist_ok=True)
        self._resolv.append(resolv.parent)
        net = ipaddress.IPv4Network(subnet)
        resolv.write_text(f"nameserver {net.broadcast_address - 1}\noptions timeout:2 attempts:2\n")
        self.devices[name] = device
        return device

    def start(self, device: Device, timeout: float = 30.0) -> None:
        log = device.log.open("ab")
        device.process = self.lab.popen(
            device.host, *cli_argv(), "join", "--config", str(device.config), stdout=log, stderr=log
        )
        log.close()
        if not self.wait_until(lambda: self._answers(device), timeout):
            raise RuntimeError(f"{device.jid} did not start within {timeout:.0f} s:\n{self.log_tail(device)}")

    def _answers(self, device: Device) -> bool:
        if not device.running:
            raise RuntimeError(f"{device.jid} exited:\n{self.log_tail(device)}")
        try:
            self.status(device)
            return True
        except RuntimeError:
            return False

    def stop(self, device: Device) -> None:
        assert device.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(device.process.pid, signal.SIGTERM)
        code = device.process.wait(timeout=STOP_TIMEOUT_S)
        assert code == 0, f"{device.jid} exited {code} on SIGTERM:\n{self.log_tail(device)}"

    def cli(self, device: Device, *args: str) -> subprocess.CompletedProcess[str]:
        return self.lab.run(device.host, *cli_argv(), *args, check=False, timeout=CLI_TIMEOUT_S + 10)

    def friend(self, device: Device, command: str, jid: str) -> str:
        out = self.cli(device, "friend", command, "--config", str(device.config), jid)
        assert out.returncode == 0, f"friend {command} {jid} as {device.jid}: {out.stderr}"
        return out.stdout

    def status(self, device: Device) -> dict[str, Any]:
        """The device's status straight from its control socket, as `ipop-overlay status --json` prints it (the
        tests poll it; the CLI's own table is checked where a test runs it). RuntimeError when it does not answer."""
        try:
            return query(device.control, timeout=CLI_TIMEOUT_S)
        except ControlError as exc:
            raise RuntimeError(str(exc)) from None

    def linked(self, a: Device, b: Device) -> str | None:
        """The address a gave b's device when a has a link to it, else None."""
        for friend in self.status(a)["friends"]:
            for d in friend["devices"]:
                if d["device"] == b.jid and d["link"] is not None:
                    return str(d["address"])
        return None

    def ping(self, device: Device, target: str, count: int = 1, timeout: float = 2.0) -> bool:
        out = self.lab.run(device.host, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", f"{timeout:g}",
                           target, check=False, timeout=count * 0.2 + timeout + 10)  # fmt: skip
        return out.returncode == 0

    def log_problems(self) -> list[str]:
        """ERROR lines and tracebacks in the devices' logs: a normal run has none."""
        found = []
        for device in self.devices.values():
            with contextlib.suppress(OSError):
                for line in device.log.read_text(errors="replace").splitlines():
                    if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
                        found.append(f"{device.jid}: {line}")
        return found

    def log_tail(self, device: Device, lines: int = 30) -> str:
        try:
            return "\n".join(device.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @staticmethod
    def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.3) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(interval)
        return predicate()

    def close(self) -> None:
        for device in self.devices.values():
            if device.running and device.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(device.process.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    device.process.wait(timeout=STOP_TIMEOUT_S)
            if device.running and device.process is not None:
                device.process.kill()
                device.process.wait(timeout=5)
        for stopper in (self.server, self.coturn):
            if stopper is not None:
                stopper.stop()
        self.server = self.coturn = None
        self.lab.close()
        for directory in self._resolv:
            shutil.rmtree(directory, ignore_errors=True)
        if not os.environ.get("IPOP_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

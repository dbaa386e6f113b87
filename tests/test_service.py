"""Running as a service: `--version`, the manual pages of `--help`, `check`, and the systemd unit.

All traffic stays on 127.0.0.1: the XMPP server is a listening socket of this test and the STUN server a small
responder in a thread.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aioice import stun
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.check import (
    binding_request,
    check_issuer,
    check_listen,
    check_node_key,
    parse_binding_answer,
)
from overlay.cli import MANUAL, main, parser
from overlay.config import NodeConfig, load_config
from overlay.identity import Identity
from overlay.ids import format_id
from overlay.trust.groupkey import GroupKey, format_public_key

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "dist" / "systemd" / "ipop-overlay@.service"
EXECUTABLE = Path(sys.executable).with_name("ipop-overlay")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "overlay.cli", *args], capture_output=True, text=True, timeout=60)


# -- --version and --help --


def test_version_prints_the_package_version_and_exits_0() -> None:
    r = cli("--version")
    assert r.returncode == 0, r.stderr
    with (ROOT / "pyproject.toml").open("rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    assert r.stdout == f"ipop-overlay {importlib.metadata.version('ipop-overlay')}\n"
    assert r.stdout == f"ipop-overlay {declared}\n"


def test_every_subcommand_but_the_simulator_has_a_manual_page() -> None:
    subcommands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subcommands) - {"sim"} == set(MANUAL)


@pytest.mark.parametrize("command", sorted(MANUAL))
def test_help_of_a_subcommand_shows_its_description_exit_status_and_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    description, examples = MANUAL[command]
    assert description in out  # verbatim: RawDescriptionHelpFormatter keeps the paragraphs
    assert "Exit status:" in description and "Needs:" in description
    assert out.rstrip().endswith(examples)
    assert f"  ipop-overlay {command} " in examples


# -- the STUN Binding codec, against aioice's independent implementation --


def test_a_binding_request_is_what_another_stun_implementation_reads_as_one() -> None:
    txid = bytes(range(12))
    message = stun.parse_message(binding_request(txid))
    assert message.message_method == stun.Method.BINDING
    assert message.message_class == stun.Class.REQUEST
    assert message.transaction_id == txid
    assert message.attributes == {}


@pytest.mark.parametrize("mapped", [("198.51.100.7", 40000), ("2001:db8::7", 5800)])
def test_a_binding_success_response_gives_the_xor_mapped_address(mapped: tuple[str, int]) -> None:
    txid = bytes(range(12))
    response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, txid, {"XOR-MAPPED-ADDRESS": mapped})
    answer = parse_binding_answer(bytes(response), txid)
    assert answer is not None and answer.success and answer.mapped == mapped


def test_a_binding_error_response_gives_its_error_code() -> None:
    txid = bytes(range(12))
    response = stun.Message(stun.Method.BINDING, stun.Class.ERROR, txid, {"ERROR-CODE": (420, "Unknown Attribute")})
    answer = parse_binding_answer(bytes(response), txid)
    assert answer is not None and not answer.success and answer.error == "420 Unknown Attribute"


def test_an_answer_to_another_transaction_or_a_request_is_not_our_answer() -> None:
    txid = bytes(range(12))
    other = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, bytes(12), {"XOR-MAPPED-ADDRESS": ("1.2.3.4", 5)})
    assert parse_binding_answer(bytes(other), txid) is None
    assert parse_binding_answer(binding_request(txid), txid) is None
    assert parse_binding_answer(bytes(stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, txid))[:19], txid) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_any_bytes_after_a_valid_header_parse_or_are_refused_never_raise(body: bytes) -> None:
    txid = bytes(range(12))
    header = (0x0101).to_bytes(2) + len(body).to_bytes(2) + (0x2112A442).to_bytes(4) + txid  # RFC 5389's magic cookie
    for data in (header + body, body):
        answer = parse_binding_answer(data, txid)
        assert answer is None or isinstance(answer.success, bool)


# -- check --


@pytest.fixture
def xmpp_listener() -> Iterator[socket.socket]:
    """Stands in for the XMPP server: the kernel completes the TCP handshake on a listening socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s


@pytest.fixture
def stun_server() -> Iterator[int]:
    """A STUN server that answers every Binding request with the sender's address (RFC 5389 section 10.1.2)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                data, addr = sock.recvfrom(2048)
            except TimeoutError:
                continue
            request = stun.parse_message(data)
            answer = stun.Message(
                stun.Method.BINDING, stun.Class.RESPONSE, request.transaction_id, {"XOR-MAPPED-ADDRESS": addr}
            )
            sock.sendto(bytes(answer), addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        done.set()
        thread.join(5)
        sock.close()


def write_config(tmp_path: Path, xmpp_port: int, stun_port: int) -> Path:
    if not (tmp_path / "node.key").exists():
        Identity.generate().save(tmp_path / "node.key")
    path = tmp_path / "node.toml"
    path.write_text(
        f"""
[node]
key = "node.key"
control_socket = "node.sock"
listen = "127.0.0.1:0"
[xmpp]
jid = "alice@example.test/laptop"
password = "x"
host = "127.0.0.1"
port = {xmpp_port}
room = "group1@conference.example.test"
[vnic]
address = "10.254.0.1/16"
[group]
open = true
[ice]
stun = ["127.0.0.1:{stun_port}"]
"""
    )
    return path


def test_check_passes_when_the_servers_answer_and_says_what_join_would_do(
    tmp_path: Path, xmpp_listener: socket.socket, stun_server: int
) -> None:
    xmpp_port = xmpp_listener.getsockname()[1]
    config = write_config(tmp_path, xmpp_port, stun_server)
    r = cli("check", "--config", str(config), "--timeout", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")]
    assert any(line.startswith(f"ok   xmpp server 127.0.0.1:{xmpp_port} reachable (") for line in lines)
    assert any(line.startswith(f"ok   stun server 127.0.0.1:{stun_server} answered (") for line in lines)
    # TURN servers are checked with an allocation on a real coturn: tests/test_turn_tls.py.
    assert any(line.startswith("ok   udp listen address 127.0.0.1:0") for line in lines)
    assert "sees us as 127.0.0.1:" in r.stdout
    node_id = format_id(Identity.load(tmp_path / "node.key").node_id)
    assert f"run as node {node_id}" in r.stdout
    assert "room group1@conference.example.test" in r.stdout and "TAP device ipop0 with 10.254.0.1/16" in r.stdout
    assert not (tmp_path / "node.sock").exists()


def test_check_fails_with_exit_1_naming_an_xmpp_server_that_does_not_listen(tmp_path: Path, stun_server: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens once this socket is closed
    config = write_config(tmp_path, closed_port, stun_server)
    r = cli("check", "--config", str(config), "--timeout", "2")
    assert r.returncode == 1
    fail = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert f"FAIL xmpp server 127.0.0.1:{closed_port} unreachable: connection refused" in "\n".join(fail)
    assert any(line.startswith(f"ok   stun server 127.0.0.1:{stun_server}") for line in r.stdout.splitlines())


def test_check_fails_when_a_stun_server_stays_silent(tmp_path: Path, xmpp_listener: socket.socket) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        config = write_config(tmp_path, xmpp_listener.getsockname()[1], port)
        r = cli("check", "--config", str(config), "--timeout", "0.6")
    assert r.returncode == 1
    assert f"FAIL stun server 127.0.0.1:{port} no STUN answer within 0.6 s" in r.stdout


def issuer_config(tmp_path: Path, pinned: bytes) -> NodeConfig:
    path = write_config(tmp_path, 5222, 3478)
    text = path.read_text().replace("[group]\nopen = true\n", f'[group]\npublic_key = "{format_public_key(pinned)}"\n')
    path.write_text(text + '[issuer]\ngroup_key = "group.key"\n')
    return load_config(path)


def test_an_issuer_whose_group_key_is_not_the_pinned_one_fails_the_check(tmp_path: Path) -> None:
    key = GroupKey.generate()
    key.save(tmp_path / "group.key")
    assert check_issuer(issuer_config(tmp_path, key.public_key)).ok
    failed = check_issuer(issuer_config(tmp_path, GroupKey.generate().public_key))
    assert not failed.ok and "is not the key of [group] public_key" in failed.line()


def test_a_listen_address_in_use_fails_the_check_and_asks_about_a_running_node() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = check_listen(("127.0.0.1", port))
    assert result.line().startswith(f"FAIL udp listen address 127.0.0.1:{port} cannot be bound")
    assert "is a node already running?" in result.detail


def test_a_missing_node_key_fails_the_check_and_says_how_to_make_one(tmp_path: Path) -> None:
    result, node_id = check_node_key(tmp_path / "none.key")
    assert not result.ok and node_id is None and "ipop-overlay keygen" in result.detail


def test_check_with_a_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "n.toml").write_text('[node]\nkey = "k"\nlisen = "127.0.0.1:0"\n')
    r = cli("check", "--config", str(tmp_path / "n.toml"))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "lisen" in r.stderr


# -- the systemd unit --


def unit_entries() -> dict[str, dict[str, list[str]]]:
    """The unit file as section -> key -> values (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and not line.endswith("\\"), f"unexpected unit line {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_unit_runs_join_with_the_instance_config_and_restarts_on_failure() -> None:
    service = unit_entries()["Service"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv == ["/usr/local/bin/ipop-overlay", "join", "--config", "/etc/ipop-overlay/%i.toml"]
    assert service["Restart"] == ["on-failure"]
    assert service["RuntimeDirectory"] == ["ipop-overlay/%i"]
    assert service["StateDirectory"] == ["ipop-overlay/%i"]


def test_the_unit_is_hardened_and_keeps_only_what_a_node_needs() -> None:
    service = unit_entries()["Service"]
    expected = {
        "CapabilityBoundingSet": "CAP_NET_ADMIN",
        "AmbientCapabilities": "CAP_NET_ADMIN",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelTunables": "yes",
        "DevicePolicy": "closed",
        "DeviceAllow": "/dev/net/tun rw",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
    }
    assert {k: service.get(k, [None])[-1] for k in expected} == expected
    assert "PrivateDevices" not in service  # it would hide /dev/net/tun


def test_the_units_command_line_is_one_the_cli_accepts(tmp_path: Path) -> None:
    assert EXECUTABLE.exists(), f"{EXECUTABLE} is missing: install the project (pip install -e .)"
    argv = shlex.split(unit_entries()["Service"]["ExecStart"][0])
    instance = f"test-{uuid.uuid4().hex}"  # no such config: join must stop at reading it
    args = [a.replace("%i", instance) for a in argv[1:]]
    r = subprocess.run([str(EXECUTABLE), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr == f"ipop-overlay: config file /etc/ipop-overlay/{instance}.toml does not exist\n"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_every_line_of_the_unit(tmp_path: Path) -> None:
    # verify needs the executable to exist and an instance name to expand %i.
    unit = tmp_path / "ipop-overlay@test.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/ipop-overlay", str(EXECUTABLE)))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr

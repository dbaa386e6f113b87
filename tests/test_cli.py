"""The command line: keygen, status without a node, join with bad input (no server needed for these)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from overlay.identity import Identity
from overlay.ids import format_id


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "overlay.cli", *args], capture_output=True, text=True, timeout=60)


def test_keygen_writes_a_private_key_readable_only_by_its_owner_and_prints_the_node_id(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.key"
    r = cli("keygen", str(path))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert r.stdout.strip() == format_id(Identity.load(path).node_id)


def test_keygen_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    assert cli("keygen", str(path)).returncode == 0
    before = path.read_bytes()
    r = cli("keygen", str(path))
    assert r.returncode != 0 and "already exists" in r.stderr
    assert path.read_bytes() == before


def test_status_without_a_running_node_says_so_in_one_line(tmp_path: Path) -> None:
    r = cli("status", "--control", str(tmp_path / "none.sock"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "no node is running" in r.stderr


def test_join_with_a_misspelled_key_exits_with_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "n.toml").write_text('[node]\nkey = "k"\nlisen = "127.0.0.1:0"\n')
    r = cli("join", "--config", str(tmp_path / "n.toml"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "lisen" in r.stderr and "listen" in r.stderr


def test_join_with_a_missing_key_file_says_how_to_make_one(tmp_path: Path) -> None:
    (tmp_path / "n.toml").write_text(
        '[node]\nkey = "missing.key"\n[xmpp]\njid = "a@example.test"\npassword = "x"\n'
        'room = "g@conference.example.test"\n[vnic]\naddress = "10.254.0.1/16"\n[group]\nopen = true\n'
    )
    r = cli("join", "--config", str(tmp_path / "n.toml"))
    assert r.returncode == 1 and "ipop-overlay keygen" in r.stderr


def test_a_group_readable_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    assert cli("keygen", str(path)).returncode == 0
    path.chmod(0o640)
    (tmp_path / "n.toml").write_text(
        '[node]\nkey = "node.key"\n[xmpp]\njid = "a@example.test"\npassword = "x"\n'
        'room = "g@conference.example.test"\n[vnic]\naddress = "10.254.0.1/16"\n[group]\nopen = true\n'
    )
    r = cli("join", "--config", str(tmp_path / "n.toml"))
    assert r.returncode == 1 and "chmod 600" in r.stderr

"""The node's config file: every problem is one line naming the key and value."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from overlay.config import ConfigError, load_config
from overlay.trust.groupkey import GroupKey, format_public_key, write_public
from tests.support.certs import make_server

GOOD = """
[node]
key = "node.key"
control_socket = "run/node.sock"
listen = "198.18.0.10:5800"
[xmpp]
jid = "alice@example.test/laptop"
password_file = "alice.pass"
host = "198.18.0.1"
port = 5222
room = "group1@conference.example.test"
[vnic]
name = "ipop0"
address = "10.254.0.1/16"
mtu = 1400
[group]
open = true
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "alice.pass").write_text("s3cret\n")
    (tmp_path / "alice.pass").chmod(0o600)
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_a_good_config_resolves_relative_paths_against_the_config_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.key == tmp_path / "node.key"
    assert cfg.control_socket == tmp_path / "run/node.sock"
    assert cfg.password == "s3cret"
    assert cfg.listen == ("198.18.0.10", 5800)
    assert cfg.vnic_address == "10.254.0.1/16" and cfg.vnic_mtu == 1400
    assert cfg.ring.long_links == 4 and cfg.lookahead and cfg.vnic_offload and cfg.routing == "promise"


def test_lanes_are_two_on_two_cpus_then_one_per_two_cpus_up_to_4_unless_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for cpus, lanes in ((1, 1), (2, 2), (3, 2), (4, 2), (5, 2), (6, 3), (8, 4), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert load_config(write(tmp_path, GOOD)).vnic_lanes == lanes
        assert (
            load_config(write(tmp_path, GOOD.replace("mtu = 1400", 'mtu = 1400\nlanes = "auto"'))).vnic_lanes == lanes
        )
    assert load_config(write(tmp_path, GOOD.replace("mtu = 1400", "mtu = 1400\nlanes = 3"))).vnic_lanes == 3


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("listen =", "lisen ="), r"unknown key \[node\] lisen.*did you mean 'listen'"),
        (("[vnic]", "[vnc]"), r"unknown section \[vnc\]"),
        (("mtu = 1400", "mtu = 70000"), r"bad value for \[vnic\] mtu = 70000"),
        (('address = "10.254.0.1/16"', 'address = "10.254.0.0/16"'), r"\[vnic\] address"),
        (('listen = "198.18.0.10:5800"', 'listen = "nowhere"'), r"\[node\] listen"),
        (('jid = "alice@example.test/laptop"', 'jid = "alice"'), r"\[xmpp\] jid = 'alice'"),
        (('password_file = "alice.pass"', 'password_file = "missing.pass"'), r"password_file .*missing.pass"),
        (('password_file = "alice.pass"', ""), r"exactly one of \[xmpp\] password"),
        (('room = "group1@conference.example.test"', ""), r"missing key \[xmpp\] room"),
        (("port = 5222", 'port = "5222"'), r"\[xmpp\] port"),
        (("mtu = 1400", "mtu = 1400\noffload = 1"), r"\[vnic\] offload = 1: expected true or false"),
        (("mtu = 1400", 'mtu = 1400\n[overlay]\nrouting = "fast"'), r"\[overlay\] routing = 'fast': expected one of"),
        (("mtu = 1400", "mtu = 1400\nlanes = 9"), r"\[vnic\] lanes = 9: expected \"auto\" or a whole number"),
        (("mtu = 1400", 'mtu = 1400\nlanes = "many"'), r"\[vnic\] lanes = 'many'"),
    ],
)
def test_each_problem_is_one_line_naming_the_key(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        load_config(write(tmp_path, GOOD.replace(*edit)))
    assert "\n" not in str(e.value)


def test_a_missing_file_and_bad_toml_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[node\nkey="))


ICE = """
[ice]
stun = ["198.18.0.2:3478", "198.18.0.3:3478"]
turn = [{ url = "turn:198.18.0.2:3478?transport=udp", username = "u", password = "p" },
        { url = "turn:198.18.0.2?transport=tcp", username = "u", password_file = "turn.pass" }]
"""


def test_an_ice_section_gives_stun_and_turn_servers_over_udp_and_tcp(tmp_path: Path) -> None:
    (tmp_path / "turn.pass").write_text("from-file\n")
    (tmp_path / "turn.pass").chmod(0o600)
    cfg = load_config(write(tmp_path, GOOD + ICE))
    assert cfg.ice and cfg.stun == (("198.18.0.2", 3478), ("198.18.0.3", 3478))
    assert [(t.host, t.port, t.transport, t.password) for t in cfg.turn] == [
        ("198.18.0.2", 3478, "udp", "p"),
        ("198.18.0.2", 3478, "tcp", "from-file"),
    ]


def test_stun_and_turn_servers_may_be_named_and_turns_is_tls_with_its_own_default_port(tmp_path: Path) -> None:
    ca = make_server(tmp_path / "pki", ["198.18.0.2"]).ca
    (tmp_path / "ca.pem").write_bytes(ca.read_bytes())
    ca = tmp_path / "ca.pem"
    cfg = load_config(
        write(
            tmp_path,
            GOOD
            + """
[ice]
stun = ["stun.example.org:3478", "[2001:db8::2]:3478"]
turn = [{ url = "turn:turn.example.org", username = "u", password = "p" },
        { url = "turns:turn.example.org", username = "u", password = "p" },
        { url = "turns:198.18.0.2:443?transport=tcp", username = "u", password = "p", ca_file = "ca.pem" }]
""",
        )
    )
    assert cfg.stun == (("stun.example.org", 3478), ("2001:db8::2", 3478))
    assert [(t.host, t.port, t.transport, t.ca_file) for t in cfg.turn] == [
        ("turn.example.org", 3478, "udp", None),
        ("turn.example.org", 5349, "tls", None),
        ("198.18.0.2", 443, "tls", str(ca)),
    ]
    assert cfg.turn[1].describe() == "turns:turn.example.org:5349?transport=tcp"


def test_without_an_ice_section_the_node_runs_no_ice(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert not cfg.ice and cfg.stun == () and cfg.turn == ()


@pytest.mark.parametrize(
    ("ice", "words"),
    [
        ('[ice]\nstun = ["stun.example"]\n', "[ice] stun"),
        ('[ice]\nstun = ["stun_1.example:3478"]\n', "neither an IP address nor a host name"),
        ('[ice]\nstun = ["-stun.example:3478"]\n', "neither an IP address nor a host name"),
        ('[ice]\nstun = ["2001:db8::2:3478"]\n', "brackets"),
        ('[ice]\nturn = [{ url = "stun:198.18.0.2:3478", username = "u", password = "p" }]\n', "turns:"),
        ('[ice]\nturn = [{ url = "turns:198.18.0.2?transport=udp", username = "u", password = "p" }]\n', "tcp"),
        ('[ice]\nturn = [{ url = "turn:198.18.0.2", username = "u", password = "p", ca_file = "x" }]\n', "ca_file"),
        ('[ice]\nturn = [{ url = "turns:h.example", username = "u", password = "p", ca_file = "x" }]\n', "PEM"),
        ('[ice]\nturn = [{ url = "turn:198.18.0.2?transport=sctp", username = "u", password = "p" }]\n', "transport"),
        ('[ice]\nturn = [{ url = "turn:198.18.0.2", username = "u", pasword = "p" }]\n', "pasword"),
        ('[ice]\nturn = [{ url = "turn:198.18.0.2", username = "u", password_file = "nope.pass" }]\n', "nope.pass"),
        ('[ice]\nturn = [{ url = "turn:198.18.0.2", username = "u" }]\n', "password"),
        ('[ice]\nstunn = ["198.18.0.2:3478"]\n', "stunn"),
    ],
)
def test_bad_ice_settings_are_one_line_naming_them(tmp_path: Path, ice: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD + ice))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    (tmp_path / "alice.pass").chmod(0o644)
    with pytest.raises(ConfigError, match=r"alice.pass is readable by others \(mode 644\); run 'chmod 600"):
        load_config(p)


def test_a_group_key_is_required_unless_the_group_is_declared_open(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing \[group\] public_key.*open = true"):
        load_config(write(tmp_path, GOOD.replace("[group]\nopen = true\n", "")))
    key = GroupKey.generate()
    text = GOOD.replace("open = true", f'public_key = "{format_public_key(key.public_key)}"')
    assert load_config(write(tmp_path, text)).group_key == key.public_key
    write_public(tmp_path / "group.pub", key.public_key)
    text = GOOD.replace("open = true", 'public_key_file = "group.pub"')
    assert load_config(write(tmp_path, text)).group_key == key.public_key
    with pytest.raises(ConfigError, match=r"\[group\] public_key"):
        load_config(write(tmp_path, GOOD.replace("open = true", 'public_key = "bm90IGEga2V5"')))
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(write(tmp_path, GOOD.replace("open = true", 'open = true\npublic_key_file = "group.pub"')))


def test_an_issuer_section_and_an_address_left_to_the_issuer(tmp_path: Path) -> None:
    key = GroupKey.generate()
    pinned = GOOD.replace("open = true", f'public_key = "{format_public_key(key.public_key)}"')
    issuer = pinned + '[issuer]\ngroup_key = "keys/group.key"\nsubnet = "10.254.0.0/16"\n'
    cfg = load_config(write(tmp_path, issuer))
    assert cfg.issuer is not None and cfg.issuer.group_key == tmp_path / "keys/group.key"
    assert cfg.issuer.state_file == tmp_path / "keys/issuer-state.json" and cfg.issuer.lifetime == 86400
    no_address = pinned.replace('address = "10.254.0.1/16"\n', "")
    assert load_config(write(tmp_path, no_address)).vnic_address is None
    with pytest.raises(ConfigError, match=r"missing key \[vnic\] address"):
        load_config(write(tmp_path, GOOD.replace('address = "10.254.0.1/16"\n', "")))
    with pytest.raises(ConfigError, match="outside"):
        load_config(write(tmp_path, issuer.replace('subnet = "10.254.0.0/16"', 'subnet = "10.9.0.0/16"')))
    with pytest.raises(ConfigError, match=r"\[issuer\] subnet"):
        load_config(write(tmp_path, issuer.replace('subnet = "10.254.0.0/16"', 'subnet = "10.254.0.1/16"')))

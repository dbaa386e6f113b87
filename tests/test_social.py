"""SocialVPN's pure parts around the node: key statements, pins, names, the [social] config, the status table.
(Translation and DNS: tests/test_social_translate.py, tests/test_social_names.py; friends: tests/test_roster.py;
the whole thing with real processes: tests/test_social_netns.py.)"""

from __future__ import annotations

import ipaddress
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.cli import _social_table
from overlay.config import ConfigError, load_config
from overlay.identity import Identity
from overlay.social.devices import NamedDevice, Pins, dns_label, names, statement, statement_key
from overlay.social.names import udp_packet
from tests.test_tap_frames import reference_checksum

ALICE = Identity.from_seed(bytes([1]) * 32)
MALLORY = Identity.from_seed(bytes([2]) * 32)
DEVICE = "alice@example.test/laptop"


def test_a_statement_names_its_key_for_its_own_full_jid_only() -> None:
    said = statement(ALICE, DEVICE)
    assert statement_key(said, DEVICE) == ALICE.public_key
    assert statement_key(said, "alice@example.test/phone") is None  # copied to another resource
    assert statement_key(said, "mallory@example.test/laptop") is None  # or to another account
    forged = MALLORY.public_key + said[32:]  # another key with Alice's signature
    assert statement_key(forged, DEVICE) is None
    assert statement_key(said[:-1], DEVICE) is None


@settings(max_examples=300)
@given(st.binary(max_size=120), st.text(max_size=40))
def test_statement_key_of_any_bytes_is_a_key_or_none(data: bytes, jid: str) -> None:
    assert statement_key(data, jid) in (None, *([data[:32]] if len(data) == 96 else []))


def test_pins_keep_the_first_key_and_call_another_changed_until_forgotten() -> None:
    pins = Pins()
    assert pins.judge(DEVICE, ALICE.public_key) == "new"
    pins.pin(DEVICE, ALICE.public_key)
    assert pins.judge(DEVICE, ALICE.public_key) == "known"
    assert pins.judge(DEVICE, MALLORY.public_key) == "changed"
    pins.pin(DEVICE, MALLORY.public_key)  # pinning never replaces
    assert pins.judge(DEVICE, MALLORY.public_key) == "changed"
    restored = Pins.load(pins.export())
    assert restored.judge(DEVICE, ALICE.public_key) == "known"
    assert restored.forget(DEVICE) and not restored.forget(DEVICE)
    assert restored.judge(DEVICE, MALLORY.public_key) == "new"


@pytest.mark.parametrize("table", [{DEVICE: "not base64!"}, {DEVICE: "AAAA"}])
def test_a_bad_pin_table_is_refused_with_the_device_named(table: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=re.escape(DEVICE)):
        Pins.load(table)


def test_names_give_each_device_its_resource_name_and_the_friend_its_latest_device() -> None:
    devices = [
        NamedDevice("bob@example.test", "Desk", 10.0, 1),
        NamedDevice("bob@example.test", "phone", 20.0, 2),
        NamedDevice("carol@example.test", "My Laptop", 5.0, 3),
        NamedDevice("bob@other.test", "tablet", 30.0, 4),  # a second "bob": the first by JID keeps the name
    ]
    assert names(devices, "ipop") == {
        "desk.bob.ipop": 1,
        "phone.bob.ipop": 2,
        "bob.ipop": 2,
        "my-laptop.carol.ipop": 3,
        "carol.ipop": 3,
    }


@pytest.mark.parametrize(
    ("text", "label"), [("Laptop", "laptop"), ("my phone!", "my-phone"), ("ü", "device"), ("a" * 80, "a" * 63)]
)
def test_dns_label_makes_any_resource_a_valid_label(text: str, label: str) -> None:
    assert dns_label(text) == label


def test_udp_packet_has_valid_ip_and_udp_checksums() -> None:
    src, dst = int(ipaddress.IPv4Address("10.77.255.254")), int(ipaddress.IPv4Address("10.77.0.1"))
    packet = udp_packet(src, dst, 53, 40000, b"an answer")
    assert reference_checksum(packet[:20]) in (0, 0xFFFF)
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 17, len(packet) - 20)
    assert reference_checksum(pseudo + packet[20:]) in (0, 0xFFFF)
    assert struct.unpack_from("!HHH", packet, 20) == (53, 40000, 8 + len(b"an answer"))


SOCIAL = """
[node]
key = "node.key"
[xmpp]
jid = "alice@example.test/laptop"
password = "pw"
{xmpp}
[social]
{social}
{extra}
"""


def write(tmp_path: Path, xmpp: str = "", social: str = "", extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(SOCIAL.format(xmpp=xmpp, social=social, extra=extra))
    return path


def test_a_social_config_needs_no_room_and_defaults_its_addresses(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path))
    assert cfg.social is not None and cfg.room == ""
    assert cfg.social.subnet == ipaddress.IPv4Network("172.31.0.0/16") and cfg.social.domain == "ipop"
    assert cfg.vnic_address == "172.31.0.1/16" and str(cfg.social.dns) == "172.31.255.254"
    assert cfg.vnic_offload  # super-frames, translated whole by the compiled data path (overlay/social/offload.py)
    assert not load_config(write(tmp_path, extra="[vnic]\nfast_path = false")).vnic_offload  # else all cut in Python
    cfg = load_config(write(tmp_path, social='subnet = "10.9.0.0/24"\ndomain = "Friends.Lan"\ndns = "10.9.0.53"'))
    assert cfg.social is not None and cfg.social.domain == "friends.lan" and str(cfg.social.dns) == "10.9.0.53"


@pytest.mark.parametrize(
    ("xmpp", "social", "extra", "error"),
    [
        ('room = "g@conference.example.test"', "", "", "two modes"),
        ("", "", "[group]\nopen = true", r"\[group\] belongs to a group"),
        ("", 'domain = "bad domain!"', "", "DNS name"),
        ("", 'dns = "10.1.2.3"', "", "must be a host of"),
        ("", 'dns = "172.31.0.1"', "", "must be a host of"),
        ("", "", '[vnic]\naddress = "10.1.0.1/16"', "not a host of"),
        ("", "", '[vnic]\naddress6 = "fd00::/64"', "address6 is not supported"),
        ("", "", "[metrics]", r"\[metrics\] is not served"),
    ],
)
def test_a_social_config_refuses_what_does_not_fit(
    tmp_path: Path, xmpp: str, social: str, extra: str, error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        load_config(write(tmp_path, xmpp, social, extra))


def test_status_table_lists_friends_devices_names_and_warnings() -> None:
    status = {
        "mode": "social",
        "node_id": "00000000000000aa",
        "jid": DEVICE,
        "address": "172.31.0.1/16",
        "dns": "172.31.255.254",
        "domain": "ipop",
        "endpoint": "198.18.0.2:5800",
        "lanes": 1,
        "xmpp": "reconnecting",
        "warnings": ["bob@example.test/phone presents a new node key"],
        "requests": ["dave@example.test"],
        "friends": [
            {"jid": "bob@example.test", "devices": [
                {"device": "bob@example.test/desk", "address": "172.31.7.9", "names": ["bob.ipop", "desk.bob.ipop"],
                 "link": "srflx", "rtt_ms": 1.5, "tx_bytes": 10, "rx_bytes": 20, "warning": None},
            ]},
            {"jid": "carol@example.test", "devices": []},
        ],
    }  # fmt: skip
    text = _social_table(status)
    assert "WARNING  bob@example.test/phone presents a new node key" in text
    assert "dave@example.test" in text and "friend accept" in text
    assert "172.31.7.9" in text and "desk.bob.ipop" in text and "srflx" in text and "1.50 ms" in text
    assert "carol@example.test  (no device online)" in text
    assert "xmpp     reconnecting  (links stay" in text
    assert "data     compiled, 1 lane" in text
    assert "data     Python" in _social_table({**status, "lanes": 0})
    turn = {"server": "turn:198.18.0.4:3478?transport=udp", "relayed": None, "error": "no answer"}
    ice = {"mapping": "endpoint-independent NAT mapping (2 STUN server addresses agree)", "turn": [turn]}
    lines = _social_table({**status, "ice": ice}).splitlines()
    assert "nat      endpoint-independent NAT mapping (2 STUN server addresses agree)" in lines
    assert "turn     turn:198.18.0.4:3478?transport=udp no allocation: no answer" in lines


def test_check_says_what_a_social_node_would_do(tmp_path: Path) -> None:
    from overlay.check import Report, report_lines

    text = "\n".join(report_lines(load_config(write(tmp_path)), Report((), 0xAB)))
    assert "watch its friends" in text and "enter room" not in text
    assert "pinned on first use" in text and "names under .ipop answered at 172.31.255.254" in text
    assert "admit anyone" not in text and "172.31.0.1/16" in text

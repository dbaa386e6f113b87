"""The node's one configuration file (TOML): what every key means, its type, its default, and the checks.

Every problem is one `ConfigError` line naming the file, the key and the value, so `ipop-overlay join` can exit
with a message a person can act on. Unknown keys are errors (with a suggestion), never silently ignored: a
misspelled `lisen` must not fall back to a default listen address.
"""

from __future__ import annotations

import difflib
import ipaddress
import ssl
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overlay import configvalues as check
from overlay.routing.ring import RingParams
from overlay.transport.paths import IceSettings, TurnServer
from overlay.transport.servers import parse_turn_url
from overlay.wire import Endpoint


class ConfigError(Exception):
    """One line: the file, the key, the value, what is wrong."""


@dataclass(frozen=True)
class NodeConfig:
    """A node's settings, resolved: relative paths are made relative to the config file."""

    path: Path
    key: Path  # [node] key: Ed25519 private key from `ipop-overlay keygen`
    control_socket: Path  # [node] control_socket: where `ipop-overlay status` reaches the running node
    listen: Endpoint  # [node] listen: underlay UDP address "host:port" for tunnels
    jid: str  # [xmpp] jid: "user@domain/resource"
    password: str  # [xmpp] password or password_file
    host: str | None  # [xmpp] host: XMPP server address; default the JID's domain
    port: int  # [xmpp] port (STARTTLS), default 5222
    room: str  # [xmpp] room: the group, a members-only room "name@conference.domain"
    ca_file: Path | None  # [xmpp] ca_file: trust this CA for the server's certificate (self-signed servers)
    anchors: int  # [xmpp] anchors: how many nodes stay in the room to answer joiners (default 3)
    vnic_name: str  # [vnic] name: the TAP device's name (default "ipop0")
    vnic_address: str | None  # [vnic] address: virtual IPv4 address with prefix; None: the issuer picks one
    # [vnic] address6: optional IPv6 inside the VPN. A prefix ("fd12:3456:789a:1::/64", host bits zero): the
    # node's address is the prefix and its node ID (resolve_address6); a host address: that address.
    vnic_address6: str | None
    vnic_mtu: int  # [vnic] mtu (default 1400: fits a 1500-byte underlay with our headers)
    vnic_offload: bool  # [vnic] offload: TSO super-frames from the TAP (default true, off for [social]; docs/design.md)
    # [vnic] fast_path: data on established links in compiled code on a thread of its own (default true;
    # docs/datapath.md); false sends every packet through the Python path.
    vnic_fast_path: bool
    # [vnic] lanes: Engines (threads, TAP queues, sockets on the port) of the compiled path; "auto" (default):
    # one on 1 CPU, two on 2-5, one per two CPUs above that, at most 4 (docs/datapath.md, Lanes)
    vnic_lanes: int
    ring: RingParams  # [overlay] ring_size, long_links, incoming_cap
    lookahead: bool  # [overlay] lookahead: neighbour-of-neighbour routing (default true)
    routing: str  # [overlay] routing: "promise" (default) or "strict" watermark rule for data packets
    on_demand_rate: int  # [overlay] on_demand_rate: bytes/s through relays that earns a direct link; 0: never
    on_demand_idle: int  # [overlay] on_demand_idle: seconds an on-demand link may idle before it is released
    ice: bool  # whether an [ice] section is present: links are set up with ICE (docs/nat-traversal.md)
    stun: tuple[Endpoint, ...]  # [ice] stun: STUN servers "host:port", for server-reflexive candidates
    turn: tuple[TurnServer, ...]  # [ice] turn: TURN servers (url, username, password or password_file)
    group_key: bytes | None = None  # [group] public_key or public_key_file: the pinned group key; None if open
    issuer: IssuerConfig | None = None  # [issuer]: this node signs the group's certificates
    metrics: Endpoint | None = None  # [metrics] listen: where Prometheus scrapes /metrics; None: off (default)
    social: SocialConfig | None = None  # [social]: a SocialVPN node (friends, no room); None: GroupVPN


@dataclass(frozen=True)
class SocialConfig:
    """[social]: the node links to its XMPP friends' devices and places them in its own subnet (docs/socialvpn.md)."""

    subnet: ipaddress.IPv4Network  # [social] subnet: where friends' devices get addresses (default 172.31.0.0/16)
    domain: str  # [social] domain: names <user>.<domain> and <resource>.<user>.<domain> (default "ipop")
    dns: ipaddress.IPv4Address  # [social] dns: where the node answers DNS for those names (default: last host)


@dataclass(frozen=True)
class IssuerConfig:
    group_key: Path  # [issuer] group_key: the group's private key from `ipop-overlay group init` (mode 0600)
    subnet: ipaddress.IPv4Network  # [issuer] subnet: addresses to hand out (default 10.254.0.0/16)
    lifetime: int  # [issuer] lifetime: certificate lifetime in seconds (default 86400; members renew at half)
    state_file: Path  # [issuer] state_file: allocations, member list, revocations (default next to group_key)


_SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    # section -> key -> (check, default); default ... means required
    "node": {
        "key": (check.string, ...),
        "control_socket": (check.string, "/run/ipop-overlay/node.sock"),
        "listen": (check.endpoint, ("0.0.0.0", 5800)),
    },
    "xmpp": {
        "jid": (check.jid, ...),
        "password": (check.string, None),
        "password_file": (check.string, None),
        "host": (check.string, None),
        "port": (check.int_range(1, 65535), 5222),
        "room": (check.jid, ...),
        "ca_file": (check.string, None),
        "anchors": (check.int_range(1, 16), 3),
    },
    "vnic": {
        "name": (check.ifname, "ipop0"),
        "address": (check.interface, None),
        "address6": (check.interface6, None),
        "mtu": (check.int_range(576, 9000), 1400),
        "offload": (check.boolean, True),
        "fast_path": (check.boolean, True),
        "lanes": (check.lanes, "auto"),
    },
    "overlay": {
        "ring_size": (check.int_range(1, 8), RingParams().ring_size),
        "long_links": (check.int_range(0, 32), RingParams().long_links),
        "incoming_cap": (check.int_range(0, 128), RingParams().incoming_cap),
        "lookahead": (check.boolean, True),
        "routing": (check.choice("promise", "strict"), "promise"),
        "on_demand_rate": (check.int_range(0, 1 << 40), 65536),
        "on_demand_idle": (check.int_range(5, 86400), 60),
    },
    "group": {
        "public_key": (check.string, None),
        "public_key_file": (check.string, None),
        "open": (check.boolean, False),
    },
    "social": {
        "subnet": (check.subnet, ipaddress.IPv4Network("172.31.0.0/16")),
        "domain": (check.domain, "ipop"),
        "dns": (lambda v: ipaddress.IPv4Address(check.string(v)), None),
    },
    "issuer": {
        "group_key": (check.string, ...),
        "subnet": (check.subnet, ipaddress.IPv4Network("10.254.0.0/16")),
        "lifetime": (check.int_range(600, 365 * 86400), 86400),
        "state_file": (check.string, None),
    },
    "metrics": {
        "listen": (check.endpoint, ("127.0.0.1", 9469)),
    },
    "ice": {
        "stun": (check.server_list, ()),
        "turn": (lambda v: v, ()),  # a list of tables, checked by _turn_servers
    },
}
_TURN_KEYS = ("url", "username", "password", "password_file", "ca_file")


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(choices)})"


def load_config(path: Path) -> NodeConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None

    values: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        if section not in _SCHEMA:
            raise ConfigError(f"{path}: unknown section [{section}]{_suggest(section, list(_SCHEMA))}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a [section]")
        for key in table:
            if key not in _SCHEMA[section]:
                raise ConfigError(f"{path}: unknown key [{section}] {key}{_suggest(key, list(_SCHEMA[section]))}")
    for section, keys in _SCHEMA.items():
        if section in ("issuer", "social") and section not in raw:
            continue
        table = raw.get(section, {})
        out = values.setdefault(section, {})
        for key, (checked, default) in keys.items():
            if key not in table:
                if default is ... and not (section == "xmpp" and key == "room" and "social" in raw):
                    raise ConfigError(f"{path}: missing key [{section}] {key}")
                out[key] = default if default is not ... else None
                continue
            try:
                out[key] = checked(table[key])
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{path}: bad value for [{section}] {key} = {table[key]!r}: {e}") from None

    base = path.resolve().parent

    def rel(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    x = values["xmpp"]
    if (x["password"] is None) == (x["password_file"] is None):
        raise ConfigError(f"{path}: set exactly one of [xmpp] password and [xmpp] password_file")
    if x["password_file"] is not None:
        pw_path = rel(x["password_file"])
        password = _read_secret(path, "[xmpp] password_file", pw_path)
        if not password:
            raise ConfigError(f"{path}: [xmpp] password_file {pw_path} is empty")
    else:
        password = x["password"]
    ca = rel(x["ca_file"]) if x["ca_file"] else None
    if ca is not None and not ca.is_file():
        raise ConfigError(f"{path}: [xmpp] ca_file {ca} does not exist")
    o = values["overlay"]
    turn = _turn_servers(path, values["ice"]["turn"], rel)
    social = _social_section(path, raw, values) if "social" in values else None
    group_key = _group_key(path, values["group"], rel) if social is None else None
    issuer = None
    if "issuer" in values:
        i = values["issuer"]
        key_path = rel(i["group_key"])
        issuer = IssuerConfig(
            group_key=key_path,
            subnet=i["subnet"],
            lifetime=i["lifetime"],
            state_file=rel(i["state_file"]) if i["state_file"] else key_path.parent / "issuer-state.json",
        )
        if group_key is None:
            raise ConfigError(f"{path}: an [issuer] needs the group's public key in [group] public_key(_file)")
    address = values["vnic"]["address"] if social is None else social[1]
    if address is None and group_key is None:
        raise ConfigError(f"{path}: missing key [vnic] address (only a group with an issuer hands addresses out)")
    if address is not None and issuer is not None and ipaddress.IPv4Interface(address).ip not in issuer.subnet:
        raise ConfigError(f"{path}: [vnic] address {address} is outside [issuer] subnet {issuer.subnet}")
    address6 = values["vnic"]["address6"]
    if address6 is not None and group_key is not None and not check.is_prefix6(address6):
        raise ConfigError(
            f"{path}: [vnic] address6 {address6} is a host address; in a group with certificates write the prefix "
            'alone (like "fd12:3456:789a:1::/64"): each node\'s address is derived from its key'
        )
    return NodeConfig(
        path=path,
        key=rel(values["node"]["key"]),
        control_socket=rel(values["node"]["control_socket"]),
        listen=values["node"]["listen"],
        jid=x["jid"],
        password=password,
        host=x["host"],
        port=x["port"],
        room=x["room"] or "",
        ca_file=ca,
        anchors=x["anchors"],
        vnic_name=values["vnic"]["name"],
        vnic_address=address,
        vnic_address6=address6,
        vnic_mtu=values["vnic"]["mtu"],
        # A social node's super-frames and partial checksums are translated whole by the compiled data path only
        # (overlay/social/offload.py): without it every one would be cut in Python, so its TAP has no offload.
        vnic_offload=values["vnic"]["offload"] and (social is None or values["vnic"]["fast_path"]),
        vnic_fast_path=values["vnic"]["fast_path"],
        vnic_lanes=check.lanes(values["vnic"]["lanes"]),  # "auto" (the default, unchecked above) to a number
        ring=RingParams(o["ring_size"], o["long_links"], o["incoming_cap"]),
        lookahead=o["lookahead"],
        routing=o["routing"],
        on_demand_rate=o["on_demand_rate"],
        on_demand_idle=o["on_demand_idle"],
        ice="ice" in raw,
        stun=values["ice"]["stun"],
        turn=turn,
        group_key=group_key,
        issuer=issuer,
        metrics=values["metrics"]["listen"] if "metrics" in raw else None,
        social=social[0] if social is not None else None,
    )


def _social_section(path: Path, raw: dict[str, Any], values: dict[str, dict[str, Any]]) -> tuple[SocialConfig, str]:
    """A SocialVPN node's [social] settings and its own TAP address: [social] replaces the room, the group and the
    overlay's settings."""
    for section in ("group", "issuer", "overlay"):
        if section in raw:
            raise ConfigError(f"{path}: [{section}] belongs to a group; a [social] node has friends instead: remove it")
    if "room" in raw.get("xmpp", {}):
        raise ConfigError(f"{path}: [xmpp] room and [social] are two modes: keep the room for a group, or [social]")
    if "metrics" in raw:
        raise ConfigError(f"{path}: [metrics] is not served by a [social] node yet: remove it (status has its numbers)")
    if values["vnic"]["address6"] is not None:
        raise ConfigError(f"{path}: [vnic] address6 is not supported by a [social] node yet: remove it")
    social = values["social"]
    subnet: ipaddress.IPv4Network = social["subnet"]
    address = values["vnic"]["address"] or f"{subnet.network_address + 1}/{subnet.prefixlen}"
    if ipaddress.IPv4Interface(address).network != subnet:
        raise ConfigError(f"{path}: [vnic] address {address} is not a host of [social] subnet {subnet}")
    dns = social["dns"] or subnet.broadcast_address - 1
    own = ipaddress.IPv4Interface(address).ip
    if dns not in subnet or dns in (subnet.network_address, subnet.broadcast_address, own):
        raise ConfigError(f"{path}: [social] dns {dns} must be a host of {subnet} other than the node's own address")
    return SocialConfig(subnet, social["domain"], dns), address


def ice_settings(cfg: NodeConfig, inside: ipaddress.IPv4Network) -> IceSettings | None:
    """The node's ICE settings ([ice]), or None without that section: never a candidate on our own TAP or inside
    the VPN's addresses `inside` (docs/nat-traversal.md)."""
    if not cfg.ice:
        return None
    return IceSettings(
        stun=cfg.stun, turn=cfg.turn, exclude_interfaces=frozenset({cfg.vnic_name}), exclude_networks=(inside,)
    )


def _read_secret(path: Path, what: str, secret: Path) -> str:
    """A password file's text; refused when others may read it (like ssh refuses a readable private key)."""
    try:
        mode = secret.stat().st_mode
        text = secret.read_text().strip("\r\n")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} {secret}: {e.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"{path}: {what} {secret} is readable by others (mode {mode & 0o777:o}); run 'chmod 600 {secret}'"
        )
    return text


def _group_key(path: Path, group: dict[str, Any], rel: Callable[[str], Path]) -> bytes | None:
    from overlay.identity import KeyFileError
    from overlay.trust.groupkey import load_public_key, parse_public_key

    given = [k for k in ("public_key", "public_key_file") if group[k] is not None]
    if len(given) > 1:
        raise ConfigError(f"{path}: set only one of [group] public_key and [group] public_key_file")
    if not given:
        if group["open"]:
            return None
        raise ConfigError(
            f"{path}: missing [group] public_key (the group's key from 'ipop-overlay group init'); "
            "set [group] open = true only for a group without certificates, which admits anyone who can reach it"
        )
    if group["open"]:
        raise ConfigError(f"{path}: [group] open = true and a group public key exclude each other")
    try:
        if group["public_key"] is not None:
            return parse_public_key(group["public_key"])
        return load_public_key(rel(group["public_key_file"]))
    except ValueError as e:
        raise ConfigError(f"{path}: bad value for [group] public_key: {e}") from None
    except KeyFileError as e:
        raise ConfigError(f"{path}: {e}") from None


def _turn_servers(path: Path, value: Any, rel: Callable[[str], Path]) -> tuple[TurnServer, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{path}: bad value for [ice] turn: expected a list of {{ url = ..., username = ... }}")
    servers = []
    for i, entry in enumerate(value):
        where = f"{path}: [ice] turn[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f'{where}: expected a table like {{ url = "turn:HOST:3478", username = "u" }}')
        for key in entry:
            if key not in _TURN_KEYS:
                raise ConfigError(f"{where}: unknown key {key}{_suggest(key, list(_TURN_KEYS))}")
        try:
            host, port, transport = parse_turn_url(check.string(entry.get("url")))
            username = check.string(entry.get("username"))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
        if ("password" in entry) == ("password_file" in entry):
            raise ConfigError(f"{where}: set exactly one of password and password_file")
        if "password_file" in entry:
            password = _read_secret(path, f"[ice] turn[{i}] password_file", rel(str(entry["password_file"])))
        else:
            password = entry["password"] if isinstance(entry["password"], str) else ""
        if not password:
            raise ConfigError(f"{where}: empty password")
        ca_file = None
        if "ca_file" in entry:
            if transport != "tls":
                raise ConfigError(f"{where}: ca_file is for a turns: URL (TLS) only")
            ca_file = str(rel(check.string(entry["ca_file"])))
            try:
                ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise ConfigError(f"{where}: ca_file {ca_file}: not a readable PEM certificate file ({e})") from None
        servers.append(TurnServer(host, port, transport, username, password, ca_file))
    return tuple(servers)

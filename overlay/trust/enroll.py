"""A member's first certificate: asked for in the XMPP room, from a node marked as the group's issuer.

The request goes as a private message to the issuer's occupant; the issuer reads our real JID from the room
(it owns the room, so the server shows it) and checks it against the member list. An issuer node issues its own
certificate directly. A joiner with no issuer in the room waits, saying so once; a refusal that waiting cannot
fix (an address that is another member's, an address outside the group's subnet) ends the join with the
issuer's reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from overlay.identity import Identity
from overlay.trust.certs import CertError, Certificate, decode_certificate
from overlay.trust.issuer import Issuer, IssuerError, decode_answer, make_request
from overlay.trust.members import GroupTrust

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 5.0
# Our choice: each unanswered request waits twice as long for its answer as the one before, up to this. An
# issuer slow to answer (one of 100 processes starting on two cores took 8 s for 100 answers, docs/scale.md) is
# then asked less often while it catches up, and its answer to an earlier ask arriving while we wait on a later
# one is taken (the room matches answers by nick). Asking again costs the issuer little: it answers with the
# certificate it just issued (issuer.py REISSUE_SHARE).
ANSWER_MAX = 40.0
# Our choice: the issuer reads the member list every 10 s (overlay/trust/service.py MEMBER_POLL) and at once on
# a request from a JID it does not know, so "not a member" is asked again for a while before it is believed.
NOT_MEMBER_TRIES = 6
RETRY = 3.0
REENTER_MAX = 60.0  # our choice: the longest wait between tries to log in again after the session dropped


class EnrollError(Exception):
    """The group will not give us a certificate: one line for the person who ran `join`."""


def _nick_id(nick: str) -> int | None:
    try:
        return int(nick, 16) if len(nick) == 16 else None
    except ValueError:
        return None


async def obtain_certificate(
    bootstrap: Any,
    identity: Identity,
    trust: GroupTrust,
    room: str,
    jid: str,
    wanted: ipaddress.IPv4Address | None,
    issuer: Issuer | None,
    stop: asyncio.Event,
    saved: Path | None = None,
) -> Certificate | None:
    """Our certificate, set on `trust`; None if `stop` was set while we waited. While no issuer is in the room,
    a certificate kept in `saved` from an earlier run is used if it is valid for more than a quarter of its
    life (a member restarts while no issuer is up); a new one is written there."""
    if issuer is None and not getattr(bootstrap, "issuers", []):
        cert = load_saved(saved, trust, wanted, jid)
        if cert is not None:
            log.info("no issuer in the room: using our saved certificate (%s as %s)", cert.jid, cert.address)
            return cert
    if issuer is not None:
        cert = await _issue_own(bootstrap, identity, trust, room, jid, wanted, issuer)
    else:
        cert = await _ask(bootstrap, identity, trust, room, wanted, stop)
    if cert is not None and saved is not None:
        _save(saved, cert)
    return cert


def load_saved(
    saved: Path | None, trust: GroupTrust, wanted: ipaddress.IPv4Address | None, jid: str
) -> Certificate | None:
    """The certificate kept in `saved`, set on `trust`, if it is ours, for `wanted` and valid for more than a
    quarter of its life; else None."""
    if saved is None or not saved.exists():
        return None
    try:
        cert = decode_certificate(saved.read_bytes())
        trust.set_certificate(cert)
    except (OSError, CertError, ValueError) as e:
        log.info("saved certificate %s not used: %s", saved, e)
        trust.certificate = None
        return None
    life = (cert.not_after_ms - cert.issued_ms) / 1000
    fresh = cert.not_after_ms / 1000 - time.time() > life / 4
    if not fresh or (wanted is not None and cert.address.ip != wanted) or cert.jid != jid.split("/", 1)[0].lower():
        trust.certificate = None
        return None
    return cert


def _save(path: Path, cert: Certificate) -> None:
    """Write atomically (a certificate is public, but a torn file would cost a restart its certificate)."""
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(cert.encode())
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot keep our certificate in %s: %s", path, e.strerror)


async def _ask(
    bootstrap: Any,
    identity: Identity,
    trust: GroupTrust,
    room: str,
    wanted: ipaddress.IPv4Address | None,
    stop: asyncio.Event,
) -> Certificate | None:
    from xmpp_bootstrap.session import BootstrapError

    said_waiting = False
    not_member = 0
    wait = ANSWER_TIMEOUT
    away, said = RETRY, ""
    while not stop.is_set():
        if not bootstrap.in_room:
            # The session dropped (a server restart, a network change) while we waited: nothing else logs us back
            # in before we have a certificate, and out of the room no issuer would ever be seen.
            try:
                await bootstrap.start()
                away, said = RETRY, ""
            except BootstrapError as e:
                if not (e.transient or e.unreachable):  # unreachable: the server we were just in is restarting
                    raise EnrollError(str(e)) from None
                if str(e) != said:
                    log.warning("%s; trying again (backing off up to %.0f s)", e, REENTER_MAX)
                    said = str(e)
                await _sleep(stop, away * random.uniform(0.75, 1.25))
                away = min(2 * away, REENTER_MAX)
            continue
        issuers = list(getattr(bootstrap, "issuers", []))
        trust.issuers.update(i for i in map(_nick_id, issuers) if i is not None)
        if not issuers:
            if not said_waiting:
                log.warning("waiting for an issuer of the group (a node with an [issuer] section) to be in %s", room)
                said_waiting = True
            await _sleep(stop, RETRY)
            continue
        request = make_request(identity, room, time.time(), wanted).encode()
        nick = random.choice(issuers)
        try:
            answers = await bootstrap.exchange({nick: request}, timeout=wait)
        except BootstrapError:
            continue  # out of the room: entered again above
        answer = answers.get(nick)
        if answer is None:
            log.info("no certificate answer from issuer %s in %.0f s; asking again", nick, wait)
            wait = min(2 * wait, ANSWER_MAX)
            await _sleep(stop, RETRY)
            continue
        try:
            result = decode_answer(answer)
        except CertError as e:
            log.warning("issuer %s answered with something malformed (%s)", nick, e)
            await _sleep(stop, RETRY)
            continue
        if isinstance(result, Certificate):
            try:
                trust.set_certificate(result)
            except ValueError as e:
                raise EnrollError(f"issuer {nick} gave a certificate we cannot use: {e}") from None
            _check_wanted(result, wanted)
            log.info("certificate from issuer %s: %s as %s", nick, result.jid, result.address)
            return result
        if "is not a member" in result and not_member < NOT_MEMBER_TRIES:
            not_member += 1
            await _sleep(stop, RETRY)
            continue
        raise EnrollError(f"the group's issuer refused a certificate: {result}")
    return None


async def _issue_own(
    bootstrap: Any,
    identity: Identity,
    trust: GroupTrust,
    room: str,
    jid: str,
    wanted: ipaddress.IPv4Address | None,
    issuer: Issuer,
) -> Certificate:
    from xmpp_bootstrap.session import BootstrapError

    try:
        members = await bootstrap.fetch_affiliations()
    except BootstrapError as e:
        raise EnrollError(f"the issuer cannot read the member list of {room}: {e}") from None
    now = time.time()
    issuer.set_members(members, now)
    bare = jid.split("/", 1)[0].lower()
    try:
        cert = issuer.issue(make_request(identity, room, now, wanted), bare, now)
    except IssuerError as e:
        raise EnrollError(f"cannot issue our own certificate: {e}") from None
    trust.set_certificate(cert)
    _check_wanted(cert, wanted)
    log.info("issued our own certificate: %s as %s", cert.jid, cert.address)
    return cert


def _check_wanted(cert: Certificate, wanted: ipaddress.IPv4Address | None) -> None:
    if wanted is not None and cert.address.ip != wanted:
        raise EnrollError(f"the issuer gave {cert.address.ip}, not the configured [vnic] address {wanted}")


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass

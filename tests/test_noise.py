"""Noise handshakes (IK, XX): the cacophony test vectors, round trips, tampering, fuzzing, nonce exhaustion."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.transport.noise import (
    MAX_NONCE,
    CipherState,
    HandshakeState,
    KeyPair,
    NoiseError,
    Suite,
    SymmetricState,
    dh,
)

VECTORS_FILE = Path(__file__).parent / "vectors" / "noise_cacophony_ik_xx.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))["vectors"]
SUITES = [
    f"Noise_{p}_25519_{c}_{h}" for p in ("IK", "XX") for c in ("AESGCM", "ChaChaPoly") for h in ("SHA256", "BLAKE2s")
]
PROLOGUE = b"ipop-overlay test"


def _key(hex_or_none: str | None) -> KeyPair | None:
    return None if hex_or_none is None else KeyPair(bytes.fromhex(hex_or_none))


def _pub(hex_or_none: str | None) -> bytes | None:
    return None if hex_or_none is None else bytes.fromhex(hex_or_none)


def test_every_supported_suite_has_exactly_one_vector() -> None:
    assert sorted(v["protocol_name"] for v in VECTORS) == sorted(SUITES)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_cacophony_vector(vector: dict[str, Any]) -> None:
    name = vector["protocol_name"]
    init = HandshakeState(
        name,
        True,
        bytes.fromhex(vector["init_prologue"]),
        s=_key(vector.get("init_static")),
        e=_key(vector["init_ephemeral"]),
        rs=_pub(vector.get("init_remote_static")),
    )
    resp = HandshakeState(
        name,
        False,
        bytes.fromhex(vector["resp_prologue"]),
        s=_key(vector.get("resp_static")),
        e=_key(vector["resp_ephemeral"]),
        rs=_pub(vector.get("resp_remote_static")),
    )
    messages = [(bytes.fromhex(m["payload"]), bytes.fromhex(m["ciphertext"])) for m in vector["messages"]]
    handshake_len = len(Suite.parse(name).pattern.messages)
    assert len(messages) > handshake_len  # the vector goes on with transport messages
    for i, (payload, ciphertext) in enumerate(messages[:handshake_len]):
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        assert writer.write_message(payload) == ciphertext
        assert reader.read_message(ciphertext) == payload
    assert init.cipher_states is not None and resp.cipher_states is not None
    assert init.handshake_hash == resp.handshake_hash == bytes.fromhex(vector["handshake_hash"])
    # Messages alternate initiator, responder; after Split c1 carries initiator -> responder, c2 the reverse.
    for i, (payload, ciphertext) in enumerate(messages[handshake_len:], start=handshake_len):
        which = 0 if i % 2 == 0 else 1
        sender, receiver = (init, resp) if which == 0 else (resp, init)
        assert sender.cipher_states is not None and receiver.cipher_states is not None
        assert sender.cipher_states[which].encrypt_with_ad(b"", payload) == ciphertext
        assert receiver.cipher_states[which].decrypt_with_ad(b"", ciphertext) == payload


def parties(name: str) -> tuple[HandshakeState, HandshakeState, KeyPair, KeyPair]:
    si, sr = KeyPair.generate(), KeyPair.generate()
    rs = sr.public if "_IK_" in name else None
    return HandshakeState(name, True, PROLOGUE, s=si, rs=rs), HandshakeState(name, False, PROLOGUE, s=sr), si, sr


def run(init: HandshakeState, resp: HandshakeState) -> list[bytes]:
    """Drive a handshake to its end and return the messages as sent."""
    sent: list[bytes] = []
    i = 0
    while not (init.finished and resp.finished):
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        payload = f"payload {i}".encode()
        message = writer.write_message(payload)
        sent.append(message)
        assert reader.read_message(message) == payload
        i += 1
    return sent


@pytest.mark.parametrize("name", SUITES)
def test_round_trip(name: str) -> None:
    init, resp, si, sr = parties(name)
    sent = run(init, resp)
    assert len(sent) == (2 if "_IK_" in name else 3)
    assert init.handshake_hash == resp.handshake_hash
    assert resp.rs == si.public
    assert init.rs == sr.public
    assert init.cipher_states is not None and resp.cipher_states is not None
    (i1, i2), (r1, r2) = init.cipher_states, resp.cipher_states
    assert i1.k == r1.k and i2.k == r2.k and i1.k != i2.k
    for n in range(3):
        assert r1.decrypt_with_ad(b"ad", i1.encrypt_with_ad(b"ad", b"to responder %d" % n)) == b"to responder %d" % n
        assert i2.decrypt_with_ad(b"", r2.encrypt_with_ad(b"", b"to initiator %d" % n)) == b"to initiator %d" % n


def test_ik_initiator_addressing_another_key_fails() -> None:
    name = "Noise_IK_25519_AESGCM_SHA256"
    init = HandshakeState(name, True, PROLOGUE, s=KeyPair.generate(), rs=KeyPair.generate().public)
    resp = HandshakeState(name, False, PROLOGUE, s=KeyPair.generate())
    with pytest.raises(NoiseError):
        resp.read_message(init.write_message(b""))


def test_different_prologues_fail() -> None:
    name = "Noise_XX_25519_ChaChaPoly_BLAKE2s"
    init = HandshakeState(name, True, b"one", s=KeyPair.generate())
    resp = HandshakeState(name, False, b"two", s=KeyPair.generate())
    resp.read_message(init.write_message(b""))  # "-> e" carries nothing authenticated yet
    with pytest.raises(NoiseError):
        init.read_message(resp.write_message(b""))


def _tampered_handshake_fails(name: str, index: int, position: int, mask: int) -> bool:
    init, resp, _, _ = parties(name)
    i = 0
    while not (init.finished and resp.finished):
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        message = bytearray(writer.write_message(f"payload {i}".encode()))
        if i == index:
            message[position] ^= mask
        try:
            reader.read_message(bytes(message))
        except NoiseError:
            return True
        i += 1
    return False


@pytest.mark.parametrize("name", ["Noise_IK_25519_AESGCM_SHA256", "Noise_XX_25519_ChaChaPoly_BLAKE2s"])
def test_tampering_any_byte_of_any_handshake_message_fails(name: str) -> None:
    init, resp, _, _ = parties(name)
    sizes = [len(m) for m in run(init, resp)]
    for index, size in enumerate(sizes):
        for position in range(size):
            # 0x80 on a key's last byte is the bit X25519 ignores: the hash must still catch it.
            for mask in (0x01, 0x80):
                assert _tampered_handshake_fails(name, index, position, mask), (index, position, mask)


def test_a_failed_handshake_is_poisoned() -> None:
    init, resp, _, _ = parties("Noise_IK_25519_AESGCM_SHA256")
    good = init.write_message(b"x")
    with pytest.raises(NoiseError):
        resp.read_message(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(NoiseError, match="discarded"):
        resp.read_message(good)
    with pytest.raises(NoiseError, match="discarded"):
        resp.write_message(b"")


def test_out_of_turn_and_after_the_end() -> None:
    init, resp, _, _ = parties("Noise_XX_25519_AESGCM_SHA256")
    with pytest.raises(NoiseError, match="out of turn"):
        resp.write_message(b"")
    with pytest.raises(NoiseError, match="out of turn"):
        init.read_message(bytes(48))
    init, resp, _, _ = parties("Noise_XX_25519_AESGCM_SHA256")
    run(init, resp)
    with pytest.raises(NoiseError, match="finished"):
        init.write_message(b"")


def test_low_order_ephemeral_is_refused() -> None:
    _, resp, _, _ = parties("Noise_IK_25519_AESGCM_SHA256")
    with pytest.raises(NoiseError):
        resp.read_message(bytes(32 + 48 + 16))  # all-zero e: X25519 gives the all-zero secret


def test_oversized_messages_are_refused() -> None:
    _, resp, _, _ = parties("Noise_XX_25519_AESGCM_SHA256")
    with pytest.raises(NoiseError, match="exceeds"):
        resp.read_message(bytes(65536))
    init, _, _, _ = parties("Noise_XX_25519_AESGCM_SHA256")
    with pytest.raises(NoiseError, match="exceeds"):
        init.write_message(bytes(65535 - 31))


def test_constructor_checks_the_keys_the_pattern_needs() -> None:
    with pytest.raises(ValueError, match="needs the local static"):
        HandshakeState("Noise_XX_25519_AESGCM_SHA256", True)
    with pytest.raises(ValueError, match="pre-messages"):
        HandshakeState("Noise_IK_25519_AESGCM_SHA256", True, s=KeyPair.generate())
    with pytest.raises(ValueError, match="pre-messages"):
        HandshakeState("Noise_XX_25519_AESGCM_SHA256", True, s=KeyPair.generate(), rs=bytes(32))
    for bad in ("Noise_NN_25519_AESGCM_SHA256", "Noise_XX_448_AESGCM_SHA256", "Noise_XX_25519_AESGCM_SHA512", "XX"):
        with pytest.raises(ValueError, match="unsupported"):
            HandshakeState(bad, True, s=KeyPair.generate())


def _responder_after(name: str, messages: int) -> tuple[HandshakeState, HandshakeState]:
    init, resp, _, _ = parties(name)
    for i in range(messages):
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        reader.read_message(writer.write_message(b""))
    return init, resp


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(SUITES), data=st.binary(max_size=300), step=st.integers(0, 2))
def test_arbitrary_input_gives_only_noise_error(name: str, data: bytes, step: int) -> None:
    """Random bytes as the next message, for whichever side reads it: a payload or NoiseError, nothing else."""
    steps = 2 if "_IK_" in name else 3
    init, resp = _responder_after(name, step % steps)
    reader = resp if step % steps % 2 == 0 else init
    try:
        reader.read_message(data)
    except NoiseError:
        return
    # Only XX's "-> e" carries nothing authenticated, so only it can accept random bytes.
    assert name.startswith("Noise_XX_") and step % steps == 0 and len(data) >= 32


@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
def test_nonce_exhaustion(cipher: str) -> None:
    a, b = CipherState(cipher), CipherState(cipher)
    a.initialize_key(bytes(range(32)))
    b.initialize_key(bytes(range(32)))
    a.set_nonce(MAX_NONCE - 1)
    b.set_nonce(MAX_NONCE - 1)
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"last")) == b"last"
    assert a.n == b.n == MAX_NONCE
    with pytest.raises(NoiseError, match="exhausted"):
        a.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(NoiseError, match="exhausted"):
        b.decrypt_with_ad(b"", bytes(32))
    with pytest.raises(ValueError):
        a.set_nonce(MAX_NONCE + 1)


def test_nonce_layout_matches_the_cipher() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    key = bytes(range(32))
    for cipher, expected_nonce in (
        ("AESGCM", bytes(4) + (5).to_bytes(8, "big")),
        ("ChaChaPoly", bytes(4) + (5).to_bytes(8, "little")),
    ):
        cs = CipherState(cipher)
        cs.initialize_key(key)
        cs.set_nonce(5)
        aead = AESGCM(key) if cipher == "AESGCM" else ChaCha20Poly1305(key)
        assert cs.encrypt_with_ad(b"ad", b"msg") == aead.encrypt(expected_nonce, b"msg", b"ad")


def test_key_pair_and_dh_match_an_independent_x25519() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    a, b = KeyPair.generate(), KeyPair.generate()
    ref_a = X25519PrivateKey.from_private_bytes(a.private)
    assert a.public == ref_a.public_key().public_bytes_raw()
    assert dh(a, b.public) == dh(b, a.public) == ref_a.exchange(X25519PublicKey.from_public_bytes(b.public))
    assert a.private.hex() not in repr(a)
    with pytest.raises(NoiseError):
        dh(a, bytes(32))  # a low-order point: the all-zero output is refused (section 4.1)
    with pytest.raises(ValueError):
        KeyPair(bytes(31))


def test_transport_forgery_leaves_the_cipher_state_usable() -> None:
    a, b = CipherState("AESGCM"), CipherState("AESGCM")
    a.initialize_key(bytes(32))
    b.initialize_key(bytes(32))
    sealed = a.encrypt_with_ad(b"", b"data")
    for bad in (sealed[:-1] + bytes([sealed[-1] ^ 1]), sealed[:15], b""):
        with pytest.raises(NoiseError):
            b.decrypt_with_ad(b"", bad)
    assert b.n == 0
    assert b.decrypt_with_ad(b"", sealed) == b"data"


def test_rekey_keeps_both_ends_in_step() -> None:
    a, b = CipherState("ChaChaPoly"), CipherState("ChaChaPoly")
    a.initialize_key(bytes(32))
    b.initialize_key(bytes(32))
    b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"before"))
    old = a.k
    a.rekey()
    b.rekey()
    assert a.k == b.k != old and a.n == b.n == 1
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"after")) == b"after"


def test_without_a_key_cipher_state_is_the_identity() -> None:
    cs = CipherState("AESGCM")
    assert not cs.has_key()
    assert cs.encrypt_with_ad(b"ad", b"clear") == b"clear" == cs.decrypt_with_ad(b"ad", b"clear")
    with pytest.raises(NoiseError):
        cs.rekey()


def test_symmetric_state_initialization_and_mix_key_and_hash() -> None:
    short = SymmetricState(Suite.parse("Noise_IK_25519_AESGCM_SHA256"))
    assert short.h == short.ck == b"Noise_IK_25519_AESGCM_SHA256".ljust(32, b"\x00")
    exact = SymmetricState(Suite.parse("Noise_XX_25519_ChaChaPoly_SHA256"))
    assert exact.h == b"Noise_XX_25519_ChaChaPoly_SHA256"  # exactly HASHLEN bytes: used as is
    long = SymmetricState(Suite.parse("Noise_XX_25519_ChaChaPoly_BLAKE2s"))
    assert long.h == hashlib.blake2s(b"Noise_XX_25519_ChaChaPoly_BLAKE2s").digest()  # 33 bytes: hashed
    h, ck = short.h, short.ck
    short.mix_key_and_hash(b"psk")
    assert short.h != h and short.ck != ck and short.cipher_state.has_key()

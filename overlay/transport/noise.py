"""The Noise Protocol Framework handshake (revision 34, https://noiseprotocol.org/noise.html), IK and XX only.

The link layer's handshake (overlay/transport/session.py) is Noise IK: its patterns come with a published
analysis and cross-implementation test vectors. This module is the pure state machine: no
sockets, no indices, no clocks. Its objects follow the spec's section 5 one to one (CipherState,
SymmetricState, HandshakeState) so a reader can check them against the text line by line.

Suites: Noise_{IK,XX}_25519_{AESGCM,ChaChaPoly}_{SHA256,BLAKE2s}. Both hashes have HASHLEN 32, so no key
truncation (section 5.2) is ever needed; the 64-byte hashes are left out rather than carried untested.

Primitives: AES-256-GCM is Intel's ipsec-mb or OpenSSL's libcrypto (the same bytes either way, overlay/_gcm.h)
through overlay/_fast.c, the compiled module the data path already loads; ChaCha20-Poly1305 and X25519 are
libsodium through PyNaCl (already loaded for Ed25519); SHA256, BLAKE2s and HMAC are the standard library's.
So a node needs no `cryptography` package at run time.

Failure rule: every error that input or misuse can cause is a NoiseError (a ValueError). A HandshakeState that
raised once is poisoned: it refuses every later call, because a half-processed message may already have
changed its chaining key, hash or remote keys. A failed handshake must be discarded and, if wanted, started
anew. A transport CipherState is different: a failed decryption changes nothing (section 5.1: n is not
incremented), so a link can drop a forged packet and go on.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions

from overlay._fast import Forged, aesgcm_open, aesgcm_seal

DHLEN = 32  # section 12.1, Curve25519
HASHLEN = 32  # SHA256 and BLAKE2s (sections 12.5 and 12.7)
TAG_LEN = 16  # section 4.2: ENCRYPT returns plaintext + a 16-byte tag
MAX_NONCE = (1 << 64) - 1  # section 5.1: n = 2^64-1 is reserved (for rekeying), never used to encrypt
MAX_MESSAGE_LEN = 65535  # section 3: every Noise message is at most 65535 bytes

_BE_Q = struct.Struct(">Q")
_LE_Q = struct.Struct("<Q")


class NoiseError(ValueError):
    """A Noise message that is malformed, fails authentication, comes out of turn, or exhausts a nonce."""


def _aesgcm_encrypt(k: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    """Section 12.3: the nonce is 32 zero bits || n as a 64-bit big-endian integer."""
    return aesgcm_seal(k, b"\x00\x00\x00\x00" + _BE_Q.pack(n), ad, plaintext)


def _aesgcm_decrypt(k: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    try:
        return aesgcm_open(k, b"\x00\x00\x00\x00" + _BE_Q.pack(n), ad, ciphertext)
    except Forged:
        raise NoiseError("ciphertext fails authentication") from None


def _chachapoly_encrypt(k: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    """Section 12.4: the nonce is 32 zero bits || n as a 64-bit little-endian integer (RFC 8439's IETF form)."""
    return nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
        plaintext, ad, b"\x00\x00\x00\x00" + _LE_Q.pack(n), k
    )


def _chachapoly_decrypt(k: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    try:
        return nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt(
            ciphertext, ad, b"\x00\x00\x00\x00" + _LE_Q.pack(n), k
        )
    except nacl.exceptions.CryptoError:
        raise NoiseError("ciphertext fails authentication") from None


# Section 4.2's ENCRYPT(k, n, ad, plaintext) and DECRYPT(k, n, ad, ciphertext) per cipher name (section 12).
# DECRYPT raises NoiseError on authentication failure.
_Aead = Callable[[bytes, int, bytes, bytes], bytes]
_CIPHERS: dict[str, tuple[_Aead, _Aead]] = {
    "AESGCM": (_aesgcm_encrypt, _aesgcm_decrypt),
    "ChaChaPoly": (_chachapoly_encrypt, _chachapoly_decrypt),
}
_HASHES = {"SHA256": "sha256", "BLAKE2s": "blake2s"}


@dataclass(frozen=True)
class Pattern:
    """A handshake pattern of section 7: pre-message tokens per side, then the message token lists."""

    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]


# Section 7.5, the interactive fundamental patterns.
PATTERNS = {
    "IK": Pattern((), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se"))),
    "XX": Pattern((), (), (("e",), ("e", "ee", "s", "es"), ("s", "se"))),
}


@dataclass(frozen=True)
class Suite:
    """A parsed protocol name (section 8): the pattern and the cipher and hash functions."""

    name: str
    pattern: Pattern
    cipher: str
    hash_name: str

    @classmethod
    def parse(cls, protocol_name: str) -> Suite:
        parts = protocol_name.split("_")
        if len(parts) != 5 or parts[0] != "Noise" or parts[2] != "25519":
            raise ValueError(f"unsupported Noise protocol name {protocol_name!r}")
        if parts[1] not in PATTERNS or parts[3] not in _CIPHERS or parts[4] not in _HASHES:
            raise ValueError(f"unsupported Noise protocol name {protocol_name!r}")
        return cls(protocol_name, PATTERNS[parts[1]], parts[3], _HASHES[parts[4]])

    def hash_fn(self, data: bytes) -> bytes:
        return hashlib.new(self.hash_name, data).digest()

    def hkdf(self, chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
        """Section 4.3: HKDF with HMAC-HASH, chaining_key as salt, no info, 2 or 3 outputs of HASHLEN."""
        temp_key = hmac.digest(chaining_key, ikm, self.hash_name)
        out = [hmac.digest(temp_key, b"\x01", self.hash_name)]
        for i in range(2, outputs + 1):
            out.append(hmac.digest(temp_key, out[-1] + bytes([i]), self.hash_name))
        return out


class KeyPair:
    """A Curve25519 key pair (section 12.1) as raw 32-byte strings; libsodium clamps the private key in use."""

    __slots__ = ("private", "public")

    def __init__(self, private: bytes) -> None:
        if len(private) != DHLEN:
            raise ValueError(f"an X25519 private key is {DHLEN} bytes")
        self.private = bytes(private)
        self.public: bytes = nacl.bindings.crypto_scalarmult_base(self.private)

    @classmethod
    def generate(cls) -> KeyPair:
        """Section 4.1 GENERATE_KEYPAIR: any 32 random bytes are an X25519 private key (RFC 7748 section 5)."""
        return cls(os.urandom(DHLEN))

    def __repr__(self) -> str:  # the private half stays out of logs and tracebacks
        return f"KeyPair(public={self.public.hex()})"


def dh(key_pair: KeyPair, public: bytes) -> bytes:
    """Section 4.1 DH over X25519 (12.1); a low-order public key (all-zero result) is refused, as 4.1 allows."""
    try:
        # libsodium itself fails on an all-zero result; the check below keeps the rule independent of that.
        shared = nacl.bindings.crypto_scalarmult(key_pair.private, public)
    except nacl.exceptions.CryptoError:
        raise NoiseError("remote X25519 key is not usable") from None
    if hmac.compare_digest(shared, bytes(DHLEN)):
        raise NoiseError("remote X25519 key is not usable")
    return shared


class CipherState:
    """Section 5.1: a key k (None is the spec's "empty") and a 64-bit nonce counter n."""

    def __init__(self, cipher: str) -> None:
        self._encrypt, self._decrypt = _CIPHERS[cipher]
        self.k: bytes | None = None
        self.n = 0

    def initialize_key(self, key: bytes | None) -> None:
        if key is not None and len(key) != 32:
            raise ValueError("a Noise cipher key is 32 bytes")  # section 4.2
        self.k = key
        self.n = 0

    def has_key(self) -> bool:
        return self.k is not None

    def set_nonce(self, nonce: int) -> None:
        if not 0 <= nonce <= MAX_NONCE:
            raise ValueError("a Noise nonce is a 64-bit unsigned integer")
        self.n = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.k is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce exhausted: this CipherState must not encrypt again")
        ciphertext = self._encrypt(self.k, self.n, ad, plaintext)
        self.n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self.k is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce exhausted: this CipherState must not decrypt again")
        if len(ciphertext) < TAG_LEN:
            raise NoiseError("ciphertext shorter than its authentication tag")
        plaintext = self._decrypt(self.k, self.n, ad, ciphertext)
        self.n += 1  # only on success: a forged message leaves the state as it was
        return plaintext

    def rekey(self) -> None:
        """Section 4.2 REKEY: the first 32 bytes of ENCRYPT(k, 2^64-1, empty, 32 zero bytes); n is kept."""
        if self.k is None:
            raise NoiseError("cannot rekey a CipherState without a key")
        key = self._encrypt(self.k, MAX_NONCE, b"", bytes(32))[:32]
        n = self.n
        self.initialize_key(key)
        self.n = n


class SymmetricState:
    """Section 5.2: the chaining key ck, the handshake hash h and the CipherState they key."""

    def __init__(self, suite: Suite) -> None:
        """InitializeSymmetric(protocol_name)."""
        self.suite = suite
        name = suite.name.encode("ascii")
        self.h = name.ljust(HASHLEN, b"\x00") if len(name) <= HASHLEN else suite.hash_fn(name)
        self.ck = self.h
        self.cipher_state = CipherState(suite.cipher)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = self.suite.hkdf(self.ck, ikm, 2)
        self.cipher_state.initialize_key(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = self.suite.hash_fn(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        """Used by the psk modifiers (section 9), which IK and XX do not take; kept for completeness."""
        self.ck, temp_h, temp_k = self.suite.hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher_state.initialize_key(temp_k)

    def get_handshake_hash(self) -> bytes:
        return self.h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher_state.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher_state.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """The pair (c1, c2): c1 encrypts initiator -> responder, c2 responder -> initiator."""
        temp_k1, temp_k2 = self.suite.hkdf(self.ck, b"", 2)
        c1, c2 = CipherState(self.suite.cipher), CipherState(self.suite.cipher)
        c1.initialize_key(temp_k1)
        c2.initialize_key(temp_k2)
        return c1, c2


class HandshakeState:
    """Section 5.3: one party's side of a handshake.

    `s` is the local static KeyPair, `rs` the remote static public key (required where the pattern has it
    as a pre-message: the initiator's rs in IK). `e` injects the local ephemeral: for test vectors only,
    since an ephemeral must never be reused; left None, a fresh one is generated per section 5.3's "e" token.
    `re` exists for patterns with an ephemeral pre-message; IK and XX have none, so it must stay None.
    """

    def __init__(
        self,
        protocol_name: str,
        initiator: bool,
        prologue: bytes = b"",
        s: KeyPair | None = None,
        e: KeyPair | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
    ) -> None:
        suite = Suite.parse(protocol_name)
        pattern = suite.pattern
        self.initiator = initiator
        self.s, self.e, self.rs, self.re = s, e, rs, re
        self.symmetric = SymmetricState(suite)
        self.symmetric.mix_hash(prologue)
        local_pre, remote_pre = pattern.initiator_pre, pattern.responder_pre
        if not initiator:
            local_pre, remote_pre = remote_pre, local_pre
        sends_s = any("s" in pattern.messages[i] for i in range(0 if initiator else 1, len(pattern.messages), 2))
        if s is None and ("s" in local_pre or sends_s):
            raise ValueError(f"{protocol_name} needs the local static key pair s")
        if e is None and "e" in local_pre:
            raise ValueError(f"{protocol_name} needs the local ephemeral key pair e")
        if ("s" in remote_pre) != (rs is not None) or ("e" in remote_pre) != (re is not None):
            raise ValueError(f"{protocol_name}: give rs and re exactly when the pattern has them as pre-messages")
        # Section 5.3, Initialize: one MixHash per pre-message public key, the initiator's first.
        for is_local, tokens in ((initiator, pattern.initiator_pre), (not initiator, pattern.responder_pre)):
            for token in tokens:
                self.symmetric.mix_hash(self._local_public(token) if is_local else self._remote(token))
        self._messages = pattern.messages
        self._next = 0  # index of the next message pattern; even ones are the initiator's to write
        self._failed = False
        self.cipher_states: tuple[CipherState, CipherState] | None = None

    @property
    def finished(self) -> bool:
        return self.cipher_states is not None

    @property
    def handshake_hash(self) -> bytes:
        """Channel binding value h (section 11.2); the same on both sides once the handshake is finished."""
        return self.symmetric.get_handshake_hash()

    def write_message(self, payload: bytes) -> bytes:
        self._turn(writing=True)
        try:
            out = bytearray()
            for token in self._messages[self._next]:
                if token == "e":
                    if self.e is None:
                        self.e = KeyPair.generate()
                    e_pub = self.e.public
                    out += e_pub
                    self.symmetric.mix_hash(e_pub)
                elif token == "s":
                    out += self.symmetric.encrypt_and_hash(self._local_public("s"))
                else:
                    self._mix_dh(token)
            out += self.symmetric.encrypt_and_hash(payload)
            if len(out) > MAX_MESSAGE_LEN:
                raise NoiseError(f"handshake message of {len(out)} bytes exceeds {MAX_MESSAGE_LEN}")
        except Exception:
            self._failed = True
            raise
        self._advance()
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Process one received handshake message and return its payload; NoiseError poisons this state."""
        self._turn(writing=False)
        try:
            if len(message) > MAX_MESSAGE_LEN:
                raise NoiseError(f"handshake message of {len(message)} bytes exceeds {MAX_MESSAGE_LEN}")
            view = memoryview(message)
            for token in self._messages[self._next]:
                if token in ("e", "s"):
                    size = DHLEN + (TAG_LEN if token == "s" and self.symmetric.cipher_state.has_key() else 0)
                    if len(view) < size:
                        raise NoiseError("handshake message too short")
                    field, view = bytes(view[:size]), view[size:]
                    if token == "e":
                        self.re = field
                        self.symmetric.mix_hash(field)
                    else:
                        self.rs = self.symmetric.decrypt_and_hash(field)
                else:
                    self._mix_dh(token)
            payload = self.symmetric.decrypt_and_hash(bytes(view))
        except Exception:
            self._failed = True
            raise
        self._advance()
        return payload

    def _turn(self, writing: bool) -> None:
        if self._failed:
            raise NoiseError("this handshake failed before and must be discarded")
        if self._next >= len(self._messages):
            raise NoiseError("the handshake is already finished")
        if ((self._next % 2 == 0) == self.initiator) != writing:
            self._failed = True
            raise NoiseError("handshake message out of turn")

    def _advance(self) -> None:
        self._next += 1
        if self._next == len(self._messages):
            self.cipher_states = self.symmetric.split()

    def _local(self, token: str) -> KeyPair:
        key = self.e if token == "e" else self.s
        if key is None:  # unreachable for IK and XX, whose keys are checked at construction
            raise NoiseError(f"local {token} key missing")
        return key

    def _local_public(self, token: str) -> bytes:
        return self._local(token).public

    def _remote(self, token: str) -> bytes:
        key = self.re if token == "e" else self.rs
        if key is None:  # unreachable for IK and XX: a DH token never precedes the remote key it uses
            raise NoiseError(f"remote {token} key missing")
        return key

    def _mix_dh(self, token: str) -> None:
        """Section 5.3: ee, es, se, ss; the first letter is the initiator's key, the second the responder's."""
        ours, theirs = (token[0], token[1]) if self.initiator else (token[1], token[0])
        self.symmetric.mix_key(dh(self._local(ours), self._remote(theirs)))

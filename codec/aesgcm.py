"""AES-GCM encryption of Temporal payloads, with key ids for rotation.

An encrypted payload carries two metadata entries: ``encoding`` = ``binary/encrypted`` (the
marker) and ``encryption-key-id`` (which key sealed it). Its data is a 12-byte random nonce
followed by the AES-GCM ciphertext of the whole original payload (metadata and data, as
protobuf), with the key id as associated data so the id cannot be swapped on a payload.

New payloads are sealed with the current key; any configured key opens old ones, so a key is
rotated by adding the new one, making it current, and removing the old one only once no
history still needs it. A payload without the marker passes through unchanged, so histories
written before encryption was turned on still decode.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
NONCE_BYTES = 12
KEY_BYTES = (16, 24, 32)
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class CodecError(ValueError):
    """A payload or a key the codec cannot use; the message never contains key material."""


class UnknownKeyError(CodecError):
    """A payload sealed with a key that is not (or no longer) configured."""


def parse_key(key_id: str, encoded: str) -> bytes:
    """The raw bytes of a key given in base64 (standard or URL-safe alphabet)."""
    text = encoded.strip()
    try:
        raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise CodecError(f"codec key {key_id!r} is not valid base64") from None
    if len(raw) not in KEY_BYTES:
        raise CodecError(f"codec key {key_id!r} is {len(raw)} bytes; AES-GCM takes 16, 24 or 32")
    return raw


def new_key() -> str:
    """A fresh random 256-bit key, base64 encoded as ``codec_keys`` expects it."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


class AesGcmCodec(PayloadCodec):
    """Encrypts payloads with the ``current`` key of ``keys`` (key id -> raw key bytes) and
    decrypts with whichever key a payload names."""

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if not keys:
            raise CodecError("the codec needs at least one key")
        for key_id, raw in keys.items():
            if not KEY_ID_PATTERN.match(key_id):
                raise CodecError(f"codec key id {key_id!r} must match {KEY_ID_PATTERN.pattern}")
            if len(raw) not in KEY_BYTES:
                raise CodecError(f"codec key {key_id!r} is {len(raw)} bytes; AES-GCM takes "
                                 "16, 24 or 32")
        if current not in keys:
            raise CodecError(f"the current codec key {current!r} is not among the configured "
                             f"keys {sorted(keys)}")
        self._ciphers = {key_id: AESGCM(raw) for key_id, raw in keys.items()}
        self.current = current

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._ciphers)

    def seal(self, payload: Payload) -> Payload:
        key_id = self.current.encode("ascii")
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.current].encrypt(nonce, payload.SerializeToString(), key_id)
        return Payload(metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id},
                       data=nonce + sealed)

    def open(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode("ascii", "replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise UnknownKeyError(f"payload sealed with codec key {key_id!r}, which is not "
                                  f"configured (configured: {self.key_ids})")
        if len(payload.data) <= NONCE_BYTES:
            raise CodecError("encrypted payload too short")
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            plain = cipher.decrypt(nonce, sealed, key_id.encode("ascii"))
        except InvalidTag:
            raise CodecError(f"payload sealed with codec key {key_id!r} failed authentication "
                             "(tampered, or a different key under the same id)") from None
        return Payload.FromString(plain)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.seal(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.open(p) for p in payloads]

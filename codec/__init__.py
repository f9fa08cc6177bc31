"""Encryption of everything the platform hands Temporal (workflow inputs and results,
activity inputs and results, signals, queries, updates, memos, failure messages), so the
server's stored histories hold no MSISDN, carrier reference or amount in plain text.

Every process that talks to Temporal builds its client with :func:`data_converter`; operators
read decoded payloads in the Temporal UI through the codec server (``python -m codec.server``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from pydantic import SecretStr
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes

from codec.aesgcm import AesGcmCodec, CodecError, UnknownKeyError, new_key, parse_key

__all__ = ["AesGcmCodec", "CodecError", "CodecKeySettings", "UnknownKeyError", "codec_from",
           "data_converter", "new_key"]


class CodecKeySettings(Protocol):
    """What the codec reads from settings (``settings.Settings`` has both fields).

    ``codec_keys``: key id -> base64 of a 16, 24 or 32 byte AES key (``CB_CODEC_KEYS``, JSON).
    ``codec_current_key``: the id new payloads are sealed with (``CB_CODEC_CURRENT_KEY``);
    may be left unset when exactly one key is configured.
    """

    @property
    def codec_keys(self) -> Mapping[str, SecretStr]: ...

    @property
    def codec_current_key(self) -> str | None: ...


def codec_from(settings: CodecKeySettings) -> AesGcmCodec | None:
    """The codec the settings describe, or None when no key is configured."""
    if not settings.codec_keys:
        if settings.codec_current_key:
            raise CodecError(f"codec_current_key is {settings.codec_current_key!r} but no "
                             "codec_keys are configured")
        return None
    keys = {key_id: parse_key(key_id, secret.get_secret_value())
            for key_id, secret in settings.codec_keys.items()}
    current = settings.codec_current_key
    if current is None:
        if len(keys) > 1:
            raise CodecError(f"several codec keys {sorted(keys)}: set codec_current_key to the "
                             "one new payloads are sealed with")
        (current,) = keys
    return AesGcmCodec(keys, current)


def data_converter(settings: CodecKeySettings) -> DataConverter:
    """The data converter every client and worker uses: the default one when no codec key is
    configured, else payloads sealed by :class:`AesGcmCodec` and failure messages and stack
    traces moved into an (encrypted) attributes payload."""
    codec = codec_from(settings)
    if codec is None:
        return DataConverter.default
    return DataConverter(payload_codec=codec,
                         failure_converter_class=DefaultFailureConverterWithEncodedAttributes)

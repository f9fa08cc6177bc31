"""The payload codec: sealing, key rotation, old histories passing through, tampering."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import pytest
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload
from temporalio.api.failure.v1 import Failure
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.exceptions import ApplicationError

from codec import AesGcmCodec, CodecError, UnknownKeyError, codec_from, data_converter, new_key
from codec.aesgcm import ENCODING, KEY_ID_METADATA
from codec.keys import main as keys_main

KEY_A = new_key()
KEY_B = new_key()
SECRET_TEXT = {"msisdn": "+33612345678", "reference": "REF-7f3a9c", "amount_minor": 499}


@dataclass
class Keys:
    """Stands in for ``settings.Settings``: the two fields the codec reads."""

    codec_keys: dict[str, SecretStr] = field(default_factory=dict)
    codec_current_key: str | None = None


def keys(current: str | None, **named: str) -> Keys:
    return Keys({k: SecretStr(v) for k, v in named.items()}, current)


async def test_no_key_configured_is_the_default_converter() -> None:
    assert data_converter(Keys()) is DataConverter.default
    with pytest.raises(CodecError, match="no codec_keys"):
        data_converter(Keys(codec_current_key="a"))


async def test_values_round_trip_and_the_sealed_payload_hides_them() -> None:
    converter = data_converter(keys("a", a=KEY_A))
    assert isinstance(converter.payload_codec, AesGcmCodec)
    assert converter.failure_converter_class is DefaultFailureConverterWithEncodedAttributes
    (sealed,) = await converter.encode([SECRET_TEXT])
    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID_METADATA] == b"a"
    wire = sealed.SerializeToString()
    for needle in (b"+33612345678", b"REF-7f3a9c", b"499", b"json/plain", b"msisdn"):
        assert needle not in wire
    assert await converter.decode([sealed], [dict]) == [SECRET_TEXT]
    # a fresh nonce each time: the same value never seals to the same bytes
    (again,) = await converter.encode([SECRET_TEXT])
    assert again.data != sealed.data


async def test_rotation_old_payloads_open_with_any_configured_key_new_ones_use_current() -> None:
    before = data_converter(keys("a", a=KEY_A))
    (old,) = await before.encode([SECRET_TEXT])

    rotated = data_converter(keys("b", a=KEY_A, b=KEY_B))
    (new,) = await rotated.encode([SECRET_TEXT])
    assert new.metadata[KEY_ID_METADATA] == b"b"
    assert await rotated.decode([old, new], [dict, dict]) == [SECRET_TEXT, SECRET_TEXT]

    # before the rotation reached it, a process holding only "a" cannot read "b"'s payloads
    with pytest.raises(UnknownKeyError, match="'b'"):
        await before.decode([new], [dict])
    # and once "a" is retired, its payloads are named as unreadable, never silently passed on
    retired = data_converter(keys("b", b=KEY_B))
    with pytest.raises(UnknownKeyError, match="'a'"):
        await retired.decode([old], [dict])


async def test_payload_without_the_marker_passes_through_unchanged() -> None:
    plain = (await DataConverter.default.encode([SECRET_TEXT]))[0]
    codec = codec_from(keys("a", a=KEY_A))
    assert codec is not None
    assert await codec.decode([plain]) == [plain]
    assert await data_converter(keys("a", a=KEY_A)).decode([plain], [dict]) == [SECRET_TEXT]


async def test_tampered_payload_or_swapped_key_id_is_refused() -> None:
    codec = codec_from(keys("a", a=KEY_A, b=KEY_B))
    assert codec is not None
    (sealed,) = await codec.encode([Payload(metadata={"encoding": b"json/plain"}, data=b"499")])
    flipped = Payload()
    flipped.CopyFrom(sealed)
    flipped.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(CodecError, match="failed authentication"):
        await codec.decode([flipped])
    relabelled = Payload()
    relabelled.CopyFrom(sealed)
    relabelled.metadata[KEY_ID_METADATA] = b"b"
    with pytest.raises(CodecError, match="failed authentication"):
        await codec.decode([relabelled])


async def test_failure_messages_are_sealed_too() -> None:
    converter = data_converter(keys("a", a=KEY_A))
    failure = Failure()
    await converter.encode_failure(ApplicationError("charge for +33612345678 refused"), failure)
    assert b"+33612345678" not in failure.SerializeToString()
    decoded = await converter.decode_failure(failure)
    assert str(decoded) == "charge for +33612345678 refused"


@pytest.mark.parametrize(("configured", "error"), [
    (keys(None, a=KEY_A, b=KEY_B), "set codec_current_key"),
    (keys("c", a=KEY_A), "'c' is not among"),
    (keys("a", a="not base64!"), "not valid base64"),
    (keys("a", a=base64.b64encode(b"short").decode()), "5 bytes"),
    (keys("a b", **{"a b": KEY_A}), "must match"),
])
def test_misconfigured_keys_are_refused_naming_the_problem_not_the_key(
        configured: Keys, error: str) -> None:
    with pytest.raises(CodecError, match=error) as raised:
        codec_from(configured)
    assert KEY_A not in str(raised.value)


def test_single_key_needs_no_current_and_url_safe_keys_are_accepted() -> None:
    url_safe = base64.urlsafe_b64encode(bytes(range(250, 256)) * 5 + b"xy").decode()
    codec = codec_from(keys(None, only=url_safe))
    assert codec is not None and codec.current == "only"


def test_keys_command_prints_a_usable_entry(capsys: pytest.CaptureFixture[str]) -> None:
    keys_main(["k2031"])
    entry = json.loads(capsys.readouterr().out)
    codec = codec_from(keys("k2031", **entry))
    assert codec is not None and codec.key_ids == ["k2031"]

"""Throw-away credentials for every registry secret, for the demo, benchmarks and tests.

The simulator and the worker of one run receive the same set through CB_CARRIER_SECRETS;
nothing is written to disk.
"""

from __future__ import annotations

import secrets

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from carriers.loader import Registry


def rsa_private_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def generate_dev_secrets(registry: Registry) -> dict[str, str]:
    generated: dict[str, str] = {}
    for carrier in registry.carriers.values():
        auth = carrier.auth
        if auth.kind == "jwt-rs256":
            generated[auth.secret_ref] = rsa_private_pem()
        elif auth.kind == "smpp-bind":  # SMPP 3.4 passwords are at most 8 characters
            generated[auth.secret_ref] = secrets.token_urlsafe(6)[:8]
        else:
            generated[auth.secret_ref] = secrets.token_urlsafe(18)
        if auth.callback_secret_ref:
            generated[auth.callback_secret_ref] = secrets.token_urlsafe(18)
    return generated

"""Public keys given in settings, parsed once; depends on nothing in mailer, so config.py may check them."""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


@lru_cache(maxsize=4)
def load_ec_public_key(value: str) -> ec.EllipticCurvePublicKey:
    """An ECDSA public key as SendGrid shows it (base64 DER, SubjectPublicKeyInfo) or as PEM."""
    text = value.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text, validate=False))
    except (ValueError, TypeError, binascii.Error):
        raise ValueError("is not an ECDSA public key (base64 DER as SendGrid shows it, or PEM)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("is not an ECDSA public key (base64 DER as SendGrid shows it, or PEM)")
    return key

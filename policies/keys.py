"""Public keys named in policies, parsed and put into one canonical text form.

Two kinds of key appear in policies:

- *node keys* (server policy, ``admission.public_keys``): the keys Flower's
  node authentication uses (ECDSA in OpenSSH format, ``ssh-keygen -t ecdsa``);
  any public key ``cryptography`` can read (OpenSSH line, PEM or DER) is
  accepted and compared in the canonical form ``"<type> <base64>"`` (the
  OpenSSH encoding without its comment), so that a key written as PEM in the
  policy matches the same key presented in OpenSSH form.
- the *server key* a site trusts (site policy, ``trust.server_key``): the
  coordinator's Ed25519 signing key, written as 64 hexadecimal digits (the raw
  32-byte key, RFC 8032 §5.1.5), an ``ssh-ed25519`` OpenSSH line, or a PEM
  public key. Its canonical form is the lowercase hex of the raw 32 bytes.

Parsing is strict: anything that is not a valid key raises
:class:`~common.errors.ConfigurationError`; nothing is guessed or truncated.
"""

from __future__ import annotations

import binascii

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from common.errors import ConfigurationError

ED25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64


def _load_public_key(value: str | bytes) -> PublicKeyTypes:
    data = value.encode("ascii", errors="strict") if isinstance(value, str) else bytes(value)
    data = data.strip()
    if not data:
        raise ConfigurationError("empty public key")
    loaders = (
        (data.startswith(b"-----BEGIN"), serialization.load_pem_public_key),
        (data[:4] in (b"ssh-", b"ecds"), serialization.load_ssh_public_key),
    )
    for applies, loader in loaders:
        if applies:
            try:
                return loader(data)
            except (ValueError, UnsupportedAlgorithm) as exc:
                raise ConfigurationError(f"not a valid public key: {exc}") from None
    try:
        return serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigurationError("not a public key in OpenSSH, PEM or DER form") from None


def canonical_node_key(value: str | bytes) -> str:
    """The canonical text of a node's public key: ``"<type> <base64>"``.

    Parameters
    ----------
    value : str or bytes
        An OpenSSH public-key line (comment optional), a PEM block, or DER
        bytes (SubjectPublicKeyInfo).

    Raises
    ------
    ConfigurationError
        ``value`` is not a public key ``cryptography`` can read, or is not
        ASCII text.
    """
    try:
        key = _load_public_key(value)
    except UnicodeEncodeError:
        raise ConfigurationError("public key text must be ASCII") from None
    try:
        line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise ConfigurationError("this key type has no OpenSSH encoding") from None
    return line.decode("ascii")


def parse_ed25519_public_key(value: str | bytes) -> bytes:
    """The raw 32 bytes of an Ed25519 public key.

    Parameters
    ----------
    value : str or bytes
        64 hexadecimal digits, raw 32 bytes, an ``ssh-ed25519`` OpenSSH line,
        or a PEM ``PUBLIC KEY`` block.

    Raises
    ------
    ConfigurationError
        ``value`` is not an Ed25519 public key.
    """
    if isinstance(value, bytes) and len(value) == ED25519_KEY_BYTES:
        raw = value
    else:
        text = value.decode("ascii", errors="replace") if isinstance(value, bytes) else value
        text = text.strip()
        if len(text) == 2 * ED25519_KEY_BYTES and all(c in "0123456789abcdefABCDEF" for c in text):
            raw = binascii.unhexlify(text)
        else:
            try:
                key = _load_public_key(text)
            except UnicodeEncodeError:
                raise ConfigurationError("public key text must be ASCII") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigurationError("not an Ed25519 public key")
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ConfigurationError("not a valid Ed25519 public key") from None
    return raw


def verify_ed25519(public_key: bytes, payload: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``payload``.

    Pure: no I/O. Ed25519 (RFC 8032 §5.1.7) as implemented by OpenSSL through
    ``cryptography``; strongly unforgeable under chosen-message attack.

    Parameters
    ----------
    public_key : bytes
        The raw 32-byte public key.
    payload : bytes
        The exact bytes that were signed.
    signature : bytes
        The 64-byte signature.

    Returns
    -------
    bool
        ``False`` for a wrong signature, a signature of the wrong length or
        a malformed key; never raises for bad input.
    """
    if len(public_key) != ED25519_KEY_BYTES or len(signature) != ED25519_SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, payload)
    except (InvalidSignature, ValueError):
        return False
    return True

"""Cryptographic primitives for secure aggregation, each behind one small module.

* :mod:`common.crypto.keys` -- X25519 key pairs and strict parsing of raw public keys.
* :mod:`common.crypto.kdf` -- HKDF-SHA256 with one versioned info label per purpose.
* :mod:`common.crypto.aead` -- AES-256-GCM with protocol context as associated data.
* :mod:`common.crypto.prg` -- ChaCha20 keystream expanded into uniform ring elements.
* :mod:`common.crypto.shamir` -- t-of-k Shamir secret sharing over GF(2^521 - 1),
  with verified, error-tolerant reconstruction.
* :mod:`common.crypto.commitment` -- SHA-256 commitment to a self-mask seed.

Everything here is built on the ``cryptography`` package (OpenSSL); nothing
draws from numpy's or Python's global random generators. Only
:mod:`common.secagg` imports this package.
"""

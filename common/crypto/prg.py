"""Mask expansion: a 32-byte seed to uniform elements of Z_{2^b} via ChaCha20.

Guarantee: for a uniformly random 32-byte seed unknown to the adversary, the
output of :func:`expand_seed` is computationally indistinguishable from
independent uniform elements of Z_{2^b} (ChaCha20 is assumed to be a PRF;
Bernstein, "ChaCha, a variant of Salsa20", 2008; RFC 8439). The full 256-bit
seed is the cipher key: unlike a 32-bit Mersenne-Twister seed (flwr #7522)
it cannot be brute-forced, and the stream is not predictable from outputs.

Construction: keystream = ChaCha20(key=seed, 128-bit IV = 0) as implemented
by OpenSSL (64-bit little-endian block counter followed by a 64-bit nonce;
RFC 8439's 32-bit counter agrees with it below 2^32 blocks). The keystream is
read as little-endian ``uint32`` words (b <= 32) or ``uint64`` words
(b <= 64) and reduced mod 2^b by masking the high bits; since 2^b divides the
word size, each element is exactly uniform when the keystream is.

Keystream limit: one seed may produce at most 2^32 blocks of 64 bytes
(256 GiB), where both counter conventions agree and the counter never wraps;
:func:`expand_seed` raises :class:`~common.errors.ConfigurationError` beyond
it. Each seed is used for exactly one stream (the IV is fixed), so distinct
purposes must use distinct seeds; :mod:`common.crypto.kdf` guarantees that.

The keystream is written in place into a freshly ``calloc``-ed numpy buffer
(``update_into``), so expansion runs at the cipher's own speed.
:func:`add_masks_inplace` adds (or subtracts) many such streams to one
vector without materialising any of them: it walks the vector in
cache-sized chunks and, per chunk, advances every seed's cipher context
into one reused scratch buffer; the result is word for word what adding the
:func:`expand_seed` outputs gives, at the speed of an L2-resident keystream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from common.errors import ConfigurationError

SEED_SIZE = 32
BLOCK_SIZE = 64
MAX_KEYSTREAM_BYTES = 2**32 * BLOCK_SIZE
"""At most 256 GiB of keystream per seed (2^32 ChaCha20 blocks)."""
MAX_BITS = 64

RingArray: TypeAlias = npt.NDArray[np.unsignedinteger[Any]]
"""A numpy array of ring elements (uint32 or uint64 words)."""

_ZERO_IV = bytes(16)
CHUNK_WORDS = 1 << 15
"""Words per chunk in :func:`add_masks_inplace` (128 KiB of uint32: stays in L2)."""


def ring_dtype(bits: int) -> np.dtype[Any]:
    """The numpy word type that holds elements of Z_{2^bits}: uint32 or uint64."""
    if type(bits) is not int or not 1 <= bits <= MAX_BITS:
        raise ConfigurationError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")
    return np.dtype("<u4") if bits <= 32 else np.dtype("<u8")


def keystream(seed: bytes, nbytes: int) -> bytes:
    """The first ``nbytes`` of the ChaCha20 keystream under ``seed`` (for known-answer tests)."""
    _check_seed(seed)
    if type(nbytes) is not int or not 0 <= nbytes <= MAX_KEYSTREAM_BYTES:
        raise ConfigurationError(f"keystream length must be in [0, {MAX_KEYSTREAM_BYTES}]")
    return Cipher(algorithms.ChaCha20(seed, _ZERO_IV), mode=None).encryptor().update(bytes(nbytes))


def expand_seed(seed: bytes, length: int, bits: int) -> RingArray:
    """Expand ``seed`` into ``length`` uniform elements of Z_{2^bits}.

    Parameters
    ----------
    seed : bytes
        Exactly 32 bytes, the ChaCha20 key; must be secret and used for one stream only.
    length : int
        Number of elements, ``length * word_size <= MAX_KEYSTREAM_BYTES``.
    bits : int
        Ring size exponent, 1 <= bits <= 64.

    Returns
    -------
    numpy.ndarray
        A new, writeable ``uint32`` (bits <= 32) or ``uint64`` array of shape
        ``(length,)`` with every value in ``[0, 2^bits)``.

    Raises
    ------
    ConfigurationError
        On a seed that is not 32 bytes, a negative length, or a request beyond
        the keystream limit.
    """
    _check_seed(seed)
    dtype = ring_dtype(bits)
    if type(length) is not int or length < 0:
        raise ConfigurationError(f"length must be a non-negative int, got {length!r}")
    if length * dtype.itemsize > MAX_KEYSTREAM_BYTES:
        raise ConfigurationError("mask longer than the keystream limit of one seed")
    out: RingArray = np.zeros(length, dtype=dtype)
    if length:
        view = out.data.cast("B")
        encryptor = Cipher(algorithms.ChaCha20(seed, _ZERO_IV), mode=None).encryptor()
        encryptor.update_into(view, view)
    if bits not in (32, 64):
        np.bitwise_and(out, dtype.type((1 << bits) - 1), out=out)
    return out


def add_masks_inplace(target: RingArray, masks: Sequence[tuple[bytes, int]], bits: int) -> None:
    """Add ``sign * expand_seed(seed, len(target), bits)`` for every (seed, sign) to ``target``.

    The sum is taken in Z_{2^bits} and written into ``target`` (in place,
    the only mutation); afterwards every word of ``target`` lies in
    ``[0, 2^bits)``. The result equals adding the :func:`expand_seed` outputs
    one by one, without allocating them: each seed's ChaCha20 stream is
    produced chunk by chunk into one reused, cache-resident buffer.

    Parameters
    ----------
    target : numpy.ndarray
        1-D, C-contiguous, writeable array of ``ring_dtype(bits)``.
    masks : sequence of (bytes, int)
        Pairs of a 32-byte seed (secret, one stream per seed, as for
        :func:`expand_seed`) and a sign, ``+1`` (add) or ``-1`` (subtract).
    bits : int
        Ring size exponent, 1 <= bits <= 64.

    Raises
    ------
    ConfigurationError
        On a target of the wrong type, shape, dtype or layout, a seed that is
        not 32 bytes, a sign other than +-1, or a length beyond the keystream
        limit; nothing is written then.
    """
    dtype = ring_dtype(bits)
    if (
        not isinstance(target, np.ndarray)
        or target.ndim != 1
        or target.dtype != dtype
        or not target.flags.c_contiguous
        or not target.flags.writeable
    ):
        raise ConfigurationError(f"target must be a writeable 1-D contiguous {dtype} array")
    length = int(target.shape[0])
    if length * dtype.itemsize > MAX_KEYSTREAM_BYTES:
        raise ConfigurationError("mask longer than the keystream limit of one seed")
    for seed, sign in masks:
        _check_seed(seed)
        if type(sign) is not int or sign not in (1, -1):
            raise ConfigurationError(f"a mask sign must be +1 or -1, got {sign!r}")
    if length and masks:
        streams = [
            (Cipher(algorithms.ChaCha20(seed, _ZERO_IV), mode=None).encryptor(), sign)
            for seed, sign in masks
        ]
        chunk = min(length, CHUNK_WORDS)
        zeros = memoryview(bytes(chunk * dtype.itemsize))
        scratch = np.empty(chunk, dtype=dtype)
        scratch_bytes = scratch.data.cast("B")
        for start in range(0, length, chunk):
            count = min(chunk, length - start)
            nbytes = count * dtype.itemsize
            part = target[start : start + count]
            words = scratch[:count]
            for encryptor, sign in streams:
                encryptor.update_into(zeros[:nbytes], scratch_bytes[:nbytes])
                if sign > 0:
                    np.add(part, words, out=part)
                else:
                    np.subtract(part, words, out=part)
    if bits not in (32, 64):
        np.bitwise_and(target, dtype.type((1 << bits) - 1), out=target)


def _check_seed(seed: bytes) -> None:
    if type(seed) is not bytes or len(seed) != SEED_SIZE:
        raise ConfigurationError(f"a PRG seed must be exactly {SEED_SIZE} bytes")

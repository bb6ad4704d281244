"""The only module that creates random generators or secret random bytes.

Three kinds of randomness, never mixed:

* **Secret randomness** (keys, mask seeds, nonces): :func:`secure_bytes`,
  straight from the operating system CSPRNG (``secrets.token_bytes``).
* **Privacy randomness** (DP noise, secure-aggregation rounding coins, the
  server's Poisson draw of sites): :class:`ChaCha20Random`, samplers over a
  ChaCha20 keystream under a 256-bit key from the OS CSPRNG;
  :func:`secure_generator` makes one. Every production DP or rounding path
  draws from it.
* **Reproducible randomness** (data shuffling and partitions in
  simulations, tests): a :class:`numpy.random.Generator` from
  :func:`seeded_generator`. Functions that draw take either kind as a
  :data:`RandomSource` argument; library code never uses numpy's, torch's
  or Python's global generators.

What is private, against whom, under which assumption
------------------------------------------------------
A :class:`ChaCha20Random` made without a key draws its key from the OS
CSPRNG; nothing derived from the key leaves the process except the
samplers' outputs. Its outputs are computationally indistinguishable from
independent uniform bits to anyone who does not observe the process's
memory (the key, or the keystream buffer), assuming ChaCha20 is a PRF
(Bernstein 2008; RFC 8439). Unlike a seeded numpy PCG64 or torch Mersenne
Twister stream, observing many outputs reveals nothing about later ones.
The keystream comes from ``cryptography`` (OpenSSL); only the samplers that
turn keystream words into uniforms and normals are written here.

Streams are never duplicated: a stream refuses to be pickled or copied,
and a stream whose key came from the OS re-keys itself from the OS when it
finds itself in a forked child (so parent and child never draw the same
noise). A stream with a caller-given key (tests, reproducible simulations)
repeats exactly for the same key and call sequence; it is not secret unless
the key is.
"""

from __future__ import annotations

import math
import os
import secrets
from typing import Any, NoReturn, TypeAlias, overload

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy.special import ndtri

from common.errors import ConfigurationError

__all__ = [
    "KEY_SIZE",
    "ChaCha20Random",
    "RandomSource",
    "secure_bytes",
    "secure_generator",
    "seeded_generator",
]

KEY_SIZE = 32
_WORD_BYTES = 8
# One (key, nonce) pair yields at most 2^32 ChaCha20 blocks of 64 bytes, the range where
# OpenSSL's 64-bit block counter and RFC 8439's 32-bit one agree; the next segment of the
# stream uses the next nonce.
_SEGMENT_WORDS = 2**32 * 64 // _WORD_BYTES
_BUFFER_WORDS = 1 << 13  # 64 KiB of keystream kept for small requests
_TWO_M53 = 2.0**-53
_LOW52 = np.uint64((1 << 52) - 1)
_SIGN_BIT = np.uint64(1 << 63)
_NORMAL_CHUNK = 1 << 14

Size: TypeAlias = int | tuple[int, ...]
FloatArray: TypeAlias = npt.NDArray[np.float64]


def secure_bytes(n: int) -> bytes:
    """Return ``n`` bytes from the operating system CSPRNG."""
    if n < 0:
        raise ValueError("n must be non-negative")
    return secrets.token_bytes(n)


def _count(size: Size) -> tuple[tuple[int, ...], int]:
    shape = (size,) if isinstance(size, int) else tuple(size)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ConfigurationError(f"size must be a non-negative int or tuple of them, got {size!r}")
    return shape, math.prod(shape)


class ChaCha20Random:
    """Uniform doubles and standard normals from a ChaCha20 keystream.

    Parameters
    ----------
    key : bytes, optional
        The 32-byte ChaCha20 key. Omitted (production): drawn from the OS
        CSPRNG, and re-drawn in a forked child. Given (tests, reproducible
        simulations): the stream is a deterministic function of the key and
        of the sequence of calls.

    Samplers (the subset of :class:`numpy.random.Generator` that fedseal's
    DP and rounding code uses, same call forms):

    * :meth:`random`: uniform on ``[0, 1)``, the 53-bit grid
      ``k * 2^-53`` from the top 53 bits of a 64-bit keystream word; exactly
      uniform on that grid, so ``random() < p`` is a ``Bernoulli(p)`` coin
      with bias below ``2^-53`` for any float ``p``.
    * :meth:`standard_normal`, :meth:`normal`: one 64-bit word per variate,
      the inverse CDF of a uniform (below). Independent across calls.

    Floating point
    --------------
    The accountant assumes real-valued Gaussian noise; a sampler can only
    output floats, and the attacks of Mironov (CCS 2012, on the Laplace
    mechanism) and Jin et al. (IEEE S&P 2022, on Gaussian noise in Opacus
    and other libraries) tell neighbouring inputs apart by outputs that one
    of them cannot produce, which sampler gaps (e.g. float32 Box-Muller
    outputs) create. What this sampler does: the magnitude is
    ``-ndtri(u)`` with ``u = (k + 1/2) 2^-53``, ``k`` 52 uniform bits (so
    ``u`` lies in ``(0, 1/2)`` exactly, never 0), and the sign is a
    separate keystream bit, so the distribution is exactly symmetric and
    the tails reach about 8.3 standard deviations; it is computed in
    float64, whose grid of possible values is, over the bulk of the mass,
    much finer than the float32 spacing of the gradients and weights the
    noise is added to. What it does not do: it does not prove the absence
    of such attacks (no snapping, no discrete Gaussian); the tails beyond
    about 8.3 sigma are cut (total variation about 1.2e-16 per draw, so a
    run of ``n`` draws is, by coupling, ``(epsilon, delta + 1.2e-16 n)``-DP
    with respect to the ideal mechanism's ``(epsilon, delta)``; fedseal does
    not add this to delta), and ``scipy.special.ndtri`` is accurate to about
    1e-15 relative, not exactly rounded. The noise is therefore the ideal
    Gaussian only up to these floating-point effects, which fedseal does not
    account for.

    Cost: the keystream runs at about 4 GB/s; ``ndtri`` (about 20 ns a
    value on one core) dominates, so a normal costs 5-10 times
    ``torch.normal`` on a CPU (``fedseal-sim bench dp``). Not thread-safe:
    give each thread its own stream.

    Raises
    ------
    ConfigurationError
        If ``key`` is given but is not exactly 32 bytes.
    """

    __slots__ = (
        "_buffer",
        "_encryptor",
        "_fresh_key",
        "_key",
        "_pid",
        "_pos",
        "_segment",
        "_segment_left",
    )

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            self._fresh_key = True
            key = secure_bytes(KEY_SIZE)
        elif type(key) is not bytes or len(key) != KEY_SIZE:
            raise ConfigurationError(f"a ChaCha20Random key must be exactly {KEY_SIZE} bytes")
        else:
            self._fresh_key = False
        self._start(key)

    def _start(self, key: bytes) -> None:
        self._key = key
        self._pid = os.getpid()
        self._segment = 0
        self._open_segment()
        self._buffer: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)
        self._pos = 0

    def _open_segment(self) -> None:
        nonce = bytes(8) + self._segment.to_bytes(8, "little")
        self._encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        self._segment_left = _SEGMENT_WORDS

    def _keystream_into(self, out: npt.NDArray[np.uint64]) -> None:
        """Overwrite the zeroed, contiguous ``out`` with the next keystream words."""
        view = out.data.cast("B")
        start = 0
        while start < out.size:
            if self._segment_left == 0:
                self._segment += 1
                self._open_segment()
            count = min(out.size - start, self._segment_left)
            part = view[start * _WORD_BYTES : (start + count) * _WORD_BYTES]
            self._encryptor.update_into(part, part)  # zeros XOR keystream = keystream
            self._segment_left -= count
            start += count

    def _words(self, count: int) -> npt.NDArray[np.uint64]:
        """The next ``count`` keystream words (little-endian uint64), a new array."""
        if os.getpid() != self._pid:
            if not self._fresh_key:
                raise ConfigurationError(
                    "a keyed ChaCha20Random was inherited by a forked process; "
                    "its draws would repeat the parent's"
                )
            self._start(secure_bytes(KEY_SIZE))
        out: npt.NDArray[np.uint64] = np.zeros(count, dtype=np.uint64)
        take = min(count, self._buffer.size - self._pos)
        out[:take] = self._buffer[self._pos : self._pos + take]
        self._pos += take
        rest = count - take
        if rest >= _BUFFER_WORDS:
            self._keystream_into(out[take:])
        elif rest:
            self._buffer = np.zeros(_BUFFER_WORDS, dtype=np.uint64)
            self._keystream_into(self._buffer)
            out[take:] = self._buffer[:rest]
            self._pos = rest
        return out

    def _uniform(self, count: int) -> FloatArray:
        words = self._words(count)
        np.right_shift(words, np.uint64(11), out=words)
        u: FloatArray = words.astype(np.float64)  # < 2^53: exact
        u *= _TWO_M53
        return u

    def _standard_normal(self, count: int) -> FloatArray:
        words = self._words(count)
        out: FloatArray = np.empty(count, dtype=np.float64)
        chunk = max(1, min(count, _NORMAL_CHUNK))  # cache-sized steps: ~20 % faster
        u = np.empty(chunk, dtype=np.float64)
        positive = np.empty(chunk, dtype=np.bool_)
        for start in range(0, count, chunk):
            w = words[start : start + chunk]
            m = w.size
            np.less(w, _SIGN_BIT, out=positive[:m])
            np.bitwise_and(w, _LOW52, out=w)
            part = u[:m]
            np.copyto(part, w, casting="unsafe")  # k < 2^52: exact
            part += 0.5
            part *= _TWO_M53  # (k + 1/2) 2^-53 in (0, 1/2): exact, k + 1/2 has 53 bits
            z = out[start : start + m]
            ndtri(part, out=z)  # < 0
            np.negative(z, out=z, where=positive[:m])
        return out

    @overload
    def random(self, size: None = None, *, out: None = None) -> float: ...

    @overload
    def random(self, size: Size, *, out: None = None) -> FloatArray: ...

    @overload
    def random(self, size: Size | None = None, *, out: FloatArray) -> FloatArray: ...

    def random(self, size: Size | None = None, *, out: FloatArray | None = None) -> Any:
        """Uniform doubles on ``[0, 1)`` (53-bit grid), as ``Generator.random``.

        ``size=None`` gives a float; otherwise an array of that shape, or
        ``out`` (a writeable, C-contiguous float64 array) filled in place.

        Raises
        ------
        ConfigurationError
            On a bad ``size`` or ``out``, or a ``size`` that disagrees with ``out``.
        """
        if out is not None:
            if (
                not isinstance(out, np.ndarray)
                or out.dtype != np.float64
                or not out.flags.c_contiguous
                or not out.flags.writeable
            ):
                raise ConfigurationError("out must be a writeable C-contiguous float64 array")
            if size is not None and _count(size)[0] != out.shape:
                raise ConfigurationError(f"size {size!r} does not match out's shape {out.shape}")
            out.reshape(-1)[:] = self._uniform(out.size)
            return out
        if size is None:
            return float(self._uniform(1)[0])
        shape, count = _count(size)
        return self._uniform(count).reshape(shape)

    @overload
    def standard_normal(self, size: None = None) -> float: ...

    @overload
    def standard_normal(self, size: Size) -> FloatArray: ...

    def standard_normal(self, size: Size | None = None) -> float | FloatArray:
        """Standard normal float64 variates (see the class notes on floating point)."""
        if size is None:
            return float(self._standard_normal(1)[0])
        shape, count = _count(size)
        return self._standard_normal(count).reshape(shape)

    @overload
    def normal(self, loc: float = 0.0, scale: float = 1.0, size: None = None) -> float: ...

    @overload
    def normal(self, loc: float, scale: float, size: Size) -> FloatArray: ...

    @overload
    def normal(self, loc: float = 0.0, scale: float = 1.0, *, size: Size) -> FloatArray: ...

    def normal(
        self, loc: float = 0.0, scale: float = 1.0, size: Size | None = None
    ) -> float | FloatArray:
        """``loc + scale * standard_normal(size)``, as ``Generator.normal``.

        Raises
        ------
        ConfigurationError
            If ``loc`` is not finite or ``scale`` is negative or not finite.
        """
        if not (math.isfinite(loc) and math.isfinite(scale) and scale >= 0.0):
            raise ConfigurationError(f"normal needs finite loc and scale >= 0, got {loc}, {scale}")
        if size is None:
            return loc + scale * self.standard_normal()
        z = self.standard_normal(size)
        z *= scale
        z += loc
        return z

    def __reduce__(self) -> NoReturn:
        raise TypeError("a ChaCha20Random holds secret state and is never serialised or copied")


RandomSource: TypeAlias = np.random.Generator | ChaCha20Random
"""What every function that draws DP noise or rounding coins accepts."""


def secure_generator() -> ChaCha20Random:
    """A fresh :class:`ChaCha20Random` keyed from the OS CSPRNG: privacy noise in production.

    For DP noise, rounding coins and sampling decisions: unpredictable to
    anyone who does not observe this process's memory. Not for keys or mask
    seeds; use :func:`secure_bytes` for those.
    """
    return ChaCha20Random()


def seeded_generator(seed: int) -> np.random.Generator:
    """A reproducible numpy Generator for simulations, partitioning and tests."""
    if seed < 0:
        raise ValueError("seed must be non-negative")
    return np.random.Generator(np.random.PCG64DXSM(seed))

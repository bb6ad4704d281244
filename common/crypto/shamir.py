"""Shamir t-of-k secret sharing over the prime field GF(2^521 - 1).

Guarantee (information-theoretic): any ``t - 1`` shares of a secret are
jointly uniform and independent of it; any ``t`` shares with distinct non-zero
indices determine it (Shamir, "How to share a secret", CACM 1979). The field
is the Mersenne prime p = 2^521 - 1, so every 32-byte secret (< 2^256) is a
field element. Polynomial coefficients are drawn uniformly from GF(p) by
rejection sampling on 521-bit strings from the OS CSPRNG (no modulo bias).

Reconstruction is Lagrange interpolation at 0 over exactly ``t`` shares.
Duplicate or zero indices and out-of-field values raise
:class:`~common.errors.ProtocolError`; fewer than ``t`` shares raise
:class:`~common.errors.ProtocolAbort`; a result that is not a valid secret of
the expected size (inconsistent shares) raises
:class:`~common.errors.IntegrityError`.

Verified reconstruction (:func:`reconstruct_verified`) tolerates wrong shares
when more than ``t`` are available and the caller can recognise the secret
(a binding commitment, or a public key). It interpolates ``t``-subsets in a
fixed order (co-lexicographic over the caller's preference order, so the
first ``t`` shares come first and a wrong share early in the order costs
about ``t`` more attempts), accepts the first polynomial ``f`` whose ``f(0)``
verifies and with which enough shares agree, and names the shares that do
not lie on ``f``. Facts it relies on (``m`` shares, ``L`` of them wrong):

* a verified ``f(0)`` is the dealt secret (binding of the verifier), so the
  returned secret is right whenever the function returns;
* two distinct polynomials of degree < ``t`` through the same ``(0, s)``
  agree on at most ``t - 2`` further points; so if ``a`` shares agree with
  ``f`` and ``2a >= m + t - 1``, every other such polynomial agrees with
  fewer, and ``f`` is the unique best explanation of the shares. Whenever
  ``L <= (m - t + 1) / 2`` (and the dealer was honest), the dealer's
  polynomial meets this bound and is the only one that can, hence exactly the
  wrong shares are named (the bound of Reed-Solomon unique decoding with
  one known point; Berlekamp-Welch, US patent 4,633,470, 1986);
* a single wrong share can never be part of a verifying ``t``-subset except
  with probability ``1/p`` (it moves ``f(0)``); two or more colluding holders
  who know their true shares can build a second verifying polynomial, which
  is why naming needs the agreement bound above. If only such a polynomial
  verifies, the secret is still returned but nobody is named
  (``Reconstruction.attributed`` is False).

Without verifiable secret sharing a dishonest *dealer* can deal a wrong share
to an honest holder, who is then named: the caller should report which
secret a holder's share was inconsistent for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from common.errors import ConfigurationError, IntegrityError, ProtocolAbort, ProtocolError
from common.rng import secure_bytes

PRIME = 2**521 - 1
"""The field modulus, the Mersenne prime M521."""
VALUE_SIZE = 66
"""Bytes of a big-endian encoded field element (ceil(521 / 8))."""
SECRET_SIZE = 32
MAX_INDEX = 2**32 - 1
DEFAULT_MAX_ATTEMPTS = 1024
"""Default bound on the ``t``-subsets :func:`reconstruct_verified` interpolates."""
_SECRET_LIMIT = 1 << (8 * SECRET_SIZE)


@dataclass(frozen=True, slots=True)
class Share:
    """One Shamir share: the polynomial evaluated at ``index``.

    Attributes
    ----------
    index : int
        The evaluation point, in [1, 2^32).
    value : int
        The field element, in [0, p).
    """

    index: int
    value: int

    def __post_init__(self) -> None:
        if type(self.index) is not int or not 1 <= self.index <= MAX_INDEX:
            raise ProtocolError(f"a share index must be an int in [1, 2^32), got {self.index!r}")
        if type(self.value) is not int or not 0 <= self.value < PRIME:
            raise ProtocolError("a share value must be a field element")


def _random_field_element() -> int:
    while True:
        candidate = int.from_bytes(secure_bytes(VALUE_SIZE), "big") & PRIME
        if candidate < PRIME:
            return candidate


def split_secret(secret: bytes, *, threshold: int, indices: Sequence[int]) -> tuple[Share, ...]:
    """Split ``secret`` into one share per index, any ``threshold`` of which recover it.

    Parameters
    ----------
    secret : bytes
        Exactly 32 bytes.
    threshold : int
        ``t`` with 1 <= t <= len(indices).
    indices : Sequence[int]
        Distinct evaluation points in [1, 2^32).

    Raises
    ------
    ConfigurationError
        On a wrong-size secret, a threshold out of range, or duplicate indices.
    ProtocolError
        On an index out of range.
    """
    if type(secret) is not bytes or len(secret) != SECRET_SIZE:
        raise ConfigurationError(f"a shared secret must be exactly {SECRET_SIZE} bytes")
    if len(set(indices)) != len(indices):
        raise ConfigurationError("share indices must be distinct")
    if type(threshold) is not int or not 1 <= threshold <= len(indices):
        raise ConfigurationError(f"threshold must be in [1, {len(indices)}], got {threshold!r}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_random_field_element() for _ in range(threshold - 1)]
    shares = []
    for index in indices:
        value = 0
        for coefficient in reversed(coefficients):  # Horner's rule
            value = (value * index + coefficient) % PRIME
        shares.append(Share(index=index, value=value))
    return tuple(shares)


def _check_shares(shares: Sequence[Share], threshold: int) -> None:
    for share in shares:
        if not isinstance(share, Share):
            raise ProtocolError("not a Shamir share")
    indices = [share.index for share in shares]
    if len(set(indices)) != len(indices):
        raise ProtocolError("duplicate share indices")
    if type(threshold) is not int or threshold < 1:
        raise ConfigurationError(f"threshold must be a positive int, got {threshold!r}")
    if len(shares) < threshold:
        raise ProtocolAbort(f"{len(shares)} shares cannot reconstruct a {threshold}-of-k secret")


def _barycentric_weights(chosen: Sequence[Share]) -> list[int]:
    """``w_j = y_j / prod_{m != j} (x_j - x_m)`` mod p, with one field inversion in all."""
    denominators = []
    for j, share_j in enumerate(chosen):
        denominator = 1
        for m, share_m in enumerate(chosen):
            if m != j:
                denominator *= share_j.index - share_m.index  # small exact integers
        denominators.append(denominator % PRIME)
    prefix = [1]
    for denominator in denominators:  # Montgomery's batch inversion
        prefix.append(prefix[-1] * denominator % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    weights = [0] * len(chosen)
    for j in range(len(chosen) - 1, -1, -1):
        weights[j] = chosen[j].value * (inverse * prefix[j] % PRIME) % PRIME
        inverse = inverse * denominators[j] % PRIME
    return weights


def _evaluate(xs: Sequence[int], weights: Sequence[int], x: int) -> int:
    """``f(x) = sum_j w_j prod_{m != j} (x - x_m)`` for ``x`` not among ``xs``."""
    differences = [x - xm for xm in xs]
    suffix = [1] * (len(xs) + 1)
    for j in range(len(xs) - 1, -1, -1):
        suffix[j] = suffix[j + 1] * differences[j]
    total, prefix = 0, 1
    for j, weight in enumerate(weights):
        total += weight * (prefix * suffix[j + 1])
        prefix *= differences[j]
    return total % PRIME


def _colex(m: int, t: int) -> Iterator[tuple[int, ...]]:
    """All ``t``-subsets of ``range(m)`` in co-lexicographic order (by largest element)."""
    if t == 0:
        yield ()
        return
    for top in range(t - 1, m):
        for rest in _colex(top, t - 1):
            yield (*rest, top)


@dataclass(frozen=True, slots=True)
class Reconstruction:
    """A secret recovered by :func:`reconstruct_verified`.

    Attributes
    ----------
    secret : bytes
        The 32-byte secret; it passed the caller's verifier.
    inconsistent : tuple[int, ...]
        Indices of the shares that do not lie on the accepted polynomial,
        ascending (empty unless ``attributed``).
    attributed : bool
        Whether the accepted polynomial is the unique best fit of the shares
        (``2a >= m + t - 1``, ``a`` agreeing shares out of ``m``), so that the
        shares in ``inconsistent`` are provably off every polynomial that
        explains the others as well.
    attempts : int
        How many ``t``-subsets were interpolated.
    """

    secret: bytes
    inconsistent: tuple[int, ...]
    attributed: bool
    attempts: int


def reconstruct_verified(
    shares: Sequence[Share],
    *,
    threshold: int,
    verify: Callable[[bytes], bool],
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> Reconstruction:
    """Recover a secret that ``verify`` accepts, tolerating and naming wrong shares.

    Parameters
    ----------
    shares : Sequence[Share]
        At least ``threshold`` shares with distinct indices, most trusted first:
        the first ``threshold`` are tried first, and a share later in the order
        is used only when earlier subsets fail.
    threshold : int
        ``t``.
    verify : Callable[[bytes], bool]
        Recognises the true secret (e.g. opens a binding commitment, or matches
        a public key). Called only on 32-byte candidates.
    max_attempts : int
        Bound on the ``t``-subsets interpolated (each costs ``O(t^2)`` small
        integer products, one field inversion, ``O(t)`` field products per
        share checked, and one ``verify`` call).

    Returns
    -------
    Reconstruction
        The verified secret and the shares inconsistent with it (see the module
        docstring for when they are named).

    Raises
    ------
    ProtocolAbort
        If fewer than ``threshold`` shares are given, or no subset within
        ``max_attempts`` yields a secret that ``verify`` accepts.
    ProtocolError
        On a non-share or duplicate indices.
    ConfigurationError
        On an invalid threshold or attempt bound.
    """
    _check_shares(shares, threshold)
    if type(max_attempts) is not int or max_attempts < 1:
        raise ConfigurationError(f"max_attempts must be a positive int, got {max_attempts!r}")
    ordered = list(shares)
    m = len(ordered)
    fallback: bytes | None = None
    attempts = 0
    for subset in _colex(m, threshold):
        if attempts == max_attempts:
            break
        attempts += 1
        chosen = [ordered[i] for i in subset]
        xs = [share.index for share in chosen]
        weights = _barycentric_weights(chosen)
        value = _evaluate(xs, weights, 0)
        if value >= _SECRET_LIMIT:
            continue
        secret = value.to_bytes(SECRET_SIZE, "big")
        if not verify(secret):
            continue
        inside = set(subset)
        off = tuple(
            sorted(
                share.index
                for i, share in enumerate(ordered)
                if i not in inside and _evaluate(xs, weights, share.index) != share.value
            )
        )
        if 2 * (m - len(off)) >= m + threshold - 1:
            return Reconstruction(secret, off, True, attempts)
        if fallback is None:
            fallback = secret
    if fallback is not None:
        return Reconstruction(fallback, (), False, attempts)
    raise ProtocolAbort(
        f"no {threshold} of the {m} shares reconstruct a verifiable secret "
        f"({attempts} subsets tried)"
    )


def combine_shares(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Recover a 32-byte secret from at least ``threshold`` shares.

    Uses the ``threshold`` shares with the smallest indices and checks nothing
    else: a wrong share yields a wrong secret. Use :func:`reconstruct_verified`
    when the secret can be recognised.

    Raises
    ------
    ProtocolAbort
        If fewer than ``threshold`` shares are given.
    ProtocolError
        On a non-share, duplicate or zero index.
    IntegrityError
        If the interpolated value is not a 32-byte secret.
    """
    _check_shares(shares, threshold)
    chosen = sorted(shares, key=lambda share: share.index)[:threshold]
    secret = _evaluate([share.index for share in chosen], _barycentric_weights(chosen), 0)
    if secret >= _SECRET_LIMIT:
        raise IntegrityError("shares do not reconstruct a valid secret")
    return secret.to_bytes(SECRET_SIZE, "big")


def encode_value(value: int) -> bytes:
    """A field element as 66 big-endian bytes."""
    if type(value) is not int or not 0 <= value < PRIME:
        raise ProtocolError("not a field element")
    return value.to_bytes(VALUE_SIZE, "big")


def decode_value(data: bytes) -> int:
    """Parse 66 big-endian bytes into a field element.

    Raises
    ------
    ProtocolError
        On a wrong size or a value >= p.
    """
    if type(data) is not bytes or len(data) != VALUE_SIZE:
        raise ProtocolError(f"a share value must be {VALUE_SIZE} bytes")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ProtocolError("a share value must be a field element")
    return value

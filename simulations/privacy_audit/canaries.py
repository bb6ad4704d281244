"""Canaries: their design, their inclusion draw, planting, and the guesses.

The design: a feature of its own per canary
-------------------------------------------
The audited run is a ``custom``-dataset run: every site's rows are the
built-in digits rows (64 grey levels in ``[0, 16]``) followed by ``m``
*canary features*, one per canary. Real rows hold the middle of the public
range (8) in every canary feature, which the site's public-bounds scaling
(:meth:`common.data.Standardizer.from_bounds`, ``[0, 16] -> [-1, 1]``) maps
to exactly 0. Canary ``i`` is a record whose features are all 8 except its
own canary feature ``64 + i``, which is 16 (scaled: 1), with label
``i mod classes``; it is an out-of-distribution record no real row looks like.

Why: this is the input-space form of the "Dirac canary" that makes one-run
audits tight (the white-box canaries of Steinke, Nasr & Jagielski 2023). In a linear model
(what fedseal trains under record-level DP) the weights of canary ``i``'s
feature receive a gradient from canary ``i`` alone: every other record,
real or canary, is 0 there. So an included canary raises its own label's
weight on its feature, an excluded one leaves that weight exactly where the
(public, seeded) initial model put it, and the only thing that hides the
difference is the DP-SGD noise. Canaries do not interfere with each other
or with the data, so the audit measures the mechanism, not the attack's
confusion; and ``m`` canaries cost ``m`` more model inputs, not more rounds.

The score (:func:`simulations.privacy_audit.audit.canary_scores`) is black-box on the final global model:
the logit of the canary's label at the canary minus that logit at the
all-middle input, less the same difference for the initial model. For a
linear model it is exactly the change of that one weight over the run.

At the client level the same records are the canaries' whole data: canary
site ``j`` holds canary ``j`` alone, and its update is the only one that
touches canary ``j``'s feature.

Inclusion is drawn independently with probability 1/2 per canary
(:func:`draw_inclusion`), from a generator the caller passes (the command
uses the OS-keyed ChaCha20 stream); the guesses (:func:`guess`) depend on
the scores only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import ConfigurationError
from common.rng import RandomSource

__all__ = [
    "CanaryDesign",
    "count_correct",
    "draw_inclusion",
    "guess",
    "pad_rows",
    "plant_rows",
]

LOW, HIGH = 0, 16  # the digits' public grey-level bounds
MIDDLE = (LOW + HIGH) // 2  # scaled to exactly 0 by the public-bounds standardiser


@dataclass(frozen=True, slots=True, eq=False)
class CanaryDesign:
    """``count`` canaries after ``base_features`` real features, labels over ``num_classes``.

    Attributes
    ----------
    count : int
        ``m``, the number of canaries (and of canary features).
    base_features : int
        Features of a real row (64 for digits).
    num_classes : int
        Labels ``0 .. num_classes - 1``; canary ``i`` has label ``i mod num_classes``.
    """

    count: int
    base_features: int
    num_classes: int

    def __post_init__(self) -> None:
        for name in ("count", "base_features", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
        if self.num_classes < 2:
            raise ConfigurationError("canaries need at least two classes")

    @property
    def num_features(self) -> int:
        """Features of every row of the audited run: the real ones, then one per canary."""
        return self.base_features + self.count

    @property
    def labels(self) -> np.ndarray:
        """Each canary's label (int64)."""
        return np.arange(self.count, dtype=np.int64) % self.num_classes

    def rows(self) -> np.ndarray:
        """The ``m`` canary records' raw features, ``(m, num_features)`` uint8 in ``[0, 16]``."""
        x = np.full((self.count, self.num_features), MIDDLE, dtype=np.uint8)
        x[np.arange(self.count), self.base_features + np.arange(self.count)] = HIGH
        return x

    def neutral_row(self) -> np.ndarray:
        """The all-middle input (scaled: all zeros), the score's reference point."""
        return np.full((1, self.num_features), MIDDLE, dtype=np.uint8)


def pad_rows(x: np.ndarray, design: CanaryDesign) -> np.ndarray:
    """Real rows ``x`` (raw, ``(n, base_features)``) with the middle value in every canary feature.

    Raises
    ------
    ConfigurationError
        ``x`` of another width, or values outside the public bounds (a real
        row must not look like a canary).
    """
    if x.ndim != 2 or x.shape[1] != design.base_features:
        raise ConfigurationError(f"expected rows of {design.base_features} features, got {x.shape}")
    if x.size and (x.min() < LOW or x.max() > HIGH or not np.all(x == np.round(x))):
        raise ConfigurationError(f"real rows must be whole grey levels in [{LOW}, {HIGH}]")
    out = np.full((len(x), design.num_features), MIDDLE, dtype=np.uint8)
    out[:, : design.base_features] = x.astype(np.uint8)
    return out


def draw_inclusion(count: int, rng: RandomSource) -> np.ndarray:
    """``count`` independent fair coins: which canaries go into the training data.

    The audit's theorem needs exactly this: each canary in with probability
    1/2, independently of the others and of the training's randomness.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigurationError(f"count must be a positive integer, got {count!r}")
    return np.asarray(rng.random(count)) < 0.5


def plant_rows(
    real_x: np.ndarray,
    real_y: np.ndarray,
    canary_x: np.ndarray,
    canary_y: np.ndarray,
    train_positions: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """A site file's rows: the canaries at ``train_positions``, the real rows elsewhere, in order.

    The site splits its file into train and test rows by position
    (:func:`client.site.load_site_data`: a split keyed by its dataset id and
    the row count); putting every included canary on a train position makes
    "included" mean "trained on", as the audit's theorem needs.

    Raises
    ------
    ConfigurationError
        Fewer train positions than canaries, positions outside the file or
        repeated, or rows of unequal widths.
    """
    n = len(real_x) + len(canary_x)
    positions = np.asarray(train_positions, dtype=np.int64)
    if len(np.unique(positions)) != len(positions) or (
        len(positions) and (positions.min() < 0 or positions.max() >= n)
    ):
        raise ConfigurationError("train positions must be distinct rows of the file")
    if len(positions) < len(canary_x):
        raise ConfigurationError(
            f"{len(canary_x)} canaries do not fit the {len(positions)} training rows of the file"
        )
    if real_x.shape[1:] != canary_x.shape[1:]:
        raise ConfigurationError("real and canary rows must have the same features")
    at = positions[: len(canary_x)]
    is_canary = np.zeros(n, dtype=bool)
    is_canary[at] = True
    x = np.empty((n, *real_x.shape[1:]), dtype=real_x.dtype)
    y = np.empty(n, dtype=np.int64)
    x[at], y[at] = canary_x, canary_y
    x[~is_canary], y[~is_canary] = real_x, real_y
    return x, y


def guess(scores: np.ndarray, guesses_in: int, guesses_out: int) -> np.ndarray:
    """+1 ("in") for the ``guesses_in`` highest scores, -1 ("out") for the ``guesses_out`` lowest.

    Every other canary gets 0 (abstain). Ties are broken by canary index,
    which is independent of the inclusion draw.

    Raises
    ------
    ConfigurationError
        Negative counts, or more guesses than canaries.
    """
    s = np.asarray(scores, dtype=np.float64)
    m = len(s)
    for name, k in (("guesses_in", guesses_in), ("guesses_out", guesses_out)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigurationError(f"{name} must be a non-negative integer, got {k!r}")
    if guesses_in + guesses_out > m:
        raise ConfigurationError(
            f"{guesses_in} 'in' and {guesses_out} 'out' guesses exceed the {m} canaries"
        )
    if not np.all(np.isfinite(s)):
        raise ConfigurationError("canary scores must be finite")
    order = np.argsort(s, kind="stable")  # ascending; equal scores keep index order
    out = np.zeros(m, dtype=np.int8)
    out[order[:guesses_out]] = -1
    if guesses_in:
        out[order[m - guesses_in :]] = 1
    return out


def count_correct(guesses: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """Correct "in" guesses and correct "out" guesses (abstentions count in neither).

    Raises
    ------
    ConfigurationError
        Arrays of different lengths.
    """
    g = np.asarray(guesses)
    inc = np.asarray(included, dtype=bool)
    if g.shape != inc.shape:
        raise ConfigurationError("one guess per canary")
    return int(np.sum((g == 1) & inc)), int(np.sum((g == -1) & ~inc))

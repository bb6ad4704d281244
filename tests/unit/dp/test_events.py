from __future__ import annotations

import math

import pytest

from common.dp.events import PrivacyEvent, PrivacyLevel
from common.errors import ConfigurationError


def test_privacy_event_valid_fields_are_normalised_to_float() -> None:
    event = PrivacyEvent(1, 1, 3, "client")  # type: ignore[arg-type]
    assert event.noise_multiplier == 1.0 and isinstance(event.noise_multiplier, float)
    assert event.sample_rate == 1.0
    assert event.level is PrivacyLevel.CLIENT


@pytest.mark.parametrize(
    ("z", "q", "steps"),
    [
        (-0.1, 0.5, 1),
        (math.nan, 0.5, 1),
        (math.inf, 0.5, 1),
        (1.0, 0.0, 1),
        (1.0, 1.5, 1),
        (1.0, -0.1, 1),
        (1.0, 0.5, 0),
        (1.0, 0.5, 2.0),
        (1.0, 0.5, True),
        (True, 0.5, 1),
        ("1.0", 0.5, 1),
    ],
)
def test_privacy_event_out_of_domain_raises(z: object, q: object, steps: object) -> None:
    with pytest.raises(ConfigurationError):
        PrivacyEvent(z, q, steps)  # type: ignore[arg-type]


def test_privacy_event_unknown_level_raises() -> None:
    with pytest.raises(ConfigurationError):
        PrivacyEvent(1.0, 0.5, 1, "user")  # type: ignore[arg-type]


def test_privacy_event_is_frozen() -> None:
    event = PrivacyEvent(1.0, 0.5, 1)
    with pytest.raises(AttributeError):
        event.steps = 2  # type: ignore[misc]

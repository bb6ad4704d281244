"""Process environment fedseal's front ends set before Flower is imported.

Flower's SuperLink would otherwise install an app's dependencies with uv at
run time (pulling CUDA builds of torch), send telemetry, and check PyPI for
updates. fedseal sets safe defaults; an explicit environment value wins.
"""

from __future__ import annotations

import os

SAFE_FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Flower's SuperExec looks for a new task (a message's ClientApp, a run's ServerApp) every
    # second by default; every deployed exchange pays up to that before its process starts.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
}


def apply_safe_flower_env() -> None:
    """Set :data:`SAFE_FLOWER_ENV` defaults in ``os.environ`` (existing values kept)."""
    for key, value in SAFE_FLOWER_ENV.items():
        os.environ.setdefault(key, value)

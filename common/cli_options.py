"""typer option types shared by ``fedseal-sim`` and ``fedseal-server`` (one help text each)."""

from __future__ import annotations

from typing import Annotated

import typer

SecaggSetupRounds = Annotated[
    int,
    typer.Option(
        min=1,
        help="Rounds whose fresh per-round keys one SecAgg+ setup exchange prepares "
        "(full participation only; 1 = keys and shares exchanged every round).",
    ),
]

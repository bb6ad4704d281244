"""How fedseal's command-line tools turn errors into one clear line and an exit code.

Used by every front end (``fedseal-server``, ``fedseal-client``, ``fedseal-sim``); it
lives in ``policies`` because the coordinator and the site agent both mount its commands
and may not import each other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from common.errors import ConfigurationError, DataError, FedsealError
from policies.loading import PolicyFileError

P = ParamSpec("P")
R = TypeVar("R")
err_console = Console(stderr=True)

EXIT_FAILED = 1
EXIT_USAGE = 2


def one_line_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Decorator: a FedsealError becomes ``error: <message>`` and exit 2 (config) or 1.

    The message is printed as it is, on one line whatever the terminal's width.
    An invalid policy file is reported as ``policy check`` reports it (one line
    per problem, then the count; :func:`report_policy_problems`), exit 2.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except PolicyFileError as exc:
            report_policy_problems(exc)
            raise typer.Exit(EXIT_USAGE) from None
        except (ConfigurationError, DataError) as exc:
            _print_error(exc)
            raise typer.Exit(EXIT_USAGE) from None
        except FedsealError as exc:
            _print_error(exc)
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper


def report_policy_problems(exc: PolicyFileError, label: str | None = None) -> None:
    """Print every problem as ``FILE: field: problem``, then ``LABEL: N problems`` (stderr).

    ``label`` defaults to the file(s) the problems are in.
    """
    for violation in exc.violations:
        typer.echo(str(violation), err=True)
    count = len(exc.violations)
    if label is None:
        label = ", ".join(dict.fromkeys(v.file for v in exc.violations)) or "policy"
    typer.echo(f"{label}: {count} problem{'s' if count != 1 else ''}", err=True)


def _print_error(exc: Exception) -> None:
    err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)

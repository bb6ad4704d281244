"""SqlRecord satisfies the Record protocol: at runtime (names, signatures) and under mypy."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pytest

from server.record import Record, SqlRecord

ROOT = Path(__file__).resolve().parents[3]


def _protocol_members() -> set[str]:
    return {
        name
        for name in vars(Record)
        if (not name.startswith("_") or name in ("__enter__", "__exit__"))
        and name not in ("record_id",)
    }


def _public_methods(cls: type) -> set[str]:
    return {
        name
        for name, value in vars(cls).items()
        if callable(value) and (not name.startswith("_") or name in ("__enter__", "__exit__"))
    }


def test_sql_record_is_a_record(record: SqlRecord) -> None:
    assert isinstance(record, Record)
    assert isinstance(record.record_id, str) and record.record_id


def test_record_protocol_lists_exactly_the_public_methods_of_sql_record() -> None:
    assert _protocol_members() == _public_methods(SqlRecord)


@pytest.mark.parametrize("name", sorted(_protocol_members()))
def test_sql_record_method_signature_matches_the_protocol(name: str) -> None:
    expected = inspect.signature(getattr(Record, name))
    actual = inspect.signature(getattr(SqlRecord, name))
    assert list(actual.parameters.values()) == list(expected.parameters.values())
    if name != "__enter__":  # Self in the protocol, SqlRecord in the class
        assert actual.return_annotation == expected.return_annotation


def test_sql_record_satisfies_record_under_mypy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = pytest.importorskip("mypy.api")
    monkeypatch.setenv("MYPYPATH", str(ROOT))  # find server.record from any working directory
    source = textwrap.dedent(
        """
        from server.record import Record, SqlRecord


        def accepts(record: Record) -> Record:
            return record


        def given(record: SqlRecord) -> Record:
            return accepts(record)


        class Partial:
            record_id = "only an id and close"

            def close(self) -> None:
                pass


        partial: Record = Partial()
        """
    )
    control_line = source.splitlines().index("partial: Record = Partial()") + 1
    module = tmp_path / "record_conformance.py"
    module.write_text(source)
    stdout, stderr, status = api.run(
        [
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "--no-error-summary",
            "--hide-error-context",
            str(module),
        ]
    )
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    # Exactly one error, and it is the control: a class lacking the operations is refused.
    assert len(errors) == 1, stdout + stderr
    assert f"record_conformance.py:{control_line}:" in errors[0], errors
    assert '"Record"' in errors[0], errors
    assert status == 1

"""One way for a fixture to fail the checks that depend on it: one line, reported as the check's FAILURE.

A fixture that cannot build what a check needs (the model is not found, the GPU is missing, the targets match
nothing) calls :func:`fail_check`. conftest.py reports such a set-up failure as a failed check (not a pytest
"error"), with the message alone: no traceback, no chained exception.
"""
from __future__ import annotations

from typing import NoReturn

import pytest

MARK = "kolora_check_failure"


def fail_check(what: str, exc: BaseException | None = None) -> NoReturn:
    """Fail the requesting check with ``what`` (and the exception's message, when given)."""
    err = pytest.fail.Exception(f"{what}: {exc}" if exc is not None else what, pytrace=False)
    setattr(err, MARK, True)
    raise err from None


def is_check_failure(exc: BaseException | None) -> bool:
    return exc is not None and getattr(exc, MARK, False)

"""How checks fail: one line, reported as the check's FAILURE, and one root cause per broken input.

A fixture that cannot build what a check needs (the model is not found, the GPU is missing, the targets match
nothing) calls :func:`fail_check`. conftest.py reports such a set-up failure as a failed check (not a pytest
"error"), with the message alone: no traceback, no chained exception.

Root causes: when the fixture is one of :data:`ROOT_CAUSE_OWNER` (the plan, the model, its weights, its
tokenizer), only the check that owns it shows the full explanation; every other check that depends on it fails
with one short line naming the owner ("blocked: model not found — see test_model_found").
"""
from __future__ import annotations

import sys
from typing import NoReturn

import pytest

MARK = "kolora_check_failure"
ROOT = "kolora_root_cause"
# fixture (function name) → the check that reports its failure in full
ROOT_CAUSE_OWNER = {
    "plan": "test_plan_is_valid",
    "model_source": "test_model_found",
    "loaded_model": "test_weights_load",
    "loaded_tokenizer": "test_tokenizer_class_is_plans",
}


def fail_check(what: str, exc: BaseException | None = None, *, owner: str | None = None) -> NoReturn:
    """Fail the requesting check with ``what`` (and the exception's message, when given).

    ``owner``: the check that reports this failure in full (default: from :data:`ROOT_CAUSE_OWNER` by the name
    of the calling fixture); the other checks that depend on the fixture say "blocked: WHAT — see OWNER".
    """
    err = pytest.fail.Exception(f"{what}: {exc}" if exc is not None else what, pytrace=False)
    setattr(err, MARK, True)
    owner = owner or ROOT_CAUSE_OWNER.get(sys._getframe(1).f_code.co_name)
    if owner:
        setattr(err, ROOT, (owner, what))
    raise err from None


def is_check_failure(exc: BaseException | None) -> bool:
    return exc is not None and getattr(exc, MARK, False)


def root_cause(exc: BaseException | None) -> tuple[str, str] | None:
    """(owner check, short reason) when ``exc`` is a root-cause failure raised by :func:`fail_check`."""
    return getattr(exc, ROOT, None) if exc is not None else None


def failure_line(exc: BaseException) -> str:
    """The one-line message of a failed check: the message alone, without pytest's assertion rewriting
    (``assert False`` / ``+ where …``); an unexpected exception keeps its type."""
    if isinstance(exc, pytest.fail.Exception):
        text = exc.msg
    elif isinstance(exc, AssertionError):
        text = str(exc)
        text = text.splitlines()[0] if text.startswith("assert ") else text.split("\nassert ", 1)[0]
        text = text or "assertion failed"
    else:
        text = f"{type(exc).__name__}: {exc} (run with --tb=short for the traceback)"
    return " ".join(text.split())

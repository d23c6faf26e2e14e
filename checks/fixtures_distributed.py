"""Fixtures for the launch pre-flight (``-m distributed``; a pytest plugin listed in conftest.pytest_plugins).

``launch_preflight`` runs every collective once per session, in the same order on every rank
(:func:`kolora_probe.distributed.preflight.run_preflight`); the checks only read its result, so a check failing on
one rank never leaves another waiting in a collective.
"""
from __future__ import annotations

import pytest

from kolora_probe_checks.failures import fail_check


@pytest.fixture(scope="session")
def distributed_plan(plan_errors, request):
    """The plan with ``[distributed]`` completed from its accelerate / DeepSpeed config (None if invalid)."""
    if plan_errors:
        return None
    from kolora_probe.distributed.config import resolve_distributed
    from kolora_probe.plan.schema import PlanError

    try:
        return resolve_distributed(request.getfixturevalue("plan"))
    except PlanError as exc:
        fail_check(" | ".join(exc.lines))


@pytest.fixture(scope="session")
def launch_preflight(distributed_plan, plan_errors):
    from kolora_probe.distributed.preflight import run_preflight

    if distributed_plan is None:
        plan_dict, timeout = {"invalid_plan": list(plan_errors)}, 60.0
    else:
        plan_dict, timeout = distributed_plan.to_dict(), distributed_plan.distributed.rendezvous_timeout_s
    return run_preflight(plan_dict, timeout)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """After rank 0 has written its reports, every rank leaves together: a launcher stops the whole job as soon
    as one rank exits non-zero, which would otherwise kill rank 0 before its reports are written."""
    from kolora_probe.distributed.preflight import shutdown

    shutdown()


def need(result, *steps: str):
    """Fail the check with the first earlier step's error (launch, rendezvous, gather, …) that it depends on."""
    order = ("launch", "rendezvous", "gather", "all_reduce", "bandwidth")
    last = max(order.index(s) for s in steps) if steps else 0
    for step in order[:last + 1]:      # a step needs every step before it
        if step in result.errors:
            fail_check(result.errors[step])
    return result

"""Fixtures for the memory checks (a pytest plugin listed in conftest.pytest_plugins).

Config only: the prediction needs the plan's ``config.json`` (``model_config`` and ``structure_report`` from
fixtures_structure), no weights. The verdict (one trace of the plan's step on fake tensors, reused; the largest batch /
sequence length that fit, confirmed by traces only when the plan does not fit) is computed once per session; the
measurement runs one real step on the CUDA device, once, and an OOM comes back as a result, never as an exception.
"""
from __future__ import annotations

import pytest

from kolora_probe_checks.failures import fail_check


@pytest.fixture(scope="session")
def memory_shape(plan):
    from kolora_probe.memory.trace import StepShape

    return StepShape.from_plan(plan)


@pytest.fixture(scope="session")
def memory_verdict(plan, model_config, memory_shape, structure_report):
    """Predicted peak of the plan's step (trace), fit vs budget, largest batch / sequence length that fit."""
    from kolora_probe.memory.budget import budget_verdict, check_targets
    from kolora_probe.plan.feasibility import plan_model_problems

    infeasible = plan_model_problems(model_config, plan, plan.model.id)
    if infeasible:   # nothing is traced for a plan the model cannot run (test_plan_runs_on_the_model says why)
        fail_check("plan cannot run on this model: " + "; ".join(infeasible))
    problem = check_targets(model_config, plan, structure_report)   # the session's report, not a second one
    if problem:
        fail_check(problem)
    return budget_verdict(model_config, memory_shape, plan.budget_bytes, "trace")


@pytest.fixture(scope="session")
def memory_estimate(memory_verdict):
    return memory_verdict.estimate


@pytest.fixture(scope="session")
def memory_measurement(cuda_device, model_config, memory_shape, memory_verdict):
    """One real step of the plan on the GPU (after a warm-up step); OOM is recorded in the result."""
    from kolora_probe.memory.measure import measure_step

    return measure_step(model_config, memory_shape, str(cuda_device))

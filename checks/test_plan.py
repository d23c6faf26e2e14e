"""The training plan itself: valid, and consistent with what the machine can be asked to do."""
import pytest

pytestmark = pytest.mark.cpu


def test_plan_is_valid(plan_errors, pytestconfig):
    """The plan file and command-line overrides pass schema validation (one line per problem)."""
    assert not plan_errors, "invalid plan: " + " | ".join(plan_errors)


def test_plan_never_trusts_remote_code(plan, evidence):
    evidence("trust_remote_code", plan.model.trust_remote_code, expected=False)
    assert plan.model.trust_remote_code is False

"""The training plan itself: valid, and consistent with what the machine can be asked to do."""
import pytest

pytestmark = pytest.mark.cpu


def test_plan_is_valid(plan_errors, pytestconfig):
    """The plan file and command-line overrides pass schema validation (one line per problem)."""
    assert not plan_errors, "invalid plan: " + " | ".join(plan_errors)


def test_plan_runs_on_the_model(plan, model_config, evidence):
    """The model can run the plan at all: seq_len within its position limit, no quantization its checkpoint
    contradicts, bf16 only on a GPU that has it (when this run has a GPU)."""
    from kolora_probe.plan_feasibility import first_gpu, plan_model_problems, position_limit

    limit = position_limit(model_config)
    evidence("seq_len", plan.training.seq_len, expected=f"<= {limit.tokens}" if limit else None,
             note=f"config.json {limit.key}" if limit else "the config names no position limit")
    problems = plan_model_problems(model_config, plan, plan.model.id, first_gpu())
    if problems:
        pytest.fail("plan cannot run on this model: " + "; ".join(problems), pytrace=False)


def test_plan_never_trusts_remote_code(plan, evidence):
    evidence("trust_remote_code", plan.model.trust_remote_code, expected=False)
    assert plan.model.trust_remote_code is False

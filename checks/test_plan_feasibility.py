"""The plan against the model (and the GPU, when the run has one): can the model run the plan at all?
Needs the model's config.json (kept apart from test_plan.py, whose checks need the plan alone)."""
import pytest

pytestmark = pytest.mark.cpu


def test_plan_runs_on_the_model(plan, model_config, evidence):
    """The model can run the plan at all: seq_len within its position limit, no quantization its checkpoint
    contradicts (bf16 on the GPU is checked by test_gpu.py::test_bf16_supported_when_planned with -m gpu)."""
    from kolora_probe.plan.feasibility import plan_model_problems, position_limit

    limit = position_limit(model_config)
    evidence("seq_len", plan.training.seq_len, expected=f"<= {limit.tokens}" if limit else None,
             note=f"config.json {limit.key}" if limit else "the config names no position limit")
    problems = plan_model_problems(model_config, plan, plan.model.id)
    if problems:
        pytest.fail("plan cannot run on this model: " + "; ".join(problems), pytrace=False)

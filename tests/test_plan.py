"""Plan loading, validation messages and overrides."""
from __future__ import annotations

import pytest

from kolora_probe.plan import PlanError, apply_overrides, default_plan, load_plan
from kolora_probe.plan_options import plan_from_options

ROOT_PLANS = __import__("pathlib").Path(__file__).resolve().parent.parent / "plans"


def write(tmp_path, text: str):
    p = tmp_path / "plan.toml"
    p.write_text(text, encoding="utf-8")
    return p


VALID = """
[model]
id = "some/model"
[lora]
r = 8
alpha = 16
dropout = 0.05
target_modules = ["q_proj", "v_proj"]
[budget]
gpu_memory_gib = 12
"""


def test_default_plan_is_the_users_validated_setup():
    plan = default_plan()
    assert plan.model.id == "skt/kogpt2-base-v2"
    assert (plan.lora.r, plan.lora.alpha, plan.lora.dropout) == (16, 32.0, 0.1)
    assert plan.lora.target_modules == ("lm_head",)
    assert plan.lora.expected_trainable_params == 831488
    assert plan.model.trust_remote_code is False


def test_shipped_qlora_plan_loads():
    plan = load_plan(ROOT_PLANS / "kogpt2-qlora.toml")
    assert plan.training.quantization == "4bit"
    assert plan.lora.expected_trainable_params == 2359296


def test_minimal_plan_gets_defaults(tmp_path):
    plan = load_plan(write(tmp_path, VALID))
    assert plan.training.dtype == "fp32" and plan.training.batch_size == 1
    assert plan.budget_bytes == 12 * 2**30


@pytest.mark.parametrize("edit, expected_fragments", [
    (("r = 8", "r = 0"), ["lora.r = 0", "an integer >= 1"]),
    (("r = 8", "r = 8\nrank = 3"), ["unknown key lora.rank", "allowed keys in [lora]"]),
    (("gpu_memory_gib = 12", "gpu_memory_gib = 0"), ["budget.gpu_memory_gib = 0", "> 0"]),
    (("gpu_memory_gib = 12", "gpu_memory_gib = \"12\""), ["budget.gpu_memory_gib = '12'", "a number"]),
    (("[budget]", "[training]\ndtype = \"bf17\"\nbatch_size = -1\n[budget]"),
     ["training.dtype = 'bf17'", "'fp32', 'fp16', 'bf16'"]),
    (("target_modules = [\"q_proj\", \"v_proj\"]", "target_modules = []"), ["lora.target_modules = []", "non-empty"]),
    (("id = \"some/model\"", "id = \"some/model\"\ntrust_remote_code = true"), ["model.trust_remote_code", "false"]),
    (("[budget]", "[extra]\nx = 1\n[budget]"), ["unknown table [extra]"]),
])
def test_invalid_plans_give_one_line_each_naming_file_key_and_allowed(tmp_path, edit, expected_fragments):
    path = write(tmp_path, VALID.replace(*edit))
    with pytest.raises(PlanError) as info:
        load_plan(path)
    text = str(info.value)
    for fragment in expected_fragments:
        assert fragment in text
    for line in info.value.lines:
        assert line.startswith(str(path)), line
        assert "\n" not in line


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    path = write(tmp_path, VALID.replace("r = 8", "r = 0").replace("dropout = 0.05", "dropout = 1.5"))
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert len(info.value.lines) == 2


def test_toml_syntax_error_names_the_file(tmp_path):
    with pytest.raises(PlanError) as info:
        load_plan(write(tmp_path, "[lora\nr = 1"))
    assert str(tmp_path / "plan.toml") in str(info.value) and "not valid TOML" in str(info.value)


def test_missing_file_says_so(tmp_path):
    with pytest.raises(PlanError, match="plan file not found"):
        load_plan(tmp_path / "nope.toml")


def test_missing_required_key(tmp_path):
    with pytest.raises(PlanError, match="missing required key lora.r"):
        load_plan(write(tmp_path, VALID.replace("r = 8\n", "")))


def test_overrides_apply_and_validate():
    plan = apply_overrides(default_plan(), {"lora.r": 4, "training.batch_size": 2, "lora.target_modules": ["c_attn"]})
    assert (plan.lora.r, plan.training.batch_size, plan.lora.target_modules) == (4, 2, ("c_attn",))
    with pytest.raises(PlanError) as info:
        apply_overrides(default_plan(), {"lora.r": 0}, {"lora.r": "--r"})
    assert str(info.value) == "--r 0 is invalid; expected an integer >= 1"


def test_option_parsing_keeps_bad_strings_for_validation():
    got = {"plan_r": "abc"}
    with pytest.raises(PlanError, match="--r 'abc' is invalid; expected an integer >= 1"):
        plan_from_options(None, lambda dest: _parse(dest, got))


def _parse(dest, got):
    from kolora_probe.plan_options import PLAN_OPTIONS, _safe

    raw = got.get(dest)
    if raw is None:
        return None
    opt = next(o for o in PLAN_OPTIONS if o.dest == dest)
    return _safe(opt.convert, opt.flag)(raw)


def test_target_parameters_need_zero_dropout(tmp_path):
    """PEFT's ParamWrapper (LoRA on weight tensors such as MoE experts) refuses lora_dropout != 0."""
    text = VALID.replace('target_modules = ["q_proj", "v_proj"]',
                         'target_modules = ["q_proj"]\ntarget_parameters = ["experts.gate_up_proj"]')
    p = write(tmp_path, text)
    with pytest.raises(PlanError) as info:
        load_plan(p)
    (line,) = info.value.lines
    assert line.startswith(f"{p}: lora.target_parameters needs lora.dropout = 0") and "0.05" in line
    plan = load_plan(write(tmp_path, text.replace("dropout = 0.05", "dropout = 0")))
    assert plan.lora.target_parameters == ("experts.gate_up_proj",)
    with pytest.raises(PlanError) as info:
        apply_overrides(plan, {"lora.dropout": 0.1}, {"lora.dropout": "--lora-dropout"})
    assert "command-line overrides: lora.target_parameters needs lora.dropout = 0" in str(info.value)
    assert load_plan(write(tmp_path, VALID)).lora.target_parameters == ()

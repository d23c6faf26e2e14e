"""Plan loading, validation messages and overrides."""
from __future__ import annotations

import pytest

from kolora_probe.plan.schema import PlanError, apply_overrides, default_plan, load_plan
from kolora_probe.plan.options import plan_from_options

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
    assert str(info.value) == "--r 0 is invalid; expected an integer >= 1 (at most 65,536)"


def test_option_parsing_keeps_bad_strings_for_validation():
    got = {"plan_r": "abc"}
    with pytest.raises(PlanError, match="--r 'abc' is invalid; expected an integer >= 1"):
        plan_from_options(None, lambda dest: _parse(dest, got))


def _parse(dest, got):
    from kolora_probe.plan.options import PLAN_OPTIONS, _safe

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


def test_another_model_drops_the_plans_pinned_count_and_says_so():
    """The default plan pins 831,488 for KoGPT-2's lm_head; that number means nothing for another model."""
    base = default_plan()
    pinned = base.lora.expected_trainable_params
    assert pinned is not None and base.notes == ()
    plan = apply_overrides(base, {"model.id": "/models/other"}, {"model.id": "--model"})
    assert plan.lora.expected_trainable_params is None
    (note,) = plan.notes
    assert f"{pinned:,}" in note and "--model /models/other" in note and "--expected-trainable" in note
    kept = apply_overrides(base, {"model.id": "/models/other", "lora.expected_trainable_params": 42})
    assert kept.lora.expected_trainable_params == 42 and kept.notes == ()
    same = apply_overrides(base, {"model.id": base.model.id})
    assert same.lora.expected_trainable_params == pinned and same.notes == ()


def test_expected_trainable_none_unsets_the_plans_count():
    plan = plan_from_options(None, lambda dest: _parse(dest, {"plan_expected_trainable": "none"}))
    assert plan.lora.expected_trainable_params is None
    plan = plan_from_options(None, lambda dest: _parse(dest, {"plan_expected_trainable": "1234"}))
    assert plan.lora.expected_trainable_params == 1234


@pytest.mark.parametrize("edit, key", [
    (("gpu_memory_gib = 12", "gpu_memory_gib = inf"), "budget.gpu_memory_gib = inf"),
    (("gpu_memory_gib = 12", "gpu_memory_gib = nan"), "budget.gpu_memory_gib = nan"),
    (("gpu_memory_gib = 12", "gpu_memory_gib = 1e300"), "budget.gpu_memory_gib = 1e+300"),
    (("alpha = 16", "alpha = inf"), "lora.alpha = inf"),
    (("alpha = 16", "alpha = -inf"), "lora.alpha = -inf"),
    (("r = 8", "r = 3000000000"), "lora.r = 3000000000"),
    (("r = 8", "r = 9223372036854775807"), "lora.r = 9223372036854775807"),
    (("[budget]", "[training]\nseq_len = 9223372036854775807\n[budget]"), "training.seq_len = 9223372036854775807"),
    (("[budget]", "[training]\nbatch_size = 3000000000\n[budget]"), "training.batch_size = 3000000000"),
    (("[budget]", "[checks]\nmax_loss_fraction = nan\n[budget]"), "checks.max_loss_fraction = nan"),
])
def test_numbers_nothing_can_use_are_one_line_plan_errors(tmp_path, edit, key):
    path = write(tmp_path, VALID.replace(*edit))
    with pytest.raises(PlanError) as info:
        load_plan(path)
    (line,) = info.value.lines
    assert line.startswith(f"{path}: {key} is invalid; expected ") and "\n" not in line


@pytest.mark.parametrize("flag, dest, raw", [("--budget-gib", "plan_budget_gib", "inf"), ("--alpha", "plan_alpha", "inf"),
                                             ("--alpha", "plan_alpha", "nan"), ("--r", "plan_r", "3e9"),
                                             ("--r", "plan_r", str(2**63 - 1)), ("--seq-len", "plan_seq_len", str(2**63 - 1))])
def test_non_finite_and_huge_overrides_are_one_line_errors(flag, dest, raw):
    with pytest.raises(PlanError) as info:
        plan_from_options(None, lambda d: _parse(d, {dest: raw}))
    (line,) = info.value.lines
    assert line.startswith(f"{flag} ") and "is invalid; expected" in line


def test_use_cache_with_gradient_checkpointing_is_a_plan_error(tmp_path):
    path = write(tmp_path, VALID.replace("[budget]", "[training]\nuse_cache = true\ngradient_checkpointing = true\n[budget]"))
    with pytest.raises(PlanError) as info:
        load_plan(path)
    (line,) = info.value.lines
    assert line.startswith(f"{path}: training.use_cache = true contradicts training.gradient_checkpointing = true")
    assert load_plan(write(tmp_path, VALID.replace("[budget]", "[training]\nuse_cache = true\n[budget]"))).training.use_cache

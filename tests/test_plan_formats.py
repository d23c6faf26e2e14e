"""The user's own training config as the plan: axolotl, LLaMA-Factory, TRL/transformers, PEFT adapter_config.json.

The fixtures in tests/plan_fixtures/ are written by hand after each project's documented examples and describe the
same run as plans/kogpt2-qlora.toml; equivalent files must give the same effective plan.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kolora_probe.plan import formats as plan_formats
from kolora_probe.plan.schema import PlanError, load_plan, plan_from_dict
from kolora_probe.plan.formats import load_plans, parse_file, plan_toml
from kolora_probe.plan.options import plan_from_options

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "plan_fixtures"
TOML = ROOT / "plans" / "kogpt2-qlora.toml"
BUDGET = {"budget.gpu_memory_gib": 16.0}, {"budget.gpu_memory_gib": "--budget-gib"}

EQUIVALENTS = {
    "axolotl": [FIX / "axolotl_qlora.yml"],
    "llama-factory": [FIX / "llama_factory_qlora.yaml"],
    "trl": [FIX / "trl_sft_qlora.yaml"],
    "trl+peft": [FIX / "trl_train_only.json", FIX / "adapter_config.json"],
}


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """This machine has no GPU; tests that want one inject it."""
    monkeypatch.setattr(plan_formats, "device_budget", lambda: (None, "no GPU in this test"))


def effective(plan) -> dict:
    """What the checks see, minus the kolora-only keys no training framework has."""
    d = plan.to_dict()
    d["lora"].pop("expected_trainable_params")
    return {"model": {k: d["model"][k] for k in ("id", "revision", "trust_remote_code")},
            "lora": d["lora"], "training": d["training"], "budget": d["budget"]}


@pytest.mark.parametrize("name", EQUIVALENTS)
def test_equivalent_configs_give_the_toml_plan(name):
    toml_plan = load_plan(TOML)
    plan = load_plans(EQUIVALENTS[name], *BUDGET)
    assert effective(plan) == effective(toml_plan)
    assert plan.notes == ()


def test_a_changed_field_changes_the_plan(tmp_path):
    """The comparison above can fail: one edited key in the axolotl file is seen."""
    text = (FIX / "axolotl_qlora.yml").read_text().replace("micro_batch_size: 8", "micro_batch_size: 4")
    p = tmp_path / "axolotl.yml"
    p.write_text(text)
    assert effective(load_plans([p], *BUDGET)) != effective(load_plan(TOML))
    assert load_plans([p], *BUDGET).training.batch_size == 4


def test_detected_by_content_not_by_name(tmp_path):
    for src, name in ((FIX / "axolotl_qlora.yml", "train.cfg"), (FIX / "adapter_config.json", "adapter.txt"),
                      (FIX / "llama_factory_qlora.yaml", "lf"), (FIX / "trl_sft_qlora.yaml", "sft.json5")):
        dst = tmp_path / name
        shutil.copy(src, dst)
        assert parse_file(dst)[0] == parse_file(src)[0]
    assert [parse_file(p)[0] for p in (FIX / "axolotl_qlora.yml", FIX / "adapter_config.json",
                                       FIX / "llama_factory_qlora.yaml", FIX / "trl_sft_qlora.yaml", TOML)] == \
        [plan_formats.AXOLOTL, plan_formats.PEFT, plan_formats.LLAMA_FACTORY, plan_formats.TRL, plan_formats.KOLORA]


def test_plan_show_toml_round_trips_with_origins():
    plan = load_plans([FIX / "axolotl_qlora.yml"], *BUDGET)
    text = plan_toml(plan)
    again = plan_from_dict(tomllib.loads(text), "shown")
    assert effective(again) == effective(plan)
    assert "r = 16  # axolotl_qlora.yml: lora_r" in text
    assert "gpu_memory_gib = 16.0  # command line: --budget-gib" in text
    assert "double_quant = true  # axolotl YAML default" in text
    assert "use_cache = false  # kolora-probe default" in text


def write_yaml(tmp_path, extra: str, base: Path = FIX / "axolotl_qlora.yml") -> Path:
    p = tmp_path / "cfg.yml"
    p.write_text(base.read_text() + "\n" + extra)
    return p


def test_relevant_unmapped_fields_are_one_line_each_irrelevant_ones_ignored(tmp_path):
    text = (FIX / "axolotl_qlora.yml").read_text()
    text = text.replace("flash_attention: false", "flash_attention: true").replace(
        "optimizer: paged_adamw_32bit", "optimizer: lion_8bit")
    p = tmp_path / "cfg.yml"
    p.write_text(text + "deepspeed: deepspeed_configs/zero3.json\npeft_use_dora: true\nwandb_project: kogpt\n")
    notes = load_plans([p], *BUDGET).notes
    assert len(notes) == 4, notes
    for key in ("flash_attention", "optimizer: 'lion_8bit'", "deepspeed", "peft_use_dora"):
        assert sum(f"cfg.yml: {key.split(':')[0]}" in n for n in notes) == 1, (key, notes)
    assert not any("wandb" in n for n in notes)


@pytest.mark.parametrize("name, expected", [
    ("paged_adamw_8bit", "adamw_8bit"), ("adamw_bnb_8bit", "adamw_8bit"), ("adamw_8bit", "adamw_8bit"),
    ("paged_adamw_32bit", "adamw"), ("adamw_torch_fused", "adamw"), ("adamw_torch", "adamw"), ("sgd", "sgd"),
])
def test_optimizer_names(tmp_path, name, expected):
    p = write_yaml(tmp_path, "")
    p.write_text(p.read_text().replace("optimizer: paged_adamw_32bit", f"optimizer: {name}"))
    plan = load_plans([p], *BUDGET)
    assert plan.training.optimizer == expected and plan.notes == ()
    assert ("paged" in plan.origins["training.optimizer"]) == name.startswith("paged")


def test_llama_factory_defaults(tmp_path):
    p = tmp_path / "lf.yaml"
    p.write_text("model_name_or_path: some/model\nstage: sft\nfinetuning_type: lora\nlora_rank: 4\n")
    plan = load_plans([p], *BUDGET)
    assert (plan.lora.r, plan.lora.alpha, plan.lora.dropout) == (4, 8.0, 0.0)
    assert plan.lora.target_modules == ("all-linear",)
    assert plan.training.gradient_checkpointing is True          # on unless disable_gradient_checkpointing
    assert (plan.training.batch_size, plan.training.seq_len, plan.training.quantization) == (8, 2048, "none")
    assert "lora_alpha = 2 × lora_rank" in plan.origins["lora.alpha"]


def test_trl_without_use_peft_needs_an_adapter(tmp_path):
    p = tmp_path / "sft.yaml"
    p.write_text("model_name_or_path: some/model\nlora_r: 8\nper_device_train_batch_size: 2\nmax_length: 256\n")
    with pytest.raises(PlanError) as info:
        load_plans([p], *BUDGET)
    assert "lora_r: ignored: use_peft is not true" not in str(info.value)   # notes are not errors
    assert "no value for [lora].target_modules" in str(info.value)
    adapter = tmp_path / "adapter_config.json"
    adapter.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                   "target_modules": ["q_proj"], "base_model_name_or_path": "some/model"}))
    plan = load_plans([p, adapter], *BUDGET)
    assert (plan.lora.r, plan.training.batch_size, plan.training.seq_len) == (8, 2, 256)
    assert any("lora_r: ignored: use_peft is not true" in n for n in plan.notes)


def test_transformers_training_arguments_json_with_adapter(tmp_path):
    args = tmp_path / "training_args.json"
    args.write_text(json.dumps({"output_dir": "out", "per_device_train_batch_size": 4, "gradient_checkpointing": True,
                                "fp16": True, "optim": "paged_adamw_8bit", "learning_rate": 1e-4}))
    assert parse_file(args)[0] == plan_formats.TRANSFORMERS
    plan = load_plans([args, FIX / "adapter_config.json"], *BUDGET)
    t = plan.training
    assert (t.batch_size, t.gradient_checkpointing, t.dtype, t.optimizer) == (4, True, "fp16", "adamw_8bit")
    assert t.seq_len == 512 and plan.origins["training.seq_len"] == "kolora-probe default"
    assert [n for n in plan.notes if "max_length" in n and "--seq-len" in n], plan.notes   # said, not dropped
    assert plan.model.id == "skt/kogpt2-base-v2" and plan.lora.r == 16


def test_conflicting_files_are_one_line_naming_both(tmp_path):
    adapter = tmp_path / "adapter_config.json"
    adapter.write_text((FIX / "adapter_config.json").read_text().replace('"r": 16', '"r": 8'))
    with pytest.raises(PlanError) as info:
        load_plans([FIX / "trl_sft_qlora.yaml", adapter], *BUDGET)
    assert info.value.lines == ["trl_sft_qlora.yaml: lora_r = 16 but adapter_config.json: r = 8; make the files "
                                "agree or choose with --r"]
    plan = load_plans([FIX / "trl_sft_qlora.yaml", adapter], {"lora.r": 8, **BUDGET[0]}, {"lora.r": "--r"})
    assert plan.lora.r == 8 and plan.origins["lora.r"] == "command line: --r"


def test_budget_from_option_device_or_one_line(monkeypatch):
    files = [FIX / "axolotl_qlora.yml"]
    with pytest.raises(PlanError) as info:
        load_plans(files)
    assert len(info.value.lines) == 1 and "no GPU memory budget" in info.value.lines[0]
    assert "--budget-gib" in info.value.lines[0]
    monkeypatch.setattr(plan_formats, "device_budget", lambda: (139.8, "device: GPU 0 Fake total memory (NVML)"))
    plan = load_plans(files)
    assert plan.budget.gpu_memory_gib == 139.8
    assert plan.origins["budget.gpu_memory_gib"].startswith("device: GPU 0")
    assert load_plans(files, *BUDGET).budget.gpu_memory_gib == 16.0   # the option wins over the device


@pytest.mark.parametrize("text, suffix, fragment", [
    ("base_model: x\nadapter: lora\nlora_r: 8\nlora_alpha: [\n", ".yml", "not valid YAML"),
    ('{"r": 8, ', ".json", "not valid JSON"),
    ("name: hello\ncolor: blue\n", ".yml", "not a recognised plan"),
    ("base_model: x\nlora_r: 8\nlora_alpha: 16\nlora_target_modules: [q_proj]\n", ".yml", "full fine-tuning"),
    ('{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ".*proj"}', ".json", "regular expression"),
    ('{"peft_type": "IA3", "target_modules": ["k"]}', ".json", "peft_type = 'IA3'"),
    ("base_model: x\nadapter: lora\nlora_r: 0\nlora_alpha: 16\nlora_target_linear: true\n", ".yml",
     "cfg.yml: lora_r = 0 is invalid"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, text, suffix, fragment):
    p = tmp_path / f"cfg{suffix}"
    p.write_text(text)
    with pytest.raises(PlanError) as info:
        load_plans([p], *BUDGET)
    assert len(info.value.lines) == 1, info.value.lines
    assert fragment in info.value.lines[0] and "cfg" in info.value.lines[0]


def test_repeated_plan_option_and_default():
    plan = plan_from_options([str(p) for p in EQUIVALENTS["trl+peft"]], lambda dest: 16.0 if dest == "plan_budget_gib" else None)
    assert plan.lora.r == 16 and plan.source.endswith("+ command-line overrides")
    assert plan_from_options(None, lambda dest: None).model.id == "skt/kogpt2-base-v2"


# --- the commands, as users run them ------------------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "kolora_probe", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def main(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (one torch import for the module; the subprocess form is tested below)."""
    from kolora_probe.cli.main import main as cli_main

    capsys.readouterr()
    rc = cli_main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def small_gpt2(tmp_path_factory):
    from transformers import GPT2Config

    from structure_configs import save_config

    return save_config(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=1000, n_positions=256),
                       tmp_path_factory.mktemp("small-gpt2"))


def test_estimate_same_prediction_for_axolotl_and_toml(small_gpt2, capsys):
    # a budget the plan fits: one trace, no search (the card total includes the CUDA context, ~0.27 GiB)
    common = ("--model", str(small_gpt2), "--seq-len", "128", "--budget-gib", "4", "--json")
    rc_a, out_a, err_a = main(capsys, "estimate", "--plan", str(FIX / "axolotl_qlora.yml"), *common)
    rc_t, out_t, err_t = main(capsys, "estimate", "--plan", str(TOML), *common)
    assert rc_a == 0 and rc_t == 0, err_a + err_t
    ja, jt = json.loads(out_a), json.loads(out_t)
    assert ja["predicted_peak_bytes"] == jt["predicted_peak_bytes"] > 0
    assert ja["components"] == jt["components"]
    assert (ja["max_batch_size"], ja["max_seq_len"]) == (jt["max_batch_size"], jt["max_seq_len"])


def test_lora_adapter_config_gives_peft_count(small_gpt2, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter = tmp_path / "adapter_config.json"
    cfg = json.loads((FIX / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(small_gpt2)
    adapter.write_text(json.dumps(cfg))
    rc, out, err = main(capsys, "lora", "--plan", str(adapter), "--json")
    assert rc == 0, err
    doc = json.loads(out)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(small_gpt2))
    config = LoraConfig.from_pretrained(str(tmp_path))
    config.inference_mode = False        # a saved adapter says inference_mode: true; training makes it trainable
    peft_model = get_peft_model(model, config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert doc["peft_trainable_params"] == doc["trainable_params"] == trainable


def test_plan_show_command():
    p = cli("plan", "show", "--plan", str(FIX / "llama_factory_qlora.yaml"), "--batch-size", "2")
    assert p.returncode == 0, p.stderr
    assert "batch_size = 2  # command line: --batch-size" in p.stdout
    assert "cutoff_len" in p.stdout and "gpu_memory_gib = inf  # not set: pass --budget-gib" in p.stdout
    bad = cli("plan", "show", "--plan", str(FIX / "nope.yml"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "plan file not found" in bad.stderr

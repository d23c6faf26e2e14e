"""A plan the model (or the device) cannot run fails before anything is computed: seq_len beyond the position
limit (full precision, 4-bit and 8-bit plans alike), a quantization the checkpoint's own quantization_config
contradicts, bf16 on a GPU without it; no "largest sequence length" answer exceeds the model's limit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kolora_probe.env.facts import TorchGpu
from kolora_probe.plan.schema import apply_overrides, default_plan, load_plan
from kolora_probe.plan.feasibility import plan_model_problems, position_limit
from structure_configs import kogpt2_config, save_config
from suite_runner import documented, run_suite

ROOT = Path(__file__).resolve().parent.parent
QLORA = ROOT / "plans" / "kogpt2-qlora.toml"


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_seq_len_beyond_the_position_limit_is_one_line(quantization):
    config = kogpt2_config()
    limit = config.n_positions
    plan = apply_overrides(load_plan(QLORA) if quantization == "4bit" else default_plan(),
                           {"training.quantization": quantization, "training.seq_len": limit + 1})
    (line,) = plan_model_problems(config, plan, "ko")
    assert line == (f"training.seq_len = {limit + 1:,} exceeds the position limit of ko (n_positions = {limit:,} "
                    f"in config.json); fix: set [training].seq_len (--seq-len) to at most {limit:,}")
    assert plan_model_problems(config, apply_overrides(plan, {"training.seq_len": limit}), "ko") == []
    assert position_limit(config).tokens == limit


def test_quantization_the_checkpoint_contradicts():
    config = kogpt2_config()
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (line,) = plan_model_problems(config, load_plan(QLORA), "ko8")
    assert line.startswith("training.quantization = '4bit' but ko8 is stored 8bit (quantization_config in config.json)")
    assert "fix: set [training].quantization = '8bit'" in line
    plan8 = apply_overrides(load_plan(QLORA), {"training.quantization": "8bit"})
    assert plan_model_problems(config, plan8, "ko8") == []


def test_bf16_on_a_gpu_without_it():
    old = TorchGpu(0, "Tesla T4", 16 * 2**30, None, (7, 5), False, None)
    new = TorchGpu(0, "H100", 80 * 2**30, None, (9, 0), True, None)
    plan = load_plan(QLORA)           # dtype = weights_dtype = bf16
    (line,) = plan_model_problems(kogpt2_config(), plan, "ko", old)
    assert line.startswith("training.dtype = 'bf16' but GPU 0 (Tesla T4, compute capability 7.5) has no bf16; fix: ")
    assert plan_model_problems(kogpt2_config(), plan, "ko", new) == []
    assert plan_model_problems(kogpt2_config(), plan, "ko", None) == []     # no GPU in this run: -m gpu checks it


def test_largest_sequence_length_never_exceeds_the_model_limit():
    from kolora_probe.memory.budget import budget_verdict
    from kolora_probe.memory.trace import StepShape

    config = kogpt2_config()
    shape = StepShape.from_plan(apply_overrides(default_plan(), {"training.seq_len": 2 * config.n_positions}))
    v = budget_verdict(config, shape, 1 << 50, "closed_form")
    assert v.seq_limit == config.n_positions and v.max_seq_len <= config.n_positions


@pytest.fixture(scope="module")
def ko_dir(tmp_path_factory):
    return save_config(kogpt2_config(), tmp_path_factory.mktemp("kogpt2-config-only"))


def test_estimate_and_gate_refuse_seq_len_beyond_the_limit(ko_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([sys.executable, "-m", "kolora_probe", "estimate", f"--model={ko_dir}", "--seq-len=2048"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("kolora-probe estimate: plan cannot run on this model: training.seq_len = 2,048 exceeds")
    run = run_suite("checks/test_plan_feasibility.py", "checks/test_memory_budget.py", f"--model={ko_dir}", "--seq-len=2048",
                    reports=tmp_path / "r")
    assert run.returncode == 1
    check = run.outcome("test_plan_runs_on_the_model")
    assert check["outcome"] == "failed" and "seq_len = 2,048 exceeds the position limit" in check["message"]
    budget = run.outcome("test_predicted_peak_fits_budget")
    assert budget["outcome"] == "failed" and budget["message"].startswith("plan cannot run on this model: ")
    documented("plan cannot run on this model")

"""`kolora-probe estimate` and the memory checks as users run them (subprocess, HF_HUB_OFFLINE=1, config-only dir)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from structure_configs import kogpt2_config, save_config
from suite_runner import run_cli, run_suite

ROOT = Path(__file__).resolve().parent.parent
GIB = 2 ** 30


@pytest.fixture(scope="module")
def ko_dir(tmp_path_factory):
    return save_config(kogpt2_config(), tmp_path_factory.mktemp("kogpt2-config-only"))


def cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "kolora_probe", "estimate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("estimate", *args)


def our_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith("kolora-probe estimate:")]


def test_estimate_json_default_plan_on_config_only_dir(ko_dir):
    p = cli_subprocess("--model", str(ko_dir), "--json")   # the real entry point, in a new interpreter
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    for key in ("predicted_peak_bytes", "budget_bytes", "fits", "max_batch_size", "components"):
        assert key in d
    assert d["budget_bytes"] == 24 * GIB and d["fits"] is True and d["method"] == "trace"
    assert d["predicted_peak_bytes"] == sum(d["components"].values())
    # default plan: LoRA on lm_head, b8 s512 fp32: three fp32 b·s·V tensors (2400 MiB) + 477.5 MiB of weights
    assert 2.8 * GIB < d["predicted_peak_bytes"] < 2.9 * GIB
    assert d["components"]["lora_weights"] == 831_488 * 4
    assert d["max_batch_size"] > 8 and d["max_seq_len"] == 1024


def test_estimate_table_qlora_too_small_budget(ko_dir):
    # closed form here to keep the module under a minute (the QLoRA trace is compared in test_memory_closed_form)
    p = cli("--plan", "plans/kogpt2-qlora.toml", "--model", str(ko_dir), "--budget-gib", "1.5",
            "--method", "closed-form")
    assert p.returncode == 1, p.stderr
    out = p.stdout
    assert "frozen_weights" in out and "logits_and_loss" in out and "total (predicted peak)" in out
    assert "does NOT fit" in out
    m = re.search(r"largest batch size that fits at seq 512: (\d+)", out)
    assert m and 1 <= int(m.group(1)) < 8


def test_estimate_closed_form_and_overrides(ko_dir):
    p = cli("--model", str(ko_dir), "--json", "--method", "closed-form", "--targets", "c_attn", "--r", "8",
            "--dtype", "bf16", "--batch-size", "2", "--seq-len", "256", "--gradient-checkpointing")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["method"] == "closed_form"
    assert d["shape"] == {**d["shape"], "batch_size": 2, "seq_len": 256, "dtype": "bf16", "r": 8,
                          "gradient_checkpointing": True, "targets": ["c_attn"]}
    assert d["components"]["lora_weights"] == 12 * 8 * (768 + 2304) * 4


def test_stack_options_override_the_plan_and_change_the_trace(ko_dir):
    """The plan's stack keys have options too: --no-prepare-kbit on the QLoRA plan keeps the non-quantized params
    in bf16 (smaller than PEFT's fp32 cast); --attn-implementation / --fused-cross-entropy reach the traced shape."""
    base = ("--plan", str(ROOT / "plans" / "kogpt2-qlora.toml"), "--model", str(ko_dir), "--json",
            "--batch-size", "1", "--seq-len", "64")
    runs = {}
    for name, extra in {"default": (), "no-prepare": ("--no-prepare-kbit",),
                        "stack": ("--attn-implementation", "eager", "--fused-cross-entropy", "--trl-casting",
                                  "--adapter-dtype", "bf16", "--no-checkpointing-reentrant")}.items():
        p = cli(*base, *extra)
        assert p.returncode == 0, p.stderr
        runs[name] = json.loads(p.stdout)
    assert runs["default"]["shape"]["prepare_kbit"] is True and runs["no-prepare"]["shape"]["prepare_kbit"] is False
    assert runs["no-prepare"]["predicted_peak_bytes"] < runs["default"]["predicted_peak_bytes"]
    assert runs["no-prepare"]["components"]["frozen_weights"] < runs["default"]["components"]["frozen_weights"]
    stack = runs["stack"]["shape"]
    assert (stack["attn_implementation"], stack["fused_cross_entropy"], stack["trl_casting"], stack["adapter_dtype"],
            stack["checkpointing_reentrant"]) == ("eager", True, True, "bf16", False)
    p = cli(*base, "--adapter-dtype", "fp8")
    assert p.returncode == 2 and our_lines(p.stderr) == [
        "kolora-probe estimate: plan error: --adapter-dtype 'fp8' is invalid; expected one of 'fp32', 'bf16', 'fp16'"]


def test_plan_show_names_the_negated_flag(tmp_path):
    p = run_cli("plan", "show", "--plan", str(ROOT / "plans" / "kogpt2-qlora.toml"), "--no-prepare-kbit",
                "--budget-gib", "8")
    assert p.returncode == 0, p.stderr
    assert "prepare_kbit = false  # command line: --no-prepare-kbit" in p.stdout


def test_estimate_bad_input_is_one_line(ko_dir, tmp_path):
    p = cli("--model", str(ko_dir), "--targets", "c_atn")
    assert p.returncode == 2 and "close names: c_attn" in our_lines(p.stderr)[0]
    p = cli("--model", "no-such-org/no-such-model")
    assert p.returncode == 2 and "not found" in our_lines(p.stderr)[0]
    p = cli("--model", str(tmp_path))
    assert p.returncode == 2 and "has no config.json" in our_lines(p.stderr)[0]
    p = cli("--model", str(ko_dir), "--dtype", "fp64")
    assert p.returncode == 2 and "--dtype 'fp64' is invalid" in p.stderr


def test_budget_check_fails_and_names_largest_batch(ko_dir, tmp_path):
    """The real memory check, in a subprocess: a too-small budget fails with the largest batch that fits."""
    run = run_suite("checks/test_memory_budget.py", "--model", str(ko_dir), "--budget-gib", "2.0",
                    reports=tmp_path / "small")
    assert run.returncode == 1, run.output
    c = run.outcome("test_predicted_peak_fits_budget")
    assert c["outcome"] == "failed"
    m = re.search(r"largest batch size that fits: (\d+)", c["message"])
    assert m and 1 <= int(m.group(1)) < 8, c["message"]
    ev = {e["name"]: e for e in c["evidence"]}
    assert ev["predicted_peak_bytes"]["expected"] == int(2.0 * GIB)
    assert ev["predicted_peak_bytes"]["actual"] > 2.0 * GIB
    assert ev["max_batch_size"]["actual"] == int(m.group(1))
    assert "Predicted peak" in run.html and "memory breakdown" in run.html

    run = run_suite("checks/test_memory_budget.py", "--model", str(ko_dir), "--budget-gib", "0.01",
                    reports=tmp_path / "tiny")
    c = run.outcome("test_predicted_peak_fits_budget")
    assert c["outcome"] == "failed" and "largest batch size that fits: 0" in c["message"]

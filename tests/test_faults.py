"""Fault matrix: every bad input or fault fails clearly, in one line, and nothing else breaks.

Each case drives the real suite in a subprocess and asserts: exit code non-zero, the failing check's message
names the cause and the fix, the other checks still ran, and the three reports were written and parse.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from suite_runner import ROOT, SuiteRun, run_suite

CPU_CHECKS = ("checks/test_plan.py", "checks/test_environment.py")


def assert_reports_valid(run: SuiteRun) -> None:
    doc = run.environment                    # parses as JSON
    assert doc["checks"], "environment.json lists no checks"
    run.junit                                # parses as XML
    assert "kolora-probe report" in run.html


def base_plan_text(**lora) -> str:
    lines = ['[model]', 'id = "x/y"', '[lora]', 'r = 4', 'alpha = 8', 'dropout = 0.0',
             'target_modules = ["c_attn"]', '[budget]', 'gpu_memory_gib = 8']
    text = "\n".join(lines) + "\n"
    for k, v in lora.items():
        text = text.replace(f"{k} = ", f"{k} = {v} #", 1)
    return text


# --- case 3: plan files ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, fragment", [
    ("syntax", "[lora\nr = 1\n", "not valid TOML"),
    ("unknown-key", base_plan_text() + "[training]\nlearning_rate = 1\n", "unknown key training.learning_rate"),
    ("wrong-type", base_plan_text(r='"four"'), "lora.r = 'four' is invalid; expected an integer >= 1"),
    ("r-zero", base_plan_text(r="0"), "lora.r = 0 is invalid; expected an integer >= 1"),
    ("negative-batch", base_plan_text() + "[training]\nbatch_size = -2\n",
     "training.batch_size = -2 is invalid; expected an integer >= 1"),
    ("budget-zero", base_plan_text().replace("gpu_memory_gib = 8", "gpu_memory_gib = 0"),
     "budget.gpu_memory_gib = 0 is invalid; expected a number of GiB > 0"),
    ("dtype-bf17", base_plan_text() + '[training]\ndtype = "bf17"\n',
     "training.dtype = 'bf17' is invalid; expected one of 'fp32', 'fp16', 'bf16'"),
])
def test_bad_plan_file(tmp_path, name, text, fragment):
    plan = tmp_path / f"{name}.toml"
    plan.write_text(text)
    run = run_suite(*CPU_CHECKS, f"--plan={plan}", reports=tmp_path / "r")
    assert run.returncode == 1, run.output
    assert fragment in run.output and str(plan) in run.output
    check = run.outcome("test_plan_is_valid")
    assert check["outcome"] == "failed" and fragment in check["message"] and "\n" not in check["message"]
    assert run.outcome("test_torch_build")["outcome"] == "passed"           # the others still ran
    assert run.outcome("test_dependency_graph_consistent")["outcome"] == "passed"
    assert_reports_valid(run)


# --- case 5: bitsandbytes not importable ----------------------------------------------------------
HIDE_BNB = '''
import sys
class _Hide:
    def __init__(self, finder):
        self._finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "bitsandbytes":
            return None
        find = getattr(self._finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self._finder, attr)
sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
'''


def test_bitsandbytes_not_importable_fails_only_its_checks(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_BNB)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    run = run_suite(*CPU_CHECKS, reports=tmp_path / "r", env=env)
    assert run.returncode == 1, run.output
    outcomes = run.outcomes()
    failed = {k for k, v in outcomes.items() if v != "passed"}
    assert failed == {"checks/test_environment.py::test_bitsandbytes_imports",
                      "checks/test_environment.py::test_bitsandbytes_nf4_round_trip_cpu"}, outcomes
    msg = run.outcome("test_bitsandbytes_imports")["message"]
    assert "import bitsandbytes failed" in msg and "QLoRA" in msg
    assert_reports_valid(run)


# --- case 6: NVML missing / no GPU ----------------------------------------------------------------
def test_no_gpu_fails_gpu_checks_and_leaves_cpu_gate_green(tmp_path):
    gpu = run_suite("-m", "gpu", reports=tmp_path / "gpu")
    assert gpu.returncode == 1
    for c in gpu.environment["checks"]:
        assert c["outcome"] == "failed" and "no usable CUDA GPU" in c["message"], c
    assert_reports_valid(gpu)
    cpu = run_suite(*CPU_CHECKS, reports=tmp_path / "cpu")
    assert cpu.returncode == 0, cpu.output
    nvml = cpu.environment["environment"]["nvml"]
    assert nvml["available"] is False and nvml["error"]          # the reason is recorded, not hidden


# --- case 8: Ctrl-C -------------------------------------------------------------------------------
def test_ctrl_c_mid_run_still_writes_valid_partial_reports(tmp_path):
    reports = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                             f"--reports-dir={reports}", *CPU_CHECKS], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = []
    deadline = time.time() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "PASSED" in line:
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "no check passed in time"
    rest, _ = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert proc.returncode == 2, out                  # pytest's "interrupted"
    assert "KeyboardInterrupt" in out
    run = SuiteRun(proc.returncode, out, reports)
    doc = run.environment
    assert doc["interrupted"] is True and doc["exit_status"] == 2
    assert 1 <= len(doc["checks"]) < 20
    run.junit
    assert "kolora-probe report" in run.html


# --- case 10: secrets and HTML injection ----------------------------------------------------------
def test_secrets_are_redacted_and_html_is_escaped(tmp_path):
    token = "hf_" + "Q" * 34
    other = "s3cr3t-value-123"
    evil = tmp_path / token / "<script>alert(1)</script>"
    run = run_suite("checks/test_plan.py", "checks/test_environment.py::test_torch_build", f"--model={evil}",
                    f"--plan={ROOT / 'plans' / 'kogpt2-lora.toml'}",
                    reports=tmp_path / "r", env={"HF_TOKEN": token, "WANDB_API_KEY": other})
    for name in ("report.html", "junit.xml", "environment.json"):
        text = (tmp_path / "r" / name).read_text(encoding="utf-8")
        assert token not in text and other not in text, name
    html = run.html
    assert "<script>alert(1)</script>" not in html
    assert "***REDACTED***" in json.dumps(run.environment)
    assert run.returncode == 0, run.output

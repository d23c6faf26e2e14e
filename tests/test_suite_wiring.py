"""The conftest wiring, exercised by running the real suite in a subprocess."""
from __future__ import annotations

import json

from suite_runner import documented, run_suite

CPU_CHECKS = ("checks/test_plan.py", "checks/test_environment.py")


def test_default_gate_writes_three_reports(cpu_checks_run):
    run = cpu_checks_run                                  # run_suite(*CPU_CHECKS), shared with test_faults
    assert run.returncode == 0, run.output
    doc = run.environment
    assert doc["plan"]["model"]["id"] == "skt/kogpt2-base-v2"
    assert doc["summary"]["failed"] == 0 and doc["summary"]["passed"] >= 10
    assert doc["environment"]["torch"]["version"]
    assert run.junit.tag in ("testsuites", "testsuite")
    props = [p.get("name") for p in run.junit.iter("property")]
    assert "nf4_quantization_error" in props          # measured values attached as JUnit properties
    html = run.html
    assert "kolora-probe report" in html and "Requirement family" in html
    assert "<link " not in html and "src=\"http" not in html  # self-contained


def test_invalid_plan_fails_the_plan_check_and_the_rest_still_runs(tmp_path):
    plan = tmp_path / "bad.toml"
    plan.write_text('[model]\nid = "x/y"\n[lora]\nr = 0\nalpha = 1\ndropout = 0\ntarget_modules = ["a"]\n'
                    'colour = "red"\n[budget]\ngpu_memory_gib = 1\n')
    run = run_suite(*CPU_CHECKS, "--plan", str(plan), reports=tmp_path / "r")
    assert run.returncode == 1
    assert f"PLAN ERROR: {plan}: lora.r = 0 is invalid; expected an integer >= 1" in run.output
    assert f"PLAN ERROR: {plan}: unknown key lora.colour" in run.output
    check = run.outcome("test_plan_is_valid")
    assert check["outcome"] == "failed" and "lora.r = 0" in check["message"]
    assert run.outcome("test_dependency_graph_consistent")["outcome"] == "passed"
    assert run.environment["plan_errors"] and run.environment["plan"] is None


def test_overrides_are_shown_and_stored(tmp_path):
    run = run_suite("checks/test_plan.py", "--r", "4", "--batch-size", "2", "--targets", "c_attn,c_fc",
                    reports=tmp_path)
    assert run.returncode == 0, run.output
    assert "overrides: --targets=['c_attn', 'c_fc'], --r=4, --batch-size=2" in run.output
    doc = run.environment
    assert doc["plan"]["lora"]["r"] == 4 and doc["plan"]["training"]["batch_size"] == 2
    assert doc["overrides"] == {"--targets": ["c_attn", "c_fc"], "--r": 4, "--batch-size": 2}


def test_bad_override_is_one_line(tmp_path):
    run = run_suite("checks/test_plan.py", "--dtype", "bf17", reports=tmp_path)
    assert run.returncode == 1
    assert "PLAN ERROR: --dtype 'bf17' is invalid; expected one of 'fp32', 'fp16', 'bf16'" in run.output


def test_bad_stack_option_is_one_line_and_the_rest_still_runs(tmp_path):
    """The stack options (--attn-implementation, --[no-]prepare-kbit, ...) are validated like every plan option: one
    line naming the option and the allowed values; the environment checks still run, the reports are written."""
    run = run_suite(*CPU_CHECKS, "--attn-implementation", "flash3", "--no-prepare-kbit", reports=tmp_path)
    assert run.returncode == 1
    line = "--attn-implementation 'flash3' is invalid; expected one of 'sdpa', 'eager', 'flash_attention_2'"
    assert f"PLAN ERROR: {line}" in run.output
    assert run.outcome("test_plan_is_valid")["message"] == f"invalid plan: {line}"
    assert run.outcome("test_dependency_graph_consistent")["outcome"] == "passed"
    assert all((tmp_path / n).is_file() for n in ("report.html", "junit.xml", "environment.json"))
    ok = run_suite("checks/test_plan.py", "--no-prepare-kbit", "--attn-implementation", "eager",
                   reports=tmp_path / "ok")
    assert ok.returncode == 0, ok.output
    assert ok.environment["plan"]["training"]["prepare_kbit"] is False
    assert ok.environment["overrides"] == {"--no-prepare-kbit": False, "--attn-implementation": "eager"}


def test_gpu_checks_fail_without_gpu_with_the_reason(gpu_selection_run):
    run = gpu_selection_run                               # run_suite("-m", "gpu"), shared with test_faults
    assert run.returncode == 1, run.output
    gpu = [c for c in run.environment["checks"] if "gpu" in c["markers"]]
    assert len(gpu) >= 5
    assert all(c["outcome"] == "failed" for c in gpu)
    cases = list(run.junit.iter("testcase"))
    assert cases and all(tc.find("failure") is not None and tc.find("error") is None for tc in cases)
    assert all("no usable CUDA GPU" in c["message"] and "CPU-only build" in c["message"] for c in gpu)
    assert " passed" not in run.output.splitlines()[-1] and "skipped" not in run.output.splitlines()[-1]


def test_plain_pytest_deselects_gpu_checks(tmp_path):
    run = run_suite("checks/test_gpu.py", reports=tmp_path)
    assert run.returncode == 5  # nothing selected: the GPU checks need -m gpu
    assert "deselected" in run.output


def test_requirement_pinning_an_uninstalled_version_fails_only_that_check(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("packaging>=1\npytest==0.0.1\nkolora-absent-package\n")
    run = run_suite("checks/test_environment.py", "--requirements", str(req), reports=tmp_path / "r")
    assert run.returncode == 1
    assert run.outcome("test_requirement_installed[packaging]")["outcome"] == "passed"
    pinned = run.outcome("test_requirement_installed[pytest]")
    assert pinned["outcome"] == "failed"
    documented("is required but")
    assert "pytest==0.0.1 is required but pytest" in pinned["message"] and "fix: pip install" in pinned["message"]
    assert run.outcome("test_requirement_installed[kolora-absent-package]")["outcome"] == "failed"
    assert run.outcome("test_torch_build")["outcome"] == "passed"


def test_env_cli_json(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kolora_probe", "env", "--json"], capture_output=True, text=True,
                         timeout=120)
    doc = json.loads(out.stdout)
    assert doc["torch"]["version"] and doc["python_version"]
    assert doc["cuda_unavailable_reason"] is None or "torch" in doc["cuda_unavailable_reason"]
    assert out.returncode == (0 if all(p["satisfied"] for p in doc["requirements"]["packages"]) else 1)

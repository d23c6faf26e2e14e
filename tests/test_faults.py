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

from suite_runner import ROOT, TINY_SEQ, SuiteRun, documented, gate_run, run_suite

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
    documented({"syntax": "not valid TOML", "unknown-key": "unknown key"}.get(name, "is invalid; expected"))
    plan = tmp_path / f"{name}.toml"
    plan.write_text(text)
    others = ("checks/test_environment.py::test_torch_build", "checks/test_environment.py::test_dependency_graph_consistent")
    run = run_suite("checks/test_plan.py", *others, f"--plan={plan}", reports=tmp_path / "r")
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
    documented("import bitsandbytes failed")
    assert "import bitsandbytes failed" in msg and "QLoRA" in msg
    assert_reports_valid(run)


# --- case 6: NVML missing / no GPU ----------------------------------------------------------------
def test_no_gpu_fails_gpu_checks_and_leaves_cpu_gate_green(gpu_selection_run, cpu_checks_run):
    documented("no usable CUDA GPU")
    gpu = gpu_selection_run                               # run_suite("-m", "gpu"), shared with test_suite_wiring
    assert gpu.returncode == 1
    for c in gpu.environment["checks"]:
        assert c["outcome"] == "failed" and "no usable CUDA GPU" in c["message"], c
    assert_reports_valid(gpu)
    cpu = cpu_checks_run                                  # run_suite(*CPU_CHECKS), shared with test_suite_wiring
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


# --- the whole CPU gate on the tiny KoGPT-2-shaped model and its broken variants --------------------
def run_gate(model_dir, reports, *extra: str, env: dict | None = None) -> SuiteRun:
    """The gate on ``model_dir`` (suite_runner.gate_run: shared with the other modules that run the same command;
    ``reports`` is not used, the run has its own folder)."""
    return gate_run(model_dir, *extra, env=env)


@pytest.fixture(scope="module")
def baseline(model_zoo, tmp_path_factory):
    run = run_gate(model_zoo.tiny, tmp_path_factory.mktemp("baseline"))
    assert run.returncode == 0, run.output
    return run


def assert_isolated_failure(run: SuiteRun, baseline: SuiteRun, primary: str, fragment: str,
                            allowed_families: set[str]) -> None:
    """Exit non-zero; ``primary`` failed with ``fragment`` in one line; only ``allowed_families`` failed;
    every check of the clean run still ran; the three reports parse."""
    assert run.returncode == 1, run.output
    check = run.outcome(primary)
    assert check["outcome"] == "failed", check
    documented(fragment)
    assert fragment in check["message"] and "\n" not in check["message"], check["message"]
    assert "fix" in check["message"].lower() or "expected" in check["message"], check["message"]
    failed = [c for c in run.environment["checks"] if c["outcome"] != "passed"]
    assert {c["family"] for c in failed} <= allowed_families, [(c["nodeid"], c["message"]) for c in failed]
    assert set(baseline.outcomes()) <= set(run.outcomes())     # nothing was skipped or lost
    assert run.outcome("test_dependency_graph_consistent")["outcome"] == "passed"
    assert_reports_valid(run)


MODEL_FAMILIES = {"model", "tokenizer", "structure", "lora", "memory", "plan"}


def test_case1_model_id_not_found_offline(baseline, tmp_path):
    run = run_suite("checks", "--model=kolora-test/no-such-model-anywhere", reports=tmp_path,
                    env={"HF_HOME": str(tmp_path / "empty-hf-home")})
    assert_isolated_failure(run, baseline, "test_model.py::test_model_found", "not found; tried local directory",
                            MODEL_FAMILIES)
    msg = run.outcome("test_model.py::test_model_found")["message"]
    assert "HF cache" in msg and "hub: skipped (HF_HUB_OFFLINE is set)" in msg and "--model DIR" in msg
    budget = run.outcome("test_predicted_peak_fits_budget")      # the memory check needs the model's config too
    assert budget["outcome"] == "failed" and budget["message"] == "blocked: model not found — see test_model_found"


def test_case2_truncated_safetensors(model_zoo, baseline, tmp_path):
    run = run_gate(model_zoo.truncated, tmp_path)
    assert_isolated_failure(run, baseline, "test_model.py::test_weights_load", "is truncated",
                            {"model", "tokenizer"})
    assert "model.safetensors is truncated" in run.outcome("test_weights_load")["message"]
    # config-only checks are unaffected by broken weights
    assert run.outcome("test_lora.py::test_trainable_params_as_planned")["outcome"] == "passed"


def test_case2_config_json_missing(model_zoo, baseline, tmp_path):
    import shutil

    broken = tmp_path / "no-config"
    shutil.copytree(model_zoo.tiny, broken)
    (broken / "config.json").unlink()
    run = run_gate(broken, tmp_path / "r")
    assert_isolated_failure(run, baseline, "test_model.py::test_model_found", "has no config.json", MODEL_FAMILIES)


@pytest.mark.parametrize("broken, fragment", [
    ("not-json", "is not valid JSON"),
    ("unknown-model-type", "is not known to transformers"),
    ("not-a-causal-lm", "is not a causal language model"),
])
def test_case2_unusable_config_json(model_zoo, baseline, tmp_path, broken, fragment):
    import shutil

    d = tmp_path / broken
    shutil.copytree(model_zoo.tiny, d)
    cfg = d / "config.json"
    if broken == "not-json":
        cfg.write_text(cfg.read_text()[:40])                   # a cut-off download
    elif broken == "unknown-model-type":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_type": "kolora-future-arch",
                                   "architectures": ["FutureForCausalLM"]}))
    else:
        from transformers import T5Config                      # an encoder-decoder: no causal-LM class

        cfg.unlink()
        T5Config(d_model=64, num_layers=2, num_heads=2, d_ff=128, vocab_size=1600).save_pretrained(d)
    run = run_gate(d, tmp_path / "r")
    assert_isolated_failure(run, baseline, "test_structure.py::test_adaptable_layers_found", fragment,
                            MODEL_FAMILIES)
    msg = run.outcome("test_structure.py::test_adaptable_layers_found")["message"]
    assert str(cfg) in msg or broken == "not-a-causal-lm", msg
    assert fragment in run.outcome("test_model.py::test_weights_load")["message"]
    assert run.outcome("test_tokenizer.py::test_korean_round_trip_lossless")["outcome"] == "passed"


def test_case2_no_tokenizer_files(model_zoo, baseline, tmp_path):
    run = run_gate(model_zoo.no_tokenizer, tmp_path)
    assert_isolated_failure(run, baseline, "test_tokenizer.py::test_tokenizer_class_is_plans", "no tokenizer files in",
                            {"tokenizer", "model"})
    blocked = run.outcome("test_tokenizer.py::test_special_tokens_in_vocab")
    assert blocked["message"] == "blocked: tokenizer could not be loaded — see test_tokenizer_class_is_plans"
    assert run.outcome("test_model.py::test_weights_load")["outcome"] == "passed"


@pytest.mark.parametrize("targets, expected, primary, fragment, families", [
    ("c_atn", None, "test_every_target_matches", "matches no module; close names:", {"lora", "memory"}),
    ("attn.c_proj", 2 * 16 * (64 + 64) + 2 * 16 * (256 + 64), "test_trainable_params_as_planned",
     "!= expected", {"lora"}),
    ("", None, "test_plan_is_valid", "is invalid; expected", MODEL_FAMILIES),
])
def test_case4_bad_target_modules(model_zoo, baseline, tmp_path, targets, expected, primary, fragment, families):
    extra = [f"--targets={targets}"] + ([f"--expected-trainable={expected}"] if expected else [])
    run = run_suite("checks", f"--model={model_zoo.tiny}", TINY_SEQ, *extra, reports=tmp_path)
    assert_isolated_failure(run, baseline, primary, fragment, families)
    message = run.outcome(primary)["message"]
    if targets == "c_atn":
        assert "target 'c_atn' matches no module; close names: c_attn" in message
    if targets == "attn.c_proj":
        assert "note: target 'attn.c_proj' matches 2 of 4 layers named 'c_proj'" in message
    if targets == "":
        assert "--targets [] is invalid; expected a non-empty list" in message


def test_case9_malicious_pickle_never_executed(model_zoo, baseline, tmp_path):
    run = run_gate(model_zoo.pickle_bin, tmp_path)
    assert_isolated_failure(run, baseline, "test_model.py::test_weights_load", "refused: it is not a plain weights pickle", {"model", "tokenizer"})
    assert not model_zoo.pickle_marker.exists()


def test_case9_remote_code_refused(model_zoo, baseline, tmp_path):
    run = run_gate(model_zoo.remote_code, tmp_path)
    assert_isolated_failure(run, baseline, "test_model.py::test_weights_load", "trust_remote_code", MODEL_FAMILIES)
    assert not model_zoo.remote_code_marker.exists()


def test_case2_tokenizer_class_that_mangles_hangul(model_zoo, baseline, tmp_path):
    run = run_gate(model_zoo.tiny, tmp_path, "--tokenizer-class=AutoTokenizer")
    assert_isolated_failure(run, baseline, "test_tokenizer.py::test_korean_hangul_preserved", "loses Hangul",
                            {"tokenizer", "model"})
    assert 'tokenizer_class = "PreTrainedTokenizerFast"' in run.outcome("test_korean_hangul_preserved")["message"]


# --- case 7: the plan does not fit (the measured-step OOM itself needs CUDA: tests/test_memory_budget.py
# simulates it with a raised torch.cuda.OutOfMemoryError and checks it is caught, reported and released) ------
def test_case7_budget_too_small_names_the_batch_that_fits(model_zoo, baseline, tmp_path):
    run = run_gate(model_zoo.tiny, tmp_path, "--budget-gib=0.28")   # ~0.27 GiB of it is the CUDA context
    assert_isolated_failure(run, baseline, "test_memory_budget.py::test_predicted_peak_fits_budget",
                            "does NOT fit; largest batch size that fits:", {"memory"})
    msg = run.outcome("test_predicted_peak_fits_budget")["message"]
    import re

    fits = int(re.search(r"largest batch size that fits: (\d+)", msg).group(1))
    assert 1 <= fits < 8 and f"fix: set [training].batch_size = {fits}" in msg
    documented("ran out of GPU memory")

"""The gate as users run it outside this repo's conventions: the space form of path options, a user's own pytest
suite with kolora-probe installed, `kolora-probe check` from any directory, and what the wheel ships."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config

    d = tmp_path_factory.mktemp("elsewhere") / "tiny-gpt2"
    GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=128,
               bos_token_id=0, eos_token_id=0).save_pretrained(d)
    return d


def test_space_form_model_option_from_repo_root(config_dir, tmp_path):
    """`pytest --model /abs/dir` (what people type) used to fail: pytest took /abs/dir for a test path."""
    out = tmp_path / "reports"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--model", str(config_dir),
                           "--reports-dir", str(out), "-k", "test_plan_is_valid"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((out / "environment.json").read_text(encoding="utf-8"))
    assert doc["plan"]["model"]["id"] == str(config_dir)


def test_users_own_model_option_still_works(tmp_path):
    """Installing kolora-probe adds no option to a project's own pytest run (its --model / --r stay its own)."""
    (tmp_path / "conftest.py").write_text(
        "def pytest_addoption(parser):\n    parser.addoption('--model', default='mine')\n"
        "    parser.addoption('--r', default='1')\n", encoding="utf-8")
    (tmp_path / "test_own.py").write_text(
        "def test_own(pytestconfig):\n    assert pytestconfig.getoption('model') == 'theirs'\n"
        "    assert pytestconfig.getoption('r') == '3'\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--model", "theirs",
                           "--r", "3"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
    assert not (tmp_path / "reports").exists()


def test_an_ini_named_with_c_wins_over_the_invocation_dirs(tmp_path):
    """From a directory whose pytest.ini loads the gate, `pytest -c other.ini` runs other.ini's tests only: the
    entry point must not put the project's ini (and the gate's plugin) back."""
    (tmp_path / "other.ini").write_text("[pytest]\naddopts = -q\n", encoding="utf-8")
    (tmp_path / "test_mine.py").write_text(
        "def test_mine(pytestconfig):\n    assert not pytestconfig.pluginmanager.has_plugin("
        "'kolora_probe_checks.plugin')\n", encoding="utf-8")
    for form in (["-c", str(tmp_path / "other.ini")], [f"--config-file={tmp_path / 'other.ini'}"]):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *form,
                               str(tmp_path / "test_mine.py")],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "1 passed" in proc.stdout and "kolora-probe reports" not in proc.stdout


def test_check_command_runs_the_gate_anywhere(config_dir, tmp_path):
    """`kolora-probe check` from a directory outside the repo: pytest's exit code, reports in ./reports."""
    proc = subprocess.run([sys.executable, "-m", "kolora_probe", "check", "--model", str(config_dir),
                           "--seq-len", "64", "-k", "test_plan_is_valid or test_every_target_matches"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    doc = json.loads((tmp_path / "reports" / "gate" / "environment.json").read_text(encoding="utf-8"))
    outcomes = {c["nodeid"].split("::")[-1]: c["outcome"] for c in doc["checks"]}
    assert outcomes.get("test_plan_is_valid") == "passed", proc.stdout[-2000:]
    # the default plan targets lm_head, which GPT-2 has: the check ran on this model, from this directory
    assert doc["plan"]["model"]["id"] == str(config_dir)
    assert proc.returncode == (0 if all(o == "passed" for o in outcomes.values()) else 1)
    bad = subprocess.run([sys.executable, "-m", "kolora_probe", "check", "--r", "0", "-k", "test_plan_is_valid"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    doc = json.loads((tmp_path / "reports" / "gate" / "environment.json").read_text(encoding="utf-8"))
    assert "--r 0 is invalid" in doc["checks"][0]["message"]


def test_pyargs_form_writes_the_reports(config_dir, tmp_path):
    """The README's other way to run the shipped checks from a project's own pytest set-up."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "kolora_probe_checks.plugin", "-p", "no:cacheprovider",
                           "--pyargs", "kolora_probe_checks", "--model", str(config_dir), "--seq-len", "64",
                           "-k", "test_plan_is_valid"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "reports" / "gate" / "environment.json").read_text(encoding="utf-8"))
    assert doc["plan"]["model"]["id"] == str(config_dir)


def test_declared_dependencies_match_requirements():
    """The wheel's dependencies are requirements.txt's (torch as a range there, pinned in requirements.txt)."""
    declared = {Requirement(r).name.lower(): Requirement(r) for r in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    listed = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            listed[Requirement(line).name.lower()] = Requirement(line)
    assert set(declared) == set(listed)
    for name, req in listed.items():
        if name != "torch":
            assert str(req.specifier) == str(declared[name].specifier), name
    assert declared["torch"].specifier.contains("2.13.0")


def test_wheel_ships_the_checks_plugin_and_plans(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                           "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("kolora_probe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for check in (ROOT / "checks").glob("*.py"):
        assert f"kolora_probe_checks/{check.name}" in names
    for plan in (ROOT / "plans").glob("*.toml"):
        assert f"kolora_probe/data/plans/{plan.name}" in names
    for module in (ROOT / "kolora_probe").rglob("*.py"):
        assert str(module.relative_to(ROOT)) in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "[pytest11]" in text and "kolora_probe_checks.bootstrap" in text

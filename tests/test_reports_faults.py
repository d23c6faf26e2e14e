"""Fault matrix for the reports: one-line failures, root causes, secrets through escaping, interrupted runs,
unusable reports folders / plan / requirements files, one folder per selection, the summary people read.

Each subprocess run of the suite is shared by several assertions (module-scoped fixtures) on the tiny model zoo.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from suite_runner import ROOT, TINY_SEQ, SuiteRun, documented, run_suite

TINY_LM_HEAD_R16 = 16 * (64 + 1600)  # LoRA r=16 on lm_head of the tiny model (n_embd 64, vocab 1600)
MASK = "***REDACTED***"


def _all_reports(run: SuiteRun) -> dict[str, str]:
    return {name: (run.reports / name).read_text(encoding="utf-8")
            for name in ("report.html", "junit.xml", "environment.json")}


# --- a failing budget check on the tiny model: one line, readable reports --------------------------------------
@pytest.fixture(scope="module")
def budget_run(model_zoo, tmp_path_factory) -> SuiteRun:
    return run_suite("checks", f"--model={model_zoo.tiny}", f"--expected-trainable={TINY_LM_HEAD_R16}",
                     "--budget-gib=0.03", TINY_SEQ, reports=tmp_path_factory.mktemp("budget"))


def test_failing_budget_check_is_one_line_without_assertion_rewriting(budget_run):
    run = budget_run
    assert run.returncode == 1, run.output
    msg = run.outcome("test_predicted_peak_fits_budget")["message"]
    assert "does NOT fit" in msg and "fix:" in msg
    section = run.output.split(" test_predicted_peak_fits_budget ", 1)[1].splitlines()[1:]
    body = []
    for ln in section:
        if ln.startswith(("_", "=")):
            break
        body.append(ln)
    assert body == [msg], section[:20]             # the message alone: no source echo, no "assert False"/"where"
    assert "AssertionError" not in run.output and "+  where" not in run.output
    case = next(tc for tc in run.junit.iter("testcase") if tc.get("name") == "test_predicted_peak_fits_budget")
    assert case.find("failure").get("message") == msg


def test_junit_properties_are_plain_values(budget_run):
    props = {p.get("name"): p.get("value") for p in budget_run.junit.iter("property")}
    assert re.fullmatch(r"\d+", props["predicted_peak_bytes"]), props["predicted_peak_bytes"]
    assert props["predicted_peak_bytes.unit"] == "bytes"
    assert re.fullmatch(r"\d+", props["trainable_params"]) and props["trainable_params.expected"] == str(
        TINY_LM_HEAD_R16)
    assert not any(v.startswith('{"actual"') for v in props.values())
    assert props["kolora_verdict"].startswith("NOT READY")


def test_html_summary_shows_memory_lora_and_failures_without_a_click(budget_run):
    html = budget_run.html
    summary = html.split("kp-summary", 1)[1].split("data-container", 1)[0]
    for shown in ("Largest batch size that fits", "Largest sequence length that fits", "Predicted peak",
                  "Trainable parameters", "LoRA findings", "Failures by root cause", "class='kp-chart'",
                  f"{TINY_LM_HEAD_R16:,}", " MiB ("):
        assert shown in summary, shown
    assert "No log output captured." not in html
    blob = json.loads(__import__("html").unescape(html.split('data-jsonblob="', 1)[1].split('"', 1)[0]))
    assert blob["renderCollapsed"] == ["none"]      # passed rows are expanded: evidence shows without a click
    rows = json.dumps(blob["tests"])
    assert "&quot;&quot;" not in rows               # no "" where nothing is expected
    assert re.search(r"MiB \([\d,]+ bytes\)", rows), "no human unit beside a byte count in the evidence rows"


def test_user_tb_still_shows_the_traceback(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("pytest==0.0.1\n")
    args = ("checks/test_environment.py", "-k", "requirement_installed", f"--requirements={req}")
    short = run_suite(*args, reports=tmp_path / "a")
    full = run_suite(*args, "--tb=short", reports=tmp_path / "b")
    assert short.returncode == full.returncode == 1
    assert "assert False" not in short.output and "AssertionError" not in short.output
    assert "assert False" in full.output or "AssertionError" in full.output, full.output


# --- the model cannot be found: one root cause; secrets in odd characters never leak -------------------------
SECRET_ODD = 'Zq&x<w>"Zq9x'               # & < > " — the escaped forms must not survive either
SECRET_KOREAN = "비밀쿡쿡쿡쿡"
URL_PASSWORD = "pw7777zz"


@pytest.fixture(scope="module")
def missing_model_run(tmp_path_factory) -> SuiteRun:
    tmp = tmp_path_factory.mktemp("missing")
    model = f"/nope/{SECRET_ODD}/{SECRET_KOREAN}/https://ci:{URL_PASSWORD}@git.example/r"
    env = {"MY_PASSWORD": SECRET_ODD, "KOREAN_SECRET": SECRET_KOREAN, "HF_HOME": str(tmp / "hf"),
           "JENKINS_URL": "https://jenkins.example/", "GIT_URL": f"https://ci:{URL_PASSWORD}@git.example/r.git"}
    return run_suite("checks", f"--model={model}", reports=tmp / "r", env=env)


def test_missing_model_is_one_root_cause(missing_model_run):
    run = missing_model_run
    assert run.returncode == 1, run.output
    doc = run.environment
    failed = [c for c in doc["checks"] if c["outcome"] == "failed"]
    owner = run.outcome("test_model.py::test_model_found")
    assert owner["outcome"] == "failed" and "not found" in owner["message"] and "blocked" not in owner["message"]
    blocked = [c for c in failed if c is not owner and c["nodeid"] != owner["nodeid"]]
    assert len(blocked) >= 10
    documented("blocked:")
    assert all(c["message"] == "blocked: model not found — see test_model_found" for c in blocked), blocked
    assert all(c["blocked_by"] == "test_model_found" for c in blocked)
    groups = doc["root_causes"]
    assert len(groups) == 1 and groups[0]["check"] == owner["nodeid"] and len(groups[0]["blocked"]) == len(blocked)
    assert "Failures by root cause" in run.html and f"{len(blocked)} checks: " in run.html
    # the long explanation is printed once among the failures (pytest's -ra short summary repeats each failure's
    # line after them, cut to the terminal width except where CI is set)
    failures = run.output.split("short test summary info", 1)[0]
    assert failures.count("fix --model or [model].id") == 1


def test_secrets_with_odd_characters_are_redacted_everywhere(missing_model_run):
    run = missing_model_run
    texts = {**_all_reports(run), "stdout": run.output}
    korean_escaped = json.dumps(SECRET_KOREAN)[1:-1]
    for name, text in texts.items():
        assert "Zq" not in text, (name, text[text.find("Zq") - 80:text.find("Zq") + 80])
        assert "쿡" not in text and korean_escaped not in text and korean_escaped.lower() not in text, name
        assert URL_PASSWORD not in text, name
    assert MASK in texts["report.html"] and MASK in texts["junit.xml"] and MASK in texts["stdout"]
    assert "git.example" in texts["report.html"]             # the host stays readable; only the credential goes


# --- interrupted runs say INCOMPLETE; an older verdict is never left behind -------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_says_incomplete_in_all_three_reports(tmp_path, sig):
    reports = tmp_path / "r"
    reports.mkdir()
    for name in ("report.html", "junit.xml", "environment.json"):
        (reports / name).write_text("READY: stale verdict of an older run")
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                             f"--reports-dir={reports}", "checks/test_plan.py", "checks/test_environment.py"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines, deadline = [], time.time() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "PASSED" in line:
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "no check passed in time"
    rest, _ = proc.communicate(timeout=300)
    run = SuiteRun(proc.returncode, "".join(lines) + rest, reports)
    assert run.returncode == 2, run.output
    texts = _all_reports(run)
    assert all("stale" not in t for t in texts.values())
    doc = run.environment
    assert doc["interrupted"] is True and doc["verdict"]["status"] == "INCOMPLETE"
    assert ("SIGTERM" if sig == signal.SIGTERM else "SIGINT") in doc["verdict"]["text"]
    props = {p.get("name"): p.get("value") for p in run.junit.iter("property")}
    assert props["kolora_verdict"].startswith("INCOMPLETE")
    assert "INCOMPLETE: the run was interrupted" in run.html and "READY: every" not in run.html
    assert not list(reports.glob("*.part"))


# --- unusable reports folder, plan file, requirements file: one line naming the path, the rest still runs ------
@pytest.mark.parametrize("kind", ["file", "below-a-file"])
def test_reports_dir_unusable_is_one_line(tmp_path, kind):
    blocker = tmp_path / "reports-is-a-file"
    blocker.write_text("not a folder")
    target = blocker if kind == "file" else blocker / "sub"
    run = run_suite("checks/test_plan.py", reports=target)
    assert run.returncode == 1, run.output
    assert "INTERNALERROR" not in run.output and "Traceback" not in run.output
    documented("is not usable")
    assert f"REPORTS ERROR: reports directory {target} is not usable" in run.output
    assert "fix: pass --reports-dir=DIR" in run.output
    assert "2 passed" in run.output                             # the checks still ran


@pytest.mark.parametrize("plan", ["/proc/self/mem", "long"])
def test_unreadable_plan_file_is_one_line(tmp_path, plan):
    if plan == "long":
        plan = "/tmp/" + "p" * 5000 + ".toml"
    run = run_suite("checks/test_plan.py", "checks/test_environment.py::test_torch_build", f"--plan={plan}",
                    reports=tmp_path / "r")
    assert run.returncode == 1, run.output
    assert "INTERNALERROR" not in run.output
    check = run.outcome("test_plan_is_valid")
    documented("cannot read the plan file")
    assert check["outcome"] == "failed" and "cannot read the plan file" in check["message"]
    assert plan[:40] in check["message"] and len(check["message"]) < 400
    assert run.outcome("test_torch_build")["outcome"] == "passed"


def test_load_plan_refuses_unreadable_paths_in_one_line(tmp_path):
    from kolora_probe.plan.schema import PlanError, load_plan

    for path in ("/proc/self/mem", "/tmp/" + "q" * 5000):
        with pytest.raises(PlanError) as err:
            load_plan(path)
        assert len(err.value.lines) == 1 and "cannot read the plan file" in err.value.lines[0]


def test_requirements_file_not_text_is_one_failed_check(tmp_path):
    binary = tmp_path / "requirements.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    run = run_suite("checks/test_environment.py", "-k", "requirement_installed or torch_build",
                    f"--requirements={binary}", reports=tmp_path / "r")
    assert run.returncode == 1, run.output
    check = run.outcome("test_requirement_installed[requirements-file]")
    assert check["outcome"] == "failed" and str(binary) in check["message"]
    documented("cannot read the requirements file")
    assert "cannot read the requirements file" in check["message"] and "\n" not in check["message"]
    assert run.outcome("test_torch_build")["outcome"] == "passed"


# --- one folder per selection, plus reports/latest ------------------------------------------------------------
def test_each_selection_has_its_own_reports_folder_and_latest_points_at_the_last():
    reports = ROOT / "reports"
    cpu = run_suite("checks/test_plan.py", "-m", "cpu", reports=Path("unused"), no_reports_dir=True)
    assert cpu.returncode == 0, cpu.output
    other = run_suite("checks/test_plan.py", "-m", "not gpu", reports=Path("unused"), no_reports_dir=True)
    assert other.returncode == 0, other.output
    first = json.loads((reports / "cpu" / "environment.json").read_text(encoding="utf-8"))
    second = json.loads((reports / "not-gpu" / "environment.json").read_text(encoding="utf-8"))
    assert first["selection"] == "cpu" and second["selection"] == "not gpu"
    assert (reports / "cpu" / "report.html").is_file() and (reports / "not-gpu" / "junit.xml").is_file()
    assert (reports / "latest").resolve() == (reports / "not-gpu").resolve()


# --- library pieces -------------------------------------------------------------------------------------------
def test_failure_line_drops_assertion_rewriting():
    from kolora_probe_checks.failures import failure_line

    assert failure_line(AssertionError("budget exceeded; fix: lower batch\nassert False\n +  where False = x")) == \
        "budget exceeded; fix: lower batch"
    assert failure_line(AssertionError("assert 8704 == 831488\n +  where 8704 = LoraCount(...)")) == \
        "assert 8704 == 831488"
    assert failure_line(TypeError("bad")).startswith("TypeError: bad")
    assert failure_line(pytest.fail.Exception("two\nlines", pytrace=False)) == "two lines"


def test_root_causes_group_blocked_checks_under_their_owner():
    from kolora_probe.report.run_document import root_causes, verdict

    checks = [{"nodeid": "m.py::test_model_found", "outcome": "failed", "message": "model not found: …"},
              {"nodeid": "m.py::test_weights_load", "outcome": "failed", "message": "blocked",
               "blocked_by": "test_model_found"},
              {"nodeid": "t.py::test_x", "outcome": "failed", "message": "blocked", "blocked_by": "test_absent"},
              {"nodeid": "p.py::test_ok", "outcome": "passed", "message": ""}]
    groups = root_causes(checks)
    assert [(g["check"], g["blocked"]) for g in groups] == [
        ("m.py::test_model_found", ["m.py::test_weights_load"]), ("test_absent (not run)", ["t.py::test_x"])]
    gpu = [{"nodeid": f"g.py::test_{i}", "outcome": "failed", "message": "no usable CUDA GPU: …"} for i in range(3)]
    (only,) = root_causes(gpu)
    assert only["check"] == "g.py::test_0" and only["same_cause"] == ["g.py::test_1", "g.py::test_2"]
    assert verdict(checks=checks, plan_errors=[], interrupted=True)["status"] == "INCOMPLETE"
    assert verdict(checks=checks[3:], plan_errors=[], interrupted=False)["status"] == "READY"


def test_human_units_beside_raw_numbers():
    from kolora_probe.report.summary import human

    assert human(3 * 2**30, "bytes") == f"3.00 GiB ({3 * 2**30:,} bytes)"
    assert human(1234567) == "1,234,567" and human(None) == "—" and human("") == "—"


def test_a_plan_with_200k_targets_keeps_the_reports_small(tmp_path):
    """A plan listing 200,000 target modules (a generated config gone wrong): the plan check fails with one short
    line, and environment.json / report.html carry the first 1,000 targets and say how many were left out, instead
    of megabytes of names."""
    from kolora_probe.plan.schema import DEFAULT_PLAN_PATH

    text = DEFAULT_PLAN_PATH.read_text(encoding="utf-8")
    targets = ", ".join(f'"layer{i}.proj"' for i in range(200_000))
    plan = tmp_path / "huge.toml"
    plan.write_text(re.sub(r"target_modules\s*=\s*\[[^\]]*\]", f"target_modules = [{targets}]", text),
                    encoding="utf-8")
    assert plan.stat().st_size > 3_000_000
    run = run_suite("checks/test_plan.py", "checks/test_lora.py", f"--plan={plan}", reports=tmp_path / "reports")
    doc = json.loads((run.reports / "environment.json").read_text(encoding="utf-8"))
    shown = doc["plan"]["lora"]["target_modules"]
    assert len(shown) == 1001 and shown[0] == "layer0.proj"
    assert shown[-1] == "… 199,000 more of 200,000 items not shown"
    assert (run.reports / "environment.json").stat().st_size < 300_000
    html_text = (run.reports / "report.html").read_text(encoding="utf-8")
    assert len(html_text) < 1_500_000 and "and 199,980 more" in html_text

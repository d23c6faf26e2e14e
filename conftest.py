"""kolora-probe's pytest wiring: options → plan → fixtures, marker semantics and the three reports.

* ``--plan`` and the plan-field overrides (``--model``, ``--r``, ``--batch-size`` …) build the effective plan
  once; an invalid plan is reported as one line per problem in the header and by ``test_plan_is_valid``, and
  every check that needs the plan fails with that reason while the others still run.
* Plain ``pytest`` runs the CPU gate: ``gpu`` and ``benchmark`` checks are deselected unless ``-m`` is given.
* Every run of ``checks/`` writes ``reports/report.html`` (self-contained), ``reports/junit.xml`` (evidence as
  properties) and ``reports/environment.json``, also when checks fail or the run is interrupted.
* Check-specific fixtures live in ``checks/fixtures_*.py`` plugins listed in ``pytest_plugins``.
"""
from __future__ import annotations

import base64
import html
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from checks.failures import fail_check, is_check_failure
from kolora_probe import __version__
from kolora_probe.plan import Plan, PlanError
from kolora_probe.plan_options import add_plan_options, overrides_from, plan_from_options
from kolora_probe.redact import redact, redact_text, secret_values

pytest_plugins = [
    "checks.fixtures_environment",
    "checks.fixtures_model",
    "checks.fixtures_memory",
    "checks.fixtures_monitor",
    "checks.fixtures_structure",
    "checks.fixtures_distributed",
]

ROOT = Path(__file__).resolve().parent
PLAN_KEY = pytest.StashKey[Plan]()
PLAN_ERROR_KEY = pytest.StashKey[list]()
ACTIVE_KEY = pytest.StashKey[bool]()
RESULTS_KEY = pytest.StashKey[dict]()
EVIDENCE_KEY = pytest.StashKey[list]()
EXTRAS_KEY = pytest.StashKey[list]()
STARTED_KEY = pytest.StashKey[float]()
CUDA_REASON_KEY = pytest.StashKey[object]()
FAMILY_OF = {  # check module → requirement family shown in the summary
    "test_plan": "plan", "test_environment": "environment", "test_gpu": "gpu",
    "test_model": "model", "test_tokenizer": "tokenizer", "test_structure": "structure", "test_lora": "lora",
    "test_memory_budget": "memory", "test_benchmarks": "benchmarks", "test_monitor": "monitor",
    "test_distributed": "distributed",
}


# --- options & configuration ------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kolora-probe", "kolora-probe training plan")
    add_plan_options(group.addoption)
    group.addoption("--reports-dir", dest="reports_dir", default=None,
                    help="where report.html, junit.xml and environment.json are written (default: reports/)")
    group.addoption("--requirements", dest="requirements_file", default=None,
                    help="requirements file whose packages the environment checks verify (default: requirements.txt)")


def _suite_active(config: pytest.Config) -> bool:
    """True when this run collects kolora-probe checks (not only the project's own tests/)."""
    checks_dir = ROOT / "checks"
    for arg in config.args or ["checks"]:
        p = Path(str(arg).split("::")[0])
        p = (Path(config.invocation_params.dir) / p).resolve() if not p.is_absolute() else p.resolve()
        if p == checks_dir or checks_dir in p.parents or p in checks_dir.parents:
            return True
    return False


def reports_dir(config: pytest.Config) -> Path:
    d = config.getoption("reports_dir")
    return Path(d).resolve() if d else ROOT / "reports"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # under torchrun / accelerate launch only rank 0 writes the reports
    config.stash[ACTIVE_KEY] = active = _suite_active(config) and os.environ.get("RANK", "0") == "0"
    config.stash[RESULTS_KEY] = {}
    config.stash[STARTED_KEY] = time.time()
    try:
        config.stash[PLAN_KEY] = plan_from_options(config.getoption("plan_path"), config.getoption)
        config.stash[PLAN_ERROR_KEY] = []
    except PlanError as exc:
        config.stash[PLAN_ERROR_KEY] = exc.lines
    if not active:
        return
    out = reports_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    if not config.getoption("htmlpath", None):
        config.option.htmlpath = str(out / "report.html")
    config.option.self_contained_html = True
    if not config.option.xmlpath:
        config.option.xmlpath = str(out / "junit.xml")


def _plan_metadata(config: pytest.Config) -> dict[str, str]:
    errors = config.stash[PLAN_ERROR_KEY]
    if errors:
        return {"Plan": "INVALID: " + " | ".join(errors)}
    plan = config.stash[PLAN_KEY]
    t = plan.training
    return {
        "Plan": plan.source,
        "Model": f"{plan.model.id} @ {plan.model.revision}",
        "LoRA": f"r={plan.lora.r} alpha={plan.lora.alpha:g} dropout={plan.lora.dropout:g} "
                f"targets={list(plan.lora.target_modules)}",
        "Training": f"dtype={t.dtype} weights={t.weights_dtype} quantization={t.quantization} batch={t.batch_size} "
                    f"seq={t.seq_len} grad_ckpt={t.gradient_checkpointing} optimizer={t.optimizer}",
        "Budget": f"{plan.budget.gpu_memory_gib:g} GiB (tolerance {plan.budget.tolerance_percent:g} %)",
    }


@pytest.hookimpl(optionalhook=True)
def pytest_metadata(metadata: dict, config: pytest.Config) -> None:
    """The plan goes into the HTML report's Environment table (pytest-metadata)."""
    if config.stash.get(ACTIVE_KEY, False):
        metadata.update(redact(_plan_metadata(config)))


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"kolora-probe {__version__}"]
    errors = config.stash.get(PLAN_ERROR_KEY, [])
    if errors:
        lines += [f"PLAN ERROR: {e}" for e in errors]
        return lines
    lines += [f"{k.lower()}: {v}" for k, v in _plan_metadata(config).items()]
    values, names = overrides_from(config.getoption)
    if values:
        lines.append("overrides: " + ", ".join(f"{names[k]}={v!r}" for k, v in values.items()))
    return [redact_text(line) for line in lines]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without ``-m``, run the CPU gate only: deselect gpu, benchmark and distributed checks."""
    if config.getoption("markexpr"):
        return
    keep, drop = [], []
    for item in items:
        (drop if any(item.get_closest_marker(m) for m in ("gpu", "benchmark", "distributed")) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# --- fixtures shared by every check -----------------------------------------------------------------
@pytest.fixture(scope="session")
def plan_errors(pytestconfig: pytest.Config) -> list[str]:
    return list(pytestconfig.stash[PLAN_ERROR_KEY])


@pytest.fixture(scope="session")
def plan(pytestconfig: pytest.Config) -> Plan:
    """The effective training plan (file + command-line overrides). Fails dependent checks if invalid."""
    errors = pytestconfig.stash[PLAN_ERROR_KEY]
    if errors:
        fail_check("plan is invalid, so this check cannot run: " + " | ".join(errors))
    return pytestconfig.stash[PLAN_KEY]


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


class Evidence:
    """What a check measured, attached to all three reports.

    ``evidence("trainable_params", actual=831488, expected=831488)`` adds a JUnit property, a row in the
    HTML report and an entry in environment.json. ``html``/``image``/``text`` add HTML-report extras.
    """

    def __init__(self, item: pytest.Item):
        self._item = item
        item.stash[EVIDENCE_KEY] = []
        item.stash[EXTRAS_KEY] = []

    def __call__(self, name: str, actual: Any, expected: Any = None, unit: str | None = None,
                 note: str | None = None) -> None:
        row = {"name": name, "actual": _jsonable(actual)}
        if expected is not None:
            row["expected"] = _jsonable(expected)
        if unit:
            row["unit"] = unit
        if note:
            row["note"] = note
        self._item.stash[EVIDENCE_KEY].append(row)
        self._item.user_properties.append((name, json.dumps({k: v for k, v in row.items() if k != "name"},
                                                            ensure_ascii=False, default=str)))

    def html(self, title: str, content: str) -> None:
        self._item.stash[EXTRAS_KEY].append(("html", title, content))

    def text(self, title: str, content: str) -> None:
        self._item.stash[EXTRAS_KEY].append(("text", title, content))

    def image(self, title: str, png: bytes) -> None:
        self._item.stash[EXTRAS_KEY].append(("png", title, base64.b64encode(png).decode("ascii")))


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


@pytest.fixture
def evidence(request: pytest.FixtureRequest) -> Evidence:
    return Evidence(request.node)


def _cuda_reason(config: pytest.Config) -> str | None:
    if CUDA_REASON_KEY not in config.stash:
        from kolora_probe.environment import cuda_unavailable_reason

        config.stash[CUDA_REASON_KEY] = cuda_unavailable_reason()
    return config.stash[CUDA_REASON_KEY]  # type: ignore[return-value]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A ``gpu`` check on a machine without a usable CUDA GPU fails before its fixtures run, with the reason."""
    if item.get_closest_marker("gpu") is None:
        return
    reason = _cuda_reason(item.config)
    if reason:
        fail_check(f"no usable CUDA GPU: {reason}")


@pytest.fixture(scope="session")
def cuda_device(pytestconfig: pytest.Config):
    """The CUDA device for ``gpu`` checks. Without a usable one the check FAILS with the reason (never skips)."""
    reason = _cuda_reason(pytestconfig)
    if reason:
        fail_check(f"no usable CUDA GPU: {reason}")
    import torch

    return torch.device("cuda", 0)


# --- report hooks -----------------------------------------------------------------------------------
def _evidence_table(rows: list[dict]) -> str:
    cells = "".join(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            html.escape(r["name"]), html.escape(json.dumps(r.get("expected", ""), ensure_ascii=False, default=str)),
            html.escape(json.dumps(r["actual"], ensure_ascii=False, default=str)), html.escape(r.get("unit", "")))
        for r in rows)
    return ("<table class='kp-evidence'><tr><th>measured</th><th>expected</th><th>actual</th><th>unit</th></tr>"
            f"{cells}</table>")


def _one_line(report: pytest.TestReport) -> str:
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    msg = crash.message if crash is not None else str(report.longrepr or "")
    if isinstance(report.longrepr, tuple):  # skipped: (path, lineno, reason)
        msg = str(report.longrepr[2])
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    return first.removeprefix("Failed: ").removeprefix("AssertionError: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.when == "setup" and report.failed and is_check_failure(call.excinfo.value if call.excinfo else None):
        report.when = "call"  # a missing GPU / model is the check's failure, not an error in the test's set-up
    _record(item, report)
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    try:
        from pytest_html import extras as html_extras
    except ImportError:
        return
    extras = list(getattr(report, "extras", []))
    rows = item.stash.get(EVIDENCE_KEY, [])
    if rows:
        extras.append(html_extras.html(redact_text(_evidence_table(rows))))
    for kind, title, content in item.stash.get(EXTRAS_KEY, []):
        if kind == "html":
            extras.append(html_extras.html(f"<h4>{html.escape(title)}</h4>" + redact_text(content)))
        elif kind == "text":
            extras.append(html_extras.text(redact_text(content), name=title))
        else:
            extras.append(html_extras.png(content, name=title))
    report.extras = extras


def _record(item: pytest.Item, report: pytest.TestReport) -> None:
    """Fold each phase's report into the per-check entry written to environment.json."""
    results = item.config.stash[RESULTS_KEY]
    stem = Path(str(item.path)).stem
    entry = results.setdefault(item.nodeid, {
        "nodeid": item.nodeid, "family": FAMILY_OF.get(stem, stem),
        "markers": sorted({m.name for m in item.iter_markers()} & {"gpu", "cpu", "slow", "benchmark", "distributed"}),
        "outcome": "passed", "duration_s": 0.0, "message": "", "evidence": []})
    entry["duration_s"] = round(entry["duration_s"] + report.duration, 4)
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        entry["message"] = entry["message"] or _one_line(report)
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        entry["message"] = _one_line(report)
    entry["evidence"] = item.stash.get(EVIDENCE_KEY, [])


def pytest_html_report_title(report) -> None:
    report.title = "kolora-probe report"


def pytest_html_results_summary(prefix: list, summary: list, postfix: list, session: pytest.Session) -> None:
    from kolora_probe.report_summary import summary_html

    config = session.config
    prefix.append(redact_text(summary_html(_run_document(config, exitstatus=None))))


def _run_document(config: pytest.Config, exitstatus: int | None) -> dict[str, Any]:
    from kolora_probe.run_report import build_run_document

    plan = config.stash.get(PLAN_KEY, None)
    values, names = overrides_from(config.getoption)
    return build_run_document(
        plan=plan, plan_errors=config.stash.get(PLAN_ERROR_KEY, []),
        overrides={names[k]: v for k, v in values.items()},
        checks=list(config.stash.get(RESULTS_KEY, {}).values()),
        exitstatus=exitstatus, started=config.stash.get(STARTED_KEY, time.time()),
        markexpr=config.getoption("markexpr") or "(default: not gpu and not benchmark and not distributed)")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if not config.stash.get(ACTIVE_KEY, False):
        return
    out = reports_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    doc = redact(_run_document(config, int(exitstatus)))
    tmp = out / "environment.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    tmp.replace(out / "environment.json")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Last pass over the written reports: no secret value survives in any of them."""
    if not config.stash.get(ACTIVE_KEY, False):
        return
    secrets = secret_values()
    out = reports_dir(config)
    for name in ("report.html", "junit.xml"):
        p = Path(config.option.htmlpath) if name == "report.html" else Path(config.option.xmlpath or out / name)
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            clean = redact_text(text, secrets)
            if clean != text:
                p.write_text(clean, encoding="utf-8")

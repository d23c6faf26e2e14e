"""kolora-probe's pytest plugin (``kolora_probe_checks.plugin``): options → plan → fixtures, marker semantics and
the three reports. It is loaded only where asked for (``-p kolora_probe_checks.plugin``, this repository's
pytest.ini and conftest.py, ``kolora-probe check``; see ``bootstrap.py``), never just by being installed.

* ``--plan`` and the plan-field overrides (``--model``, ``--r``, ``--batch-size`` …) build the effective plan
  once; an invalid plan is reported as one line per problem in the header and by ``test_plan_is_valid``, and
  every check that needs the plan fails with that reason while the others still run.
* Plain ``pytest`` runs the CPU gate: ``gpu`` and ``benchmark`` checks are deselected unless ``-m`` is given.
* Every run of ``checks/`` writes ``report.html`` (self-contained), ``junit.xml`` (evidence as properties) and
  ``environment.json`` into ``reports/<selection>/`` (``gate``, ``gpu``, ``benchmark`` …; ``reports/latest`` points
  at the last one) or ``--reports-dir``, also when checks fail or the run is interrupted (SIGINT or SIGTERM: the
  verdict is then INCOMPLETE). They are written to temporary files, redacted, then moved into place; the previous
  run's reports in that folder are removed at the start, so no older verdict is left behind.
* A failing check is one line (message only; ``--tb`` given by the user wins); a check blocked by a broken input
  (plan, model, weights, tokenizer) says "blocked: … — see OWNER" and the owner carries the full explanation.
* Everything printed to the terminal and written to the reports is redacted (kolora_probe.report.redact).
* Check-specific fixtures live in ``checks/fixtures_*.py`` plugins listed in ``pytest_plugins``.
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from kolora_probe_checks.failures import fail_check, failure_line, is_check_failure, root_cause
from kolora_probe import __version__
from kolora_probe.report import strict_json
from kolora_probe.plan.schema import Plan, PlanError
from kolora_probe.plan.options import add_plan_options, overrides_from, plan_from_options
from kolora_probe.report.redact import redact, redact_text, secret_values

pytest_plugins = [
    "kolora_probe_checks.fixtures_environment",
    "kolora_probe_checks.fixtures_model",
    "kolora_probe_checks.fixtures_memory",
    "kolora_probe_checks.fixtures_monitor",
    "kolora_probe_checks.fixtures_structure",
    "kolora_probe_checks.fixtures_distributed",
    "kolora_probe_checks.heap",
]

CHECKS_DIR = Path(__file__).resolve().parent   # the shipped checks (this repo's checks/, or installed)
MARKERS = {
    "gpu": "needs a CUDA GPU; run with `pytest -m gpu` (fails, never skips, without one)",
    "cpu": "runs on any machine (the CPU gate)",
    "slow": "loads full model weights",
    "benchmark": "throughput benchmarks (pytest-benchmark); run with `pytest -m benchmark`",
    "distributed": "launch pre-flight; run under `torchrun --nproc-per-node N -m pytest -m distributed`",
}
PLAN_KEY = pytest.StashKey[Plan]()
PLAN_ERROR_KEY = pytest.StashKey[list]()
ACTIVE_KEY = pytest.StashKey[bool]()
RESULTS_KEY = pytest.StashKey[dict]()
EVIDENCE_KEY = pytest.StashKey[list]()
EXTRAS_KEY = pytest.StashKey[list]()
STARTED_KEY = pytest.StashKey[float]()
CUDA_REASON_KEY = pytest.StashKey[object]()
OUT_KEY = pytest.StashKey[object]()           # Path of the reports folder, or None when it is unusable
PROBLEMS_KEY = pytest.StashKey[list]()        # run-level failures outside any check (one line each)
PARTS_KEY = pytest.StashKey[list]()           # (temporary path, final path) of report.html / junit.xml
INTERRUPT_KEY = pytest.StashKey[str]()        # "SIGINT" / "SIGTERM" when the run was stopped early
SIGTERM_KEY = pytest.StashKey[object]()       # the SIGTERM handler to restore
DOC_KEY = pytest.StashKey[dict]()             # the run document, built once at session finish
CHARTS_KEY = pytest.StashKey[dict]()          # title → SVG text shown inline in the summary (memory breakdown)
SECRETS_KEY = pytest.StashKey[list]()
GIVEN_KEY = pytest.StashKey[bool]()           # --reports-dir was given (no selection folder, no latest link)
REPORT_NAMES = ("report.html", "junit.xml", "environment.json")
FAMILY_OF = {  # check module → requirement family shown in the summary
    "test_plan": "plan", "test_plan_feasibility": "plan", "test_environment": "environment", "test_gpu": "gpu",
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
    checks_dir = CHECKS_DIR
    for arg in config.args or ["checks"]:
        if config.option.pyargs and str(arg).split("::")[0].split(".")[0] == __name__.split(".")[0]:
            return True  # pytest --pyargs kolora_probe_checks
        p = Path(str(arg).split("::")[0])
        p = (Path(config.invocation_params.dir) / p).resolve() if not p.is_absolute() else p.resolve()
        if p == checks_dir or checks_dir in p.parents or p in checks_dir.parents:
            return True
    return False


def selection_name(markexpr: str | None) -> str:
    """The reports sub-folder of a selection: ``gate`` (plain ``pytest``), ``gpu``, ``benchmark``, ``gpu-or-…``."""
    if not markexpr:
        return "gate"
    return re.sub(r"[^A-Za-z0-9]+", "-", markexpr).strip("-")[:60] or "selection"


def reports_dir(config: pytest.Config) -> Path:
    """``--reports-dir`` as given, else ``reports/<selection>/``."""
    d = config.getoption("reports_dir")
    return Path(d).resolve() if d else reports_base(config) / selection_name(config.getoption("markexpr"))


def reports_base(config: pytest.Config) -> Path:
    """``reports/`` in the rootdir of the project the checks live in (this repo); where they are not inside the
    rootdir's tree (``kolora-probe check``, ``--pyargs`` on an installed kolora-probe), ``reports/`` in the
    directory pytest was started in."""
    root = Path(str(config.rootpath)).resolve()
    return (root if root in CHECKS_DIR.parents else Path(config.invocation_params.dir)) / "reports"


def _short_path(p: Any, limit: int = 120) -> str:
    s = str(p)
    return s if len(s) <= limit else f"{s[:60]}…{s[-40:]} ({len(s):,} characters)"


def _prepare_reports_dir(config: pytest.Config, out: Path) -> str | None:
    """Create ``out``, prove it writable and remove the previous run's reports; the problem in one line, or None."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kolora-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        for name in REPORT_NAMES:
            (out / name).unlink(missing_ok=True)
    except OSError as exc:
        return (f"reports directory {_short_path(out)} is not usable ({exc.strerror or exc}); no reports are "
                f"written; fix: pass --reports-dir=DIR naming a writable folder")
    return None


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt("SIGTERM")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    known = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for name, text in MARKERS.items():  # also where no pytest.ini declares them (kolora-probe check, a user's repo)
        if name not in known:
            config.addinivalue_line("markers", f"{name}: {text}")
    # under torchrun / accelerate launch only rank 0 writes the reports
    config.stash[ACTIVE_KEY] = active = _suite_active(config) and os.environ.get("RANK", "0") == "0"
    config.stash[RESULTS_KEY] = {}
    config.stash[STARTED_KEY] = time.time()
    config.stash[PROBLEMS_KEY] = []
    config.stash[PARTS_KEY] = []
    config.stash[CHARTS_KEY] = {}
    config.stash[SECRETS_KEY] = secret_values()
    plan_path = config.getoption("plan_path")
    try:
        config.stash[PLAN_KEY] = plan_from_options(plan_path, config.getoption)
        config.stash[PLAN_ERROR_KEY] = []
    except PlanError as exc:
        config.stash[PLAN_ERROR_KEY] = exc.lines
    except OSError as exc:  # a path the OS refuses (too long, a device file) — load_plan reports the rest
        config.stash[PLAN_ERROR_KEY] = [f"{_short_path(plan_path)}: cannot read the plan file "
                                        f"({exc.strerror or exc}); pass a readable TOML file with --plan"]
    if not active:
        return
    out = reports_dir(config)
    problem = _prepare_reports_dir(config, out)
    config.stash[OUT_KEY] = None if problem else out
    config.option.self_contained_html = True
    if not _user_asked_for_traceback(config) and not _user_gave(config, "--show-capture"):
        config.option.showcapture = "no"  # a failing check is its one line; captured output stays in report.html
    if problem:
        config.stash[PROBLEMS_KEY].append(problem)
    else:
        config.stash[GIVEN_KEY] = bool(config.getoption("reports_dir"))
        if not config.getoption("reports_dir"):
            config.option.reports_dir = str(out)  # benchmark/monitor files follow the selection's folder
        if not config.getoption("htmlpath", None):
            config.option.htmlpath = str(out / "report.html.part")
            config.stash[PARTS_KEY].append((out / "report.html.part", out / "report.html"))
        if not config.option.xmlpath:
            config.option.xmlpath = str(out / "junit.xml.part")
            config.stash[PARTS_KEY].append((out / "junit.xml.part", out / "junit.xml"))
    for given in (config.getoption("htmlpath", None), config.option.xmlpath):  # --html/--junitxml: redact in place
        if given and not str(given).endswith(".part"):
            config.stash[PARTS_KEY].append((Path(given), Path(given)))
    try:  # SIGTERM finishes the reports like Ctrl-C does (verdict INCOMPLETE)
        config.stash[SIGTERM_KEY] = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass


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
        metadata.update(_plan_metadata(config))
        metadata.update(redact(dict(metadata), config.stash[SECRETS_KEY]))  # incl. pytest-metadata's CI variables


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"kolora-probe {__version__}"]
    lines += [f"REPORTS ERROR: {p}" for p in config.stash.get(PROBLEMS_KEY, [])]
    errors = config.stash.get(PLAN_ERROR_KEY, [])
    if errors:
        lines += [f"PLAN ERROR: {e}" for e in errors]
        return lines
    lines += [f"{k.lower()}: {v}" for k, v in _plan_metadata(config).items()]
    lines += [f"plan note: {n}" for n in config.stash[PLAN_KEY].notes]
    values, names = overrides_from(config.getoption)
    if values:
        lines.append("overrides: " + ", ".join(f"{names[k]}={v!r}" for k, v in values.items()))
    lines += [f"note: {n}" for n in config.stash[PLAN_KEY].notes]
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
def project_root(pytestconfig: pytest.Config) -> Path:
    return Path(str(pytestconfig.rootpath))


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
        props = self._item.user_properties  # JUnit: plain values; name.expected / .unit / .note beside them
        props.append((name, _plain(row["actual"])))
        for key in ("expected", "unit", "note"):
            if key in row:
                props.append((f"{name}.{key}", _plain(row[key])))

    def html(self, title: str, content: str) -> None:
        self._item.stash[EXTRAS_KEY].append(("html", title, content))

    def text(self, title: str, content: str) -> None:
        self._item.stash[EXTRAS_KEY].append(("text", title, content))

    def image(self, title: str, png: bytes) -> None:
        self._item.stash[EXTRAS_KEY].append(("png", title, base64.b64encode(png).decode("ascii")))

    def svg(self, title: str, svg: str) -> None:
        """An SVG chart (text): an image in the test's extras; a memory breakdown also goes inline into the
        summary at the top of the report."""
        self._item.stash[EXTRAS_KEY].append(("svg", title, svg))


def _plain(v: Any) -> str:
    """A JUnit property value: the value itself for scalars, compact JSON only for lists/dicts."""
    if isinstance(v, (dict, list)):
        return strict_json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


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
        from kolora_probe.env.facts import cuda_unavailable_reason

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
    from kolora_probe.report.summary import human

    cells = "".join(
        "<tr><td>{}</td><td class='kp-num'>{}</td><td class='kp-num'>{}</td><td>{}</td></tr>".format(
            html.escape(r["name"]), html.escape(human(r["actual"], r.get("unit"))),
            html.escape(human(r.get("expected"), r.get("unit") if isinstance(r.get("expected"), (int, float)) else None)),
            html.escape(r.get("note", "")))
        for r in rows)
    return ("<table class='kp-evidence'><tr><th>measured</th><th>actual</th><th>expected</th><th>note</th></tr>"
            f"{cells}</table>")


def _one_line(report: pytest.TestReport) -> str:
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    msg = crash.message if crash is not None else str(report.longrepr or "")
    if isinstance(report.longrepr, tuple):  # skipped: (path, lineno, reason)
        msg = str(report.longrepr[2])
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    return first.removeprefix("Failed: ").removeprefix("AssertionError: ")


class _Crash:
    """What pytest's short summary and junitxml read from a failure: the message (and where)."""

    def __init__(self, path: str, lineno: int, message: str):
        self.path, self.lineno, self.message = path, lineno, message


class OneLineFailure:
    """A check's failure as pytest shows it: the one-line message, no traceback, no assertion rewriting."""

    def __init__(self, message: str, path: str, lineno: int):
        self.message = message
        self.reprcrash = _Crash(path, lineno, message)

    def toterminal(self, tw) -> None:
        tw.line(self.message, red=True, bold=True)

    def __str__(self) -> str:
        return self.message


def _user_gave(config: pytest.Config, *options: str) -> bool:
    args = [*config.invocation_params.args, *os.environ.get("PYTEST_ADDOPTS", "").split()]
    return any(str(a).startswith(options) for a in args)


def _user_asked_for_traceback(config: pytest.Config) -> bool:
    return _user_gave(config, "--tb", "--full-trace")


def _is_check(item: pytest.Item) -> bool:
    return CHECKS_DIR in Path(str(item.path)).resolve().parents


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    exc = call.excinfo.value if call.excinfo else None
    if report.when == "setup" and report.failed and is_check_failure(exc):
        report.when = "call"  # a missing GPU / model is the check's failure, not an error in the test's set-up
    if report.failed and exc is not None and _is_check(item):
        secrets = item.config.stash.get(SECRETS_KEY, None)
        cause = root_cause(exc)
        if cause and cause[0] != getattr(item, "originalname", item.name):
            line = f"blocked: {cause[1]} — see {cause[0]}"
            item.stash[BLOCKED_KEY] = cause[0]
        else:
            line = failure_line(exc)
            doc = (getattr(getattr(item, "function", None), "__doc__", None) or "").strip()
            if line.startswith("assert ") and doc:  # an assert without a message: say what the check wanted
                line = f"{' '.join(doc.split(chr(10) * 2)[0].split())} — failed: {line}"
        line = redact_text(line, secrets)
        if not _user_asked_for_traceback(item.config):
            path, lineno, _ = item.location
            report.longrepr = OneLineFailure(line, path, (lineno or 0) + 1)
        item.stash[MESSAGE_KEY] = line
    _record(item, report)
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    try:
        from pytest_html import extras as html_extras
    except ImportError:
        return
    secrets = item.config.stash.get(SECRETS_KEY, None)
    extras = list(getattr(report, "extras", []))
    rows = item.stash.get(EVIDENCE_KEY, [])
    if rows:
        extras.append(html_extras.html(_evidence_table(redact(rows, secrets))))
    for kind, title, content in item.stash.get(EXTRAS_KEY, []):
        if kind == "html":
            extras.append(html_extras.html(f"<h4>{html.escape(redact_text(title, secrets))}</h4>"
                                           + redact_text(content, secrets)))
        elif kind == "text":
            extras.append(html_extras.text(redact_text(content, secrets), name=redact_text(title, secrets)))
        elif kind == "svg":
            content = redact_text(content, secrets)
            extras.append(html_extras.svg(base64.b64encode(content.encode("utf-8")).decode("ascii"), name=title))
            if title.startswith("memory breakdown"):  # the summary shows one chart: measured if there is one
                charts = item.config.stash[CHARTS_KEY]
                if "measured" in title:
                    charts.clear()
                if "measured" in title or not charts:
                    charts[title] = content
        else:
            extras.append(html_extras.png(content, name=title))
    report.extras = extras


BLOCKED_KEY = pytest.StashKey[str]()
MESSAGE_KEY = pytest.StashKey[str]()


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
        entry["message"] = entry["message"] or item.stash.get(MESSAGE_KEY, None) or _one_line(report)
        if BLOCKED_KEY in item.stash:
            entry["blocked_by"] = item.stash[BLOCKED_KEY]
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        entry["message"] = _one_line(report)
    entry["evidence"] = item.stash.get(EVIDENCE_KEY, [])


def pytest_keyboard_interrupt(excinfo) -> None:
    config = _CONFIG[0] if _CONFIG else None
    if config is not None and INTERRUPT_KEY not in config.stash:
        config.stash[INTERRUPT_KEY] = "SIGTERM" if "SIGTERM" in str(excinfo.value) else "SIGINT (Ctrl-C)"


_CONFIG: list[pytest.Config] = []


def pytest_html_report_title(report) -> None:
    report.title = "kolora-probe report"


def pytest_html_results_table_html(report, data: list) -> None:
    """No "No log output captured." on every row."""
    if data == ["No log output captured."]:
        data.clear()


def pytest_html_results_summary(prefix: list, summary: list, postfix: list, session: pytest.Session) -> None:
    from kolora_probe.report.summary import summary_html

    config = session.config
    doc = config.stash.get(DOC_KEY, None) or redact(_run_document(config, exitstatus=None),
                                                    config.stash[SECRETS_KEY])
    prefix.append(redact_text(summary_html(doc, config.stash.get(CHARTS_KEY, {})), config.stash[SECRETS_KEY]))


def _run_document(config: pytest.Config, exitstatus: int | None) -> dict[str, Any]:
    from kolora_probe.report.run_document import build_run_document

    plan = config.stash.get(PLAN_KEY, None)
    values, names = overrides_from(config.getoption)
    return build_run_document(
        plan=plan, plan_errors=config.stash.get(PLAN_ERROR_KEY, []),
        overrides={names[k]: v for k, v in values.items()},
        checks=list(config.stash.get(RESULTS_KEY, {}).values()),
        exitstatus=exitstatus, started=config.stash.get(STARTED_KEY, time.time()),
        markexpr=config.getoption("markexpr") or "(default: not gpu and not benchmark and not distributed)",
        interrupt_reason=config.stash.get(INTERRUPT_KEY, None), problems=config.stash.get(PROBLEMS_KEY, []))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Redact everything the terminal reporter prints (failure lines, ids, summaries)."""
    config = session.config
    _CONFIG[:] = [config]
    if not config.stash.get(ACTIVE_KEY, False):
        return
    tr = config.pluginmanager.get_plugin("terminalreporter")
    tw = getattr(tr, "_tw", None)
    if tw is None or getattr(tw, "_kolora_redacting", False):
        return
    write, secrets = tw.write, config.stash[SECRETS_KEY]

    def redacting_write(msg: str, **kw: Any) -> None:
        write(redact_text(msg, secrets), **kw)

    tw.write, tw._kolora_redacting = redacting_write, True


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """environment.json, the summary's document and the JUnit verdict (before pytest-html/junitxml write)."""
    config = session.config
    if not config.stash.get(ACTIVE_KEY, False):
        return
    if SIGTERM_KEY in config.stash:  # finishing the reports: a SIGTERM now must not cut them off half-written
        try:
            signal.signal(signal.SIGTERM, lambda signum, frame: None)
        except ValueError:
            pass
    if config.stash[PROBLEMS_KEY] and session.exitstatus == 0:
        session.exitstatus = 1
    doc = redact(_run_document(config, int(exitstatus)), config.stash[SECRETS_KEY])
    config.stash[DOC_KEY] = doc
    from _pytest.junitxml import xml_key

    xml = config.stash.get(xml_key, None)
    if xml is not None:
        xml.add_global_property("kolora_verdict", doc["verdict"]["text"])
        xml.add_global_property("kolora_selection", doc["selection"])
    out = config.stash.get(OUT_KEY, None)
    if out is None:
        return
    try:
        tmp = out / "environment.json.part"
        tmp.write_text(strict_json.dumps(doc, indent=2, ensure_ascii=False, default=str),
                       encoding="utf-8")
        tmp.replace(out / "environment.json")
    except (OSError, ValueError) as exc:
        config.stash[PROBLEMS_KEY].append(f"{out / 'environment.json'} could not be written ({exc})")


def _finish_reports(config: pytest.Config) -> None:
    """Redact the temporary report.html / junit.xml, move them into place, point reports/latest at them."""
    parts, secrets = config.stash.get(PARTS_KEY, []), config.stash.get(SECRETS_KEY, [])
    while parts:
        part, final = parts.pop(0)
        try:
            if part.is_file():
                text = part.read_text(encoding="utf-8")
                part.write_text(redact_text(text, secrets), encoding="utf-8")
                part.replace(final)
        except OSError as exc:
            config.stash[PROBLEMS_KEY].append(f"{final} could not be written ({exc.strerror or exc})")
    for plugin in config.pluginmanager.get_plugins():  # pytest-html's "Generated html report" line
        if str(getattr(plugin, "_report_path", "")).endswith(".part"):
            plugin._report_path = Path(str(plugin._report_path)[:-5])
    from _pytest.junitxml import xml_key

    xml = config.stash.get(xml_key, None)
    if xml is not None and str(xml.logfile).endswith(".part"):
        xml.logfile = str(xml.logfile)[:-5]
    out = config.stash.get(OUT_KEY, None)
    if out is not None and not config.stash.get(GIVEN_KEY, True):
        latest = out.parent / "latest"
        try:
            if latest.is_symlink() or not latest.exists():
                tmp = out.parent / f".latest-{os.getpid()}"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(out.name, target_is_directory=True)
                tmp.replace(latest)
        except OSError:
            pass  # a file system without symlinks: the selection folders are still there


@pytest.hookimpl(tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not config.stash.get(ACTIVE_KEY, False):
        return
    _finish_reports(config)
    for problem in config.stash.get(PROBLEMS_KEY, []):
        terminalreporter.write_line(f"REPORTS ERROR: {problem}", red=True, bold=True)
    out = config.stash.get(OUT_KEY, None)
    if out is not None:
        terminalreporter.write_line(f"kolora-probe reports: {out} — {config.stash[DOC_KEY]['verdict']['text']}"
                                    if DOC_KEY in config.stash else f"kolora-probe reports: {out}")
    from kolora_probe.model.source import hub_status

    status = hub_status(probe=False)  # said once: the hub was unreachable and the run went offline after one probe
    if status is not None and not status.reachable:
        terminalreporter.write_line(redact_text(f"kolora-probe: note: {status.describe()}"))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Move what is left into place (runs without a terminal summary too) and restore the SIGTERM handler."""
    if not config.stash.get(ACTIVE_KEY, False):
        return
    _finish_reports(config)
    if SIGTERM_KEY in config.stash:
        try:
            signal.signal(signal.SIGTERM, config.stash[SIGTERM_KEY])
        except (ValueError, TypeError):
            pass

"""Fixtures for the monitor checks (a pytest plugin listed in conftest.pytest_plugins).

* ``gpu_monitor``: runs :class:`kolora_probe.monitor.recorder.Monitor` in a background thread while a check runs (autouse
  for every ``gpu`` check, so model loading in set-up is covered too). Right after the check's body it stops,
  and the timeline PNG plus the peaks are attached to the report with ``evidence``. Logs go to
  ``reports/monitor/<check>/`` (``samples.jsonl``, ``summary.json``, ``timeline.png``).
  ``--monitor-interval SECONDS`` sets the sampling interval (default 0.2; 0 turns the monitor off).
* Benchmarks (``-m benchmark``): pytest-benchmark's full JSON goes to ``reports/pytest-benchmark.json`` (unless
  ``--benchmark-json`` is given) and ``benchmark_results`` collects each check's derived numbers
  (chars/s, tokens/s, MFU …) into ``reports/benchmarks.json``.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from kolora_probe.report import strict_json

MONITOR_KEY = pytest.StashKey[tuple]()
DEFAULT_INTERVAL_S = 0.2


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kolora-probe")
    group.addoption("--monitor-interval", dest="monitor_interval", type=float, default=DEFAULT_INTERVAL_S,
                    metavar="SECONDS", help="GPU/system memory sampling interval during gpu checks "
                                            f"(default {DEFAULT_INTERVAL_S}; 0 disables the monitor)")


def _reports_dir(config: pytest.Config) -> Path:
    d = config.getoption("reports_dir", None)
    return Path(d).resolve() if d else Path(str(config.rootpath)) / "reports"


def _safe_name(nodeid: str) -> str:
    name = nodeid.split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:120] or "check"


# --- monitor ------------------------------------------------------------------------------------------
@pytest.fixture
def gpu_monitor(request: pytest.FixtureRequest, evidence):
    """A started :class:`~kolora_probe.monitor.recorder.Monitor` (None when ``--monitor-interval 0``)."""
    from kolora_probe.monitor.recorder import Monitor

    interval = request.config.getoption("monitor_interval")
    if not interval or interval <= 0:
        yield None
        return
    out = _reports_dir(request.config) / "monitor" / _safe_name(request.node.nodeid)
    monitor = Monitor(out, interval).start()
    request.node.stash[MONITOR_KEY] = (monitor, evidence)
    try:
        yield monitor
    finally:
        _finish(request.node)  # if the call hook did not already (e.g. set-up failed after the monitor started)


@pytest.fixture(autouse=True)
def _monitor_gpu_checks(request: pytest.FixtureRequest):
    if request.node.get_closest_marker("gpu") is not None:
        request.getfixturevalue("gpu_monitor")
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Stop the monitor right after the check's body, so its evidence is in the check's report."""
    yield
    _finish(item)


def _finish(item: pytest.Item) -> None:
    entry = item.stash.get(MONITOR_KEY, None)
    if entry is None:
        return
    del item.stash[MONITOR_KEY]
    monitor, evidence = entry
    summary = monitor.stop()
    attach_monitor_evidence(evidence, summary, monitor.timeline_path)


def attach_monitor_evidence(evidence, summary, timeline_path: Path | None) -> None:
    """Peaks as evidence rows and the timeline as an image."""
    evidence("monitor_peak_gpu_memory_bytes", summary.peak_gpu_memory_bytes, unit="bytes",
             note=(f"GPU figures unavailable: {summary.gpu_unavailable_reason}"
                   if summary.gpu_unavailable_reason else None))
    for g in summary.gpus:
        if len(summary.gpus) > 1:
            evidence(f"monitor_peak_gpu{g.index}_memory_bytes", g.memory_used_bytes.peak, unit="bytes")
        if g.utilization_percent.peak is not None:
            evidence(f"monitor_peak_gpu{g.index}_utilization_percent", g.utilization_percent.peak, unit="%")
    if summary.system is not None:
        evidence("monitor_peak_system_memory_used_bytes", summary.system.used_bytes.peak, unit="bytes")
        evidence("monitor_peak_process_rss_bytes", summary.system.process_rss_bytes.peak, unit="bytes")
    evidence("monitor_samples", summary.sample_count, note=f"every {summary.interval_s:g} s")
    if timeline_path is not None and timeline_path.is_file():
        evidence.image("GPU and system memory during this check", timeline_path.read_bytes())


# --- benchmarks -----------------------------------------------------------------------------------------
class _LazyJsonFile:
    """Stands in for pytest-benchmark's ``--benchmark-json`` value; the file is created only when results are
    written. pytest-benchmark < 5.3 stores an open file (``argparse.FileType``) and writes ``with self.json as
    fh``; 5.3+ stores a path and calls ``open(self.json, "wb")``. This object is both: a context manager that
    opens the file, and an ``os.PathLike`` (``__fspath__`` creates the parent folder first)."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None

    def __fspath__(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return str(self.path)

    def __enter__(self):
        self._fh = open(self, "wb")
        return self._fh

    def __exit__(self, *exc: Any) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __str__(self) -> str:
        return str(self.path)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """When benchmark checks are selected, have pytest-benchmark write its JSON under reports/."""
    if not any(item.get_closest_marker("benchmark") for item in items):
        return
    session = getattr(config, "_benchmarksession", None)  # pytest-benchmark's BenchmarkSession
    if session is not None and getattr(session, "json", "missing") is None:
        session.json = _LazyJsonFile(_reports_dir(config) / "pytest-benchmark.json")


class BenchmarkResults:
    """Derived benchmark numbers, one entry per check, written to ``reports/benchmarks.json``."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}

    def add(self, nodeid: str, **values: Any) -> None:
        self.entries.setdefault(nodeid, {}).update(values)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": self.entries}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(strict_json.dumps(doc, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        tmp.replace(self.path)


@pytest.fixture(scope="session")
def benchmark_results(pytestconfig: pytest.Config) -> BenchmarkResults:
    return BenchmarkResults(_reports_dir(pytestconfig) / "benchmarks.json")

"""pytest-benchmark's ``--benchmark-json`` value that the checks install (checks/fixtures_monitor.py) works with
every pytest-benchmark that requirements.txt allows: < 5.3 writes ``with session.json as fh`` (the option was an
``argparse.FileType``), 5.3+ writes ``open(session.json, "wb")`` (the option is a ``Path``)."""
from __future__ import annotations

import json
from types import SimpleNamespace

from kolora_probe_checks.fixtures_monitor import _LazyJsonFile


def _save_json_before_5_3(session, output_json) -> None:  # pytest-benchmark 5.1/5.2 SessionBenchmark.save_json
    with session.json as fh:
        fh.write(json.dumps(output_json).encode())


def test_lazy_json_file_works_as_an_open_file_and_as_a_path(tmp_path):
    import pytest_benchmark.session as pb_session

    for name, save in (("old", _save_json_before_5_3), ("installed", pb_session.BenchmarkSession.save_json)):
        target = tmp_path / name / "reports" / "pytest-benchmark.json"
        lazy = _LazyJsonFile(target)
        assert not target.parent.exists()  # nothing is created before results are written
        session = SimpleNamespace(json=lazy, logger=SimpleNamespace(info=lambda *a, **k: None))
        save(session, {"benchmarks": [{"name": name}]})
        assert json.loads(target.read_text())["benchmarks"][0]["name"] == name
        assert str(lazy) == str(target)


def _strict(text: str):
    def refuse(token: str):
        raise AssertionError(f"not JSON: bare {token}")
    return json.loads(text, parse_constant=refuse)


def test_reports_json_is_strict_even_for_non_finite_numbers(tmp_path):
    """A NaN/inf measurement is written as "nan"/"inf", never as the bare NaN/Infinity tokens (not JSON)."""
    from kolora_probe_checks.fixtures_monitor import BenchmarkResults
    from kolora_probe.report import strict_json

    doc = {"loss": float("nan"), "rows": [1.5, float("inf"), (float("-inf"),)], "n": 3}
    assert _strict(strict_json.dumps(doc)) == {"loss": "nan", "rows": [1.5, "inf", ["-inf"]], "n": 3}
    assert _strict(strict_json.dumps(object(), default=lambda o: float("nan"))) == "nan"
    results = BenchmarkResults(tmp_path / "benchmarks.json")
    results.add("checks/test_benchmarks.py::x", tokens_per_s=float("inf"), mfu=float("nan"))
    written = _strict(results.path.read_text())["results"]["checks/test_benchmarks.py::x"]
    assert written == {"tokens_per_s": "inf", "mfu": "nan"}

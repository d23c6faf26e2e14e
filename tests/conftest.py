import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def model_zoo():
    """Tiny KoGPT-2-shaped model directories and their broken variants (tests/model_factory.py), built once."""
    from model_factory import model_zoo as build

    return build()


# The suite runs that several test modules read, run once per session (each run of the real suite costs seconds
# of interpreter start, imports and environment facts on a 2-core machine). Tests only read their reports.
@pytest.fixture(scope="session")
def cpu_checks_run(tmp_path_factory):
    """``pytest checks/test_plan.py checks/test_environment.py`` on the default plan (no model needed)."""
    from suite_runner import run_suite

    return run_suite("checks/test_plan.py", "checks/test_environment.py",
                     reports=tmp_path_factory.mktemp("cpu-checks-run"))


@pytest.fixture(scope="session")
def gpu_selection_run(tmp_path_factory):
    """``pytest -m gpu`` on this machine (CPU-only here and in CI: every GPU check fails with the reason)."""
    from suite_runner import run_suite

    return run_suite("-m", "gpu", reports=tmp_path_factory.mktemp("gpu-selection-run"))

"""Fixtures for the environment checks: machine facts (probed once per session, shared with the reports), the
libraries imported once, and the requirements file's packages."""
from __future__ import annotations

from pathlib import Path

import pytest

from kolora_probe.environment import EnvironmentFacts, LibraryImport, collect_environment, import_libraries
from kolora_probe.requirements_check import RequirementsFileError, check_requirements


def requirements_path(config: pytest.Config) -> Path:
    given = config.getoption("requirements_file")
    return Path(given).resolve() if given else Path(str(config.rootpath)) / "requirements.txt"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One check per requirements line, with the package name as the test id."""
    if "requirement" not in metafunc.fixturenames:
        return
    try:
        statuses = check_requirements(requirements_path(metafunc.config))
        metafunc.parametrize("requirement", statuses, ids=[s.name for s in statuses])
    except RequirementsFileError as exc:
        metafunc.parametrize("requirement", [exc], ids=["requirements-file"])


@pytest.fixture(scope="session")
def environment_facts() -> EnvironmentFacts:
    return collect_environment()


@pytest.fixture(scope="session")
def library_imports() -> tuple[LibraryImport, ...]:
    """transformers, peft and accelerate imported once for the session (each import's seconds or error)."""
    return import_libraries(("transformers", "peft", "accelerate"))


@pytest.fixture(scope="session")
def requirements_file(pytestconfig: pytest.Config) -> Path:
    return requirements_path(pytestconfig)

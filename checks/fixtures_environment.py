"""Fixtures for the environment checks: machine facts (probed once per session, shared with the reports), the
libraries imported once, and the requirements file's packages."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from kolora_probe.env.facts import EnvironmentFacts, LibraryImport, collect_environment, import_libraries
from kolora_probe.env.requirements import RequirementsFileError, check_requirements, write_declared_requirements

DECLARED_KEY = pytest.StashKey[Path]()


def requirements_path(config: pytest.Config) -> Path:
    """``--requirements``, else the project's requirements.txt (rootdir), else kolora-probe's declared ones."""
    given = config.getoption("requirements_file")
    if given:
        return Path(given).resolve()
    local = Path(str(config.rootpath)) / "requirements.txt"
    if local.is_file():
        return local
    if DECLARED_KEY not in config.stash:
        try:
            config.stash[DECLARED_KEY] = write_declared_requirements(
                Path(tempfile.mkdtemp(prefix="kolora-probe-")) / "requirements.txt")
        except RequirementsFileError:
            return local  # reported by the checks as "requirements file not found"
    return config.stash[DECLARED_KEY]


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

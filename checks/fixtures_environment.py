"""Fixtures for the environment checks (a pytest plugin listed in conftest.pytest_plugins)."""

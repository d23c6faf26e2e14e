"""Fixtures for the monitor checks (a pytest plugin listed in conftest.pytest_plugins)."""

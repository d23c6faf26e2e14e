"""Fixtures for the memory checks (a pytest plugin listed in conftest.pytest_plugins)."""

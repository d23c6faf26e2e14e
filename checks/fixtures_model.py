"""Fixtures for the model checks (a pytest plugin listed in conftest.pytest_plugins)."""

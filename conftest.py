"""This repository's pytest set-up: the gate's wiring is kolora-probe's pytest plugin (checks/plugin.py, installed
as ``kolora_probe_checks.plugin``), so the same checks run here (``pytest``) and, after a plain ``pip install``,
anywhere (``kolora-probe check``)."""
pytest_plugins = ["kolora_probe_checks.plugin"]

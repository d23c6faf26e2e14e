"""``kolora-probe check``: the gate (pytest on the checks shipped with kolora-probe), from any directory.

Every argument goes to pytest with kolora-probe's plugin loaded: the plan options (``--plan FILE``, ``--model DIR``,
``--r 8`` …, see ``kolora-probe check --help``) and any pytest option (``-m gpu``, ``-k``, ``-x``). The reports
go to ``./reports`` unless ``--reports-dir`` says otherwise; the exit code is pytest's (0 = ready).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "run the gate here: the shipped checks under pytest (plan options and any pytest args); reports in ./reports"
PLUGIN = "kolora_probe_checks.plugin"
PASS_THROUGH = True  # cli.py hands every argument (-h too: pytest's help with the plan options) to pytest


def add_arguments(parser: argparse.ArgumentParser) -> None:  # noqa: ARG001 - all arguments are pytest's
    return None


def pytest_args(user_args: list[str]) -> list[str]:
    """pytest's command line for the shipped checks: their own rootdir, no user ini or conftest; the plugin writes
    the reports to ``reports/`` in the current directory when the checks are their own rootdir."""
    import kolora_probe_checks

    checks_dir = Path(kolora_probe_checks.__file__).resolve().parent
    # no:anyio: the async-test plugin anyio registers (it comes with huggingface_hub's httpx) serves no check here
    argv = ["-p", PLUGIN, "-p", "no:cacheprovider", "-p", "no:anyio", "-c", os.devnull, f"--rootdir={checks_dir}",
            f"--confcutdir={checks_dir}", "-ra", "-W", "ignore::DeprecationWarning"]
    return [*argv, *user_args, str(checks_dir)]


def run(args: argparse.Namespace) -> int:
    import pytest

    return int(pytest.main(pytest_args(list(args.pytest_args))))

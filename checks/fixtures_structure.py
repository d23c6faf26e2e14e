"""Fixtures for the structure and LoRA-count checks (a pytest plugin listed in conftest.pytest_plugins).

Config only: the plan's model is built on the meta device from its ``config.json`` (no weights, no memory), once
per session. A model that cannot be found or a target list that does not match fails the dependent checks with
the one-line reason.
"""
from __future__ import annotations

import html

import pytest

from kolora_probe_checks.failures import fail_check


@pytest.fixture(scope="session")
def model_config(model_source):
    """The plan's model config (``config.json`` from a local dir, the HF cache or the hub)."""
    from kolora_probe.model.source import ModelConfigError, RemoteCodeRefused, load_config

    try:
        return load_config(model_source)
    except RemoteCodeRefused as exc:
        fail_check("model config refused", exc)
    except ModelConfigError as exc:
        fail_check("model config unusable", exc)


@pytest.fixture(scope="session")
def structure_model(model_config):
    """The plan's model on the meta device with ties restored (do not modify: shared by the session)."""
    from kolora_probe.model.meta import build_meta_model
    from kolora_probe.model.source import ModelConfigError

    try:
        return build_meta_model(model_config)
    except ModelConfigError as exc:
        fail_check("model cannot be built", exc)


@pytest.fixture(scope="session")
def structure_report(structure_model):
    from kolora_probe.model.structure import analyze_model

    return analyze_model(structure_model)


@pytest.fixture(scope="session")
def lora_count(plan, structure_model, structure_report):
    """The plan's LoRA count: analytic and PEFT (on a fresh meta-device model), with findings."""
    from kolora_probe.lora.count import TargetError, count_for_plan

    try:
        return count_for_plan(plan, model=structure_model, report=structure_report)
    except TargetError as exc:
        fail_check("LoRA targets do not fit the model", exc)


def html_table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(f'{c:,}' if isinstance(c, int) else str(c))}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f"<table class='kp-evidence'><tr>{head}</tr>{body}</table>"

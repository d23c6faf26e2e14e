"""Environment probes run once per process and are shared; thread helpers; library imports reported, not raised."""
from __future__ import annotations

import os

import pytest

from kolora_probe.env import facts as env


def test_probes_run_once_and_are_shared(monkeypatch):
    calls = []
    real = env.read_nvml
    monkeypatch.setattr(env, "read_nvml", lambda: calls.append(1) or real())
    env.nvml_facts.cache_clear()
    first = env.collect_environment()
    again = env.collect_environment()
    assert again.torch is first.torch and again.bitsandbytes is first.bitsandbytes and again.nvml is first.nvml
    assert env.torch_facts() is first.torch                      # the CUDA gate reuses the same probe
    env.cuda_unavailable_reason()
    assert len(calls) == 1
    fresh = env.collect_environment(refresh=True)
    assert len(calls) == 2 and fresh.torch is not first.torch and fresh.torch.version == first.torch.version


def test_import_libraries_reports_failures_as_facts():
    ok, missing = env.import_libraries(("json", "kolora_no_such_module_x"))
    assert ok.error is None and ok.seconds >= 0
    assert missing.error.startswith("ModuleNotFoundError") and "\n" not in missing.error
    assert env.import_libraries(("kolora_no_such_module_x",))[0] is missing   # once per process


def test_usable_threads_leaves_out_busy_cpus(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))      # only this process
    assert env.usable_threads() == cpus
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus + 10.0, 0.0, 0.0))   # oversubscribed
    assert env.usable_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0 + cpus / 2, 0.0, 0.0))
    assert env.usable_threads() == max(1, round(cpus / 2))


def test_torch_threads_restores_the_setting():
    import torch

    before = torch.get_num_threads()
    with env.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), env.torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before

"""Launch pre-flight faults: a rank with another library version fails naming that rank; a rank that never
joins makes the rendezvous fail within the timeout with the reason (no hang); only rank 0 writes reports."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from distributed_runner import clean_env, free_port, torchrun_suite
from structure_configs import llama_config, save_config
from suite_runner import ROOT, SuiteRun


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_config(llama_config(), tmp_path_factory.mktemp("llama"))


def test_rank_with_another_version_fails_naming_it(model_dir, tmp_path):
    # rank 1 only sees a peft 0.0.0 distribution first on its path (the wrapper sets it for LOCAL_RANK 1); not
    # kolora-probe itself: an editable install's kolora_probe.egg-info in the rootdir, which pytest puts first on
    # sys.path, would shadow it
    fake = tmp_path / "fake"
    (fake / "peft-0.0.0.dist-info").mkdir(parents=True)
    (fake / "peft-0.0.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: peft\nVersion: 0.0.0\n", encoding="utf-8")
    wrapper = tmp_path / "rank_wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\nif [ "$LOCAL_RANK" = "1" ]; then export PYTHONPATH="{fake}:$PYTHONPATH"; fi\n'
                       f'exec "{sys.executable}" "$@"\n', encoding="utf-8")
    reports = tmp_path / "reports"
    from distributed_runner import torchrun

    proc = torchrun("sh", str(wrapper), "-m", "pytest", "-p", "no:cacheprovider", "-m", "distributed",
                    f"--model={model_dir}", f"--reports-dir={reports}", no_python=True)
    run = SuiteRun(proc.returncode, proc.stdout + proc.stderr, reports)
    assert run.returncode != 0
    failed = {n.split("::")[1]: o for n, o in run.outcomes().items() if o != "passed"}
    assert list(failed) == ["test_same_versions_on_every_rank"], run.output[-2000:]
    msg = run.outcome("test_same_versions_on_every_rank")["message"]
    assert "rank 1" in msg and "peft 0.0.0" in msg and "rank 0" not in msg


def _lone_rank(rank: int, model_dir, reports, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    env = clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "distributed",
                           f"--model={model_dir}", f"--reports-dir={reports}", f"--rendezvous-timeout={timeout_s}",
                           "checks/test_distributed.py::test_rendezvous_completes"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.perf_counter() - t0


def test_missing_rank_times_out_with_the_reason(model_dir, tmp_path):
    proc, wall = _lone_rank(0, model_dir, tmp_path / "reports", 3)
    run = SuiteRun(proc.returncode, proc.stdout + proc.stderr, tmp_path / "reports")
    assert proc.returncode == 1, run.output[-2000:]
    msg = run.outcome("test_rendezvous_completes")["message"]
    assert "did not complete within 3 s (rank 0 of 2)" in msg and "1/2 clients joined" in msg, msg
    assert "check that all 2 ranks were started" in msg
    assert wall < 90   # pytest start-up + 3 s, not the default 10-minute wait


def test_only_rank_0_writes_reports(model_dir, tmp_path):
    proc, _ = _lone_rank(1, model_dir, tmp_path / "reports", 2)
    assert proc.returncode == 1
    assert "did not complete within 2 s (rank 1 of 2)" in proc.stdout
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())

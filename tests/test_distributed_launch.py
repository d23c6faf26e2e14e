"""Launch pre-flight: the distributed checks pass under torchrun with 2 CPU ranks (gloo); rank 0 writes the
reports with the per-rank table; outside a launcher they fail saying how to launch them."""
from __future__ import annotations

import html
import re

import pytest

from distributed_runner import torchrun_suite
from structure_configs import llama_config, save_config

CHECKS = ("test_launch_environment_consistent", "test_rendezvous_completes", "test_one_device_per_local_rank",
          "test_same_versions_on_every_rank", "test_same_plan_on_every_rank", "test_all_reduce_result",
          "test_all_reduce_bandwidth")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_config(llama_config(), tmp_path_factory.mktemp("llama"))


def test_checks_pass_under_torchrun_with_two_cpu_ranks(model_dir, tmp_path):
    run = torchrun_suite(model_dir, tmp_path / "reports")
    assert run.returncode == 0, run.output[-3000:]
    outcomes = run.outcomes()
    assert sorted(n.split("::")[1] for n in outcomes) == sorted(CHECKS)
    assert set(outcomes.values()) == {"passed"}
    # written by rank 0 (its own rank is in the evidence), with both ranks in the gathered per-rank table
    ev = {e["name"]: e for e in run.outcome("test_launch_environment_consistent")["evidence"]}
    assert ev["rank"]["actual"] == 0 and ev["world_size"]["actual"] == 2
    devices = {e["name"]: e for e in run.outcome("test_one_device_per_local_rank")["evidence"]}["devices"]
    assert devices["actual"] == {"0": "cpu", "1": "cpu"}
    assert run.outcome("test_all_reduce_result")["evidence"][0]["actual"] == 3.0    # 1 + 2
    text = html.unescape(html.unescape(run.html))   # pytest-html embeds the extras escaped in its JSON
    table = text.split("per-rank table", 1)[1]
    assert len(re.findall(r"<tr><td>[01]</td>", table.split("</table>", 1)[0])) == 2
    busbw = {e["name"]: e for e in run.outcome("test_all_reduce_bandwidth")["evidence"]}["per_rank_busbw_GBps"]
    assert set(busbw["actual"]) == {"0", "1"} and all(v > 0 for v in busbw["actual"].values())


def test_outside_a_launcher_every_check_fails_with_how_to_launch():
    from kolora_probe.distributed.preflight import run_preflight

    res = run_preflight({}, 1.0, environ={})
    assert set(res.errors) == {"launch"}
    assert "torchrun --standalone --nproc-per-node N -m pytest -m distributed" in res.errors["launch"]


def test_launch_env_consistency():
    from kolora_probe.distributed.preflight import launch_env

    ok = launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert ok is not None and ok.ok and (ok.rank, ok.world_size) == (1, 2)
    bad = launch_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_PORT": "x"})
    text = " | ".join(bad.problems)
    assert "RANK=2 is outside 0..WORLD_SIZE-1" in text and "LOCAL_RANK=3" in text
    assert "MASTER_PORT='x' is not an integer" in text and "MASTER_ADDR is not set" in text
    assert launch_env({}) is None


def test_odd_rank_is_named():
    from kolora_probe.distributed.preflight import RankFacts, version_mismatches

    def facts(rank, torch):
        return RankFacts(rank, rank, 3, "h", "cpu", None, {"torch": torch, "peft": "0.1"}, "d", 1)

    lines = version_mismatches([facts(0, "2.13.0"), facts(1, "2.12.0"), facts(2, "2.13.0")])
    assert lines == ["rank 1 (h) has torch 2.12.0, the other ranks 2.13.0"]
    assert version_mismatches([facts(0, "2.13.0"), facts(1, "2.13.0")]) == []

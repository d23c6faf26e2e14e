"""Launch pre-flight (``-m distributed``): run on every rank under ``torchrun`` / ``accelerate launch``.

Rank 0 writes the reports (with the per-rank table); the other ranks write none. Outside a launcher every check
fails with the line saying how to launch them.
"""
from __future__ import annotations

import pytest

from kolora_probe_checks.failures import fail_check
from kolora_probe_checks.fixtures_distributed import need
from kolora_probe_checks.fixtures_structure import html_table

pytestmark = pytest.mark.distributed
GB = 1e9


def _rank_table(res) -> str:
    rows = [[f.rank, f.host, f.local_rank, f.device, f.pid, f.versions.get("torch", "?"), f.plan_digest,
             f"{res.per_rank_busbw[f.rank] / GB:.2f}" if f.rank in res.per_rank_busbw else "-"]
            for f in res.facts]
    return html_table(["rank", "host", "local rank", "device", "pid", "torch", "plan digest",
                       "all-reduce busbw GB/s"], rows)


def test_launch_environment_consistent(launch_preflight, distributed_plan, evidence):
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_* set and consistent (and the plan's size)."""
    res = need(launch_preflight, "launch")
    env = res.env
    evidence("world_size", env.world_size)
    evidence("rank", env.rank, note=f"local rank {env.local_rank} of {env.local_world_size}")
    if distributed_plan is not None:
        d = distributed_plan.distributed
        if d.strategy != "none" and d.world_size not in (1, env.world_size):
            fail_check(f"the plan says [distributed].world_size = {d.world_size} but the launch has WORLD_SIZE="
                       f"{env.world_size}; launch {d.world_size} ranks or set world_size = {env.world_size}")


def test_rendezvous_completes(launch_preflight, evidence):
    """init_process_group completes within [distributed].rendezvous_timeout_s (else: the reason, no hang)."""
    res = need(launch_preflight, "rendezvous", "gather")
    evidence("backend", res.backend)
    evidence("rendezvous_s", round(res.rendezvous_s, 3), unit="s")
    evidence.html("per-rank table", _rank_table(res))
    assert len(res.facts) == res.env.world_size, f"{len(res.facts)} of {res.env.world_size} ranks answered"


def test_one_device_per_local_rank(launch_preflight, evidence):
    """Every rank a distinct rank id and (host, local rank); on GPUs each local rank its own device."""
    from kolora_probe.distributed.preflight import device_problems

    res = need(launch_preflight, "gather")
    evidence("devices", {f.rank: f.device for f in res.facts})
    problems = device_problems(res.facts)
    assert not problems, "; ".join(problems)


def test_same_versions_on_every_rank(launch_preflight, evidence):
    """Python, torch (CUDA, NCCL), transformers, peft, accelerate, bitsandbytes, … identical on every rank."""
    from kolora_probe.distributed.preflight import version_mismatches

    res = need(launch_preflight, "gather")
    evidence("versions", {f.rank: dict(f.versions) for f in res.facts})
    lines = version_mismatches(res.facts)
    assert not lines, ("library versions differ between ranks: " + "; ".join(lines)
                       + "; install the same requirements on every node")


def test_same_plan_on_every_rank(launch_preflight, evidence):
    """The effective plan (file + overrides) has the same digest on every rank."""
    from kolora_probe.distributed.preflight import odd_ranks

    res = need(launch_preflight, "gather")
    majority, odd = odd_ranks({f.rank: f.plan_digest for f in res.facts})
    evidence("plan_digest", {f.rank: f.plan_digest for f in res.facts}, expected=majority)
    assert not odd, ("the plan differs on rank(s) " + ", ".join(f"{r} (digest {d})" for r, d in odd.items())
                     + f" from the other ranks ({majority}); give every rank the same --plan and overrides")


def test_all_reduce_result(launch_preflight, evidence):
    """all_reduce(sum) of rank+1 on every rank equals N(N+1)/2 exactly."""
    res = need(launch_preflight, "all_reduce")
    a = res.all_reduce
    evidence("all_reduce_sum", a["min"] if a["min"] == a["max"] else [a["min"], a["max"]], expected=a["expected"])
    assert a["ok"], (f"all-reduce returned {a['min']}..{a['max']}, expected {a['expected']} on rank "
                     f"{res.env.rank}: the {res.backend} collective is broken (check NCCL_* / network settings)")


MIN_LINK_FRACTION = 0.05   # a GPU all-reduce far below the link means traffic goes the slow way (e.g. no P2P)


def test_all_reduce_bandwidth(launch_preflight, evidence):
    """All-reduce bus bandwidth measured; on GPUs compared with the NVLink / PCIe link NVML reports."""
    res = need(launch_preflight, "bandwidth")
    bw = res.bandwidth
    evidence("busbw_GBps", round(bw.busbw / GB, 3), unit="GB/s",
             note=f"{bw.nbytes / 2**20:.0f} MiB all-reduce, median {bw.seconds * 1e3:.2f} ms; busbw = algbw·2(N-1)/N")
    evidence("per_rank_busbw_GBps", {r: round(v / GB, 3) for r, v in res.per_rank_busbw.items()}, unit="GB/s")
    evidence.html("per-rank table", _rank_table(res))
    if bw.link_bytes_per_s:
        evidence("link_GBps", round(bw.link_bytes_per_s / GB, 2), unit="GB/s", note=bw.link)
        floor = MIN_LINK_FRACTION * bw.link_bytes_per_s
        assert bw.busbw >= floor, (f"all-reduce bus bandwidth {bw.busbw / GB:.2f} GB/s is below "
                                   f"{MIN_LINK_FRACTION:.0%} of the {bw.link} link ({bw.link_bytes_per_s / GB:.1f} "
                                   f"GB/s); check P2P / NCCL_P2P_DISABLE / the topology (nvidia-smi topo -m)")
    else:
        evidence("link", "not compared" if res.backend == "gloo" else "NVML link speed unavailable",
                 note="gloo on the CPU: bandwidth reported only")

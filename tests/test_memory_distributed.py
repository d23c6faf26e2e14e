"""Per-rank memory (DDP, FSDP2, ZeRO-2/3): traced FSDP2 shrinks with the world size and shards the frozen
weights, DDP adds its gradient buckets, ZeRO's model states follow DeepSpeed's estimators, one GPU unchanged."""
from __future__ import annotations

import json

import pytest

from structure_configs import LL_D, LL_HEADS, LL_KV, LL_LAYERS, llama_config, save_config


def _spec(strategy: str, n: int, **kw):
    from kolora_probe.plan.schema import DistributedSpec

    return DistributedSpec(strategy=strategy, world_size=n, **kw)


@pytest.fixture(scope="module")
def llama_shape():
    from kolora_probe.memory.trace import StepShape

    return StepShape(batch_size=2, seq_len=32, targets=("q_proj", "v_proj"), r=8, alpha=16.0, lora_dropout=0.0)


@pytest.fixture(scope="module")
def llama_single(llama_shape):
    from kolora_probe.memory.trace import trace_step

    return trace_step(llama_config(), llama_shape)


def _lora_params_llama(r: int) -> int:   # hand-derived: q_proj 64→64, v_proj 64→(2 KV heads × 16)
    head = LL_D // LL_HEADS
    return LL_LAYERS * r * ((LL_D + LL_D) + (LL_D + LL_KV * head))


def test_none_is_the_single_gpu_estimate(llama_shape, llama_single):
    from kolora_probe.memory.distributed import rank_estimate

    e = rank_estimate(llama_config(), llama_shape, _spec("none", 1), single=llama_single)
    assert e.per_rank_peak_bytes == llama_single.predicted_peak_bytes
    assert dict(e.components) == dict(llama_single.components)


def test_fsdp_trace_shards_frozen_weights_and_shrinks_with_ranks(llama_shape, llama_single):
    from kolora_probe.memory.distributed import rank_estimate

    est = {n: rank_estimate(llama_config(), llama_shape, _spec("fsdp", n), single=llama_single) for n in (2, 4)}
    assert {e.method for e in est.values()} == {"fsdp2_mem_tracker"}, [e.notes for e in est.values()]
    frozen = llama_single.components["frozen_weights"]
    for n, e in est.items():
        assert sum(e.components.values()) == e.per_rank_peak_bytes
        # 1/N of the one-GPU frozen weights (each shard rounded up to 512 B per tensor)
        assert frozen / n <= e.components["frozen_weights_sharded"] <= frozen / n + 64 * 512
    assert est[4].per_rank_peak_bytes < est[2].per_rank_peak_bytes


def test_ddp_adds_the_gradient_buckets(llama_shape, llama_single):
    from kolora_probe.memory.distributed import rank_estimate

    e = rank_estimate(llama_config(), llama_shape, _spec("ddp", 2), single=llama_single)
    buckets = e.components["ddp_gradient_buckets"]
    lora_bytes = 4 * _lora_params_llama(8)
    assert lora_bytes <= buckets < lora_bytes + 512
    assert e.per_rank_peak_bytes == llama_single.predicted_peak_bytes + buckets


def test_zero_model_states_match_deepspeed_estimators():
    ds2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    ds3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    from kolora_probe.memory.distributed import deepspeed_model_states_bytes as ours

    for p, largest, n in ((2_359_296, 39_321_600, 1), (7_000_000_000, 131_072_000, 8), (4_194_304, 65_536, 3)):
        _, gpu2 = ds2.estimate_zero2_model_states_mem_needs(p, n, 1, cpu_offload=False)
        assert ours("zero2", p, n) == gpu2
        _, gpu2o = ds2.estimate_zero2_model_states_mem_needs(p, n, 1, cpu_offload=True)
        assert ours("zero2", p, n, offload_optimizer=True) == gpu2o
        for off_opt, off_par in ((False, False), (True, False), (True, True)):
            _, gpu3, _ = ds3.estimate_zero3_model_states_mem_needs(p, largest, n, 1, cpu_offload=off_opt,
                                                                   cpu_offload_params=off_par)
            assert ours("zero3", p, n, largest, offload_optimizer=off_opt, offload_params=off_par) == gpu3


def test_zero3_partitions_frozen_weights_zero2_does_not(llama_shape, llama_single):
    from kolora_probe.memory.distributed import rank_estimate

    z2 = {n: rank_estimate(llama_config(), llama_shape, _spec("zero2", n), single=llama_single) for n in (1, 4)}
    z3 = rank_estimate(llama_config(), llama_shape, _spec("zero3", 4), single=llama_single)
    frozen = llama_single.components["frozen_weights"]
    assert z2[4].components["frozen_weights"] == z2[1].components["frozen_weights"] == frozen
    assert z3.components["frozen_weights_sharded"] == -(-frozen // 4)
    assert z2[4].components["lora_model_states"] < z2[1].components["lora_model_states"]


def test_launch_config_files(tmp_path):
    from kolora_probe.distributed.config import read_launch_config
    from kolora_probe.plan.schema import PlanError

    acc = tmp_path / "fsdp.yaml"
    acc.write_text("distributed_type: FSDP\nnum_processes: 8\nnum_machines: 2\nfsdp_config:\n"
                   "  fsdp_version: 2\n  fsdp_reshard_after_forward: false\n  fsdp_offload_params: true\n")
    assert read_launch_config(acc) == {"strategy": "fsdp", "world_size": 8, "nodes": 2,
                                       "reshard_after_forward": False, "cpu_offload": True}
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                    "offload_param": {"device": "none"}}}))
    assert read_launch_config(ds) == {"strategy": "zero3", "offload_optimizer": True, "offload_params": False}
    acc_ds = tmp_path / "ds.yaml"
    acc_ds.write_text("distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config:\n"
                      "  deepspeed_config_file: ds.json\n")
    assert read_launch_config(acc_ds)["strategy"] == "zero3" and read_launch_config(acc_ds)["world_size"] == 4
    bad = tmp_path / "bad.json"
    bad.write_text("{\"zero_optimization\": {\"stage\": 1}}")
    with pytest.raises(PlanError) as exc:
        read_launch_config(bad)
    assert len(exc.value.lines) == 1 and str(bad) in exc.value.lines[0] and "stage 2 or 3" in exc.value.lines[0]


def test_plan_distributed_table_and_overrides(tmp_path):
    from kolora_probe.plan.schema import PlanError, apply_overrides, default_plan, load_plan

    plan = apply_overrides(default_plan(), {"distributed.strategy": "fsdp", "distributed.world_size": 4},
                           {"distributed.strategy": "--strategy", "distributed.world_size": "--world-size"})
    assert (plan.distributed.strategy, plan.distributed.world_size) == ("fsdp", 4)
    assert default_plan().distributed.strategy == "none"
    with pytest.raises(PlanError) as exc:
        apply_overrides(default_plan(), {"distributed.strategy": "zero1"}, {"distributed.strategy": "--strategy"})
    assert exc.value.lines[0].startswith("--strategy 'zero1' is invalid; expected one of 'none', 'ddp'")
    text = default_plan().source and open(default_plan().source, encoding="utf-8").read()
    p = tmp_path / "p.toml"
    p.write_text(text + "\n[distributed]\nstrategy = \"ddp\"\nworld_size = 3\nnodes = 2\n")
    with pytest.raises(PlanError) as exc:
        load_plan(p)
    assert "world_size = 3 is not a multiple of distributed.nodes = 2" in exc.value.lines[0]


def test_estimate_cli_json(tmp_path, capsys):
    from kolora_probe.cli.main import main

    model = save_config(llama_config(), tmp_path / "m")
    rc = main(["estimate", f"--model={model}", "--targets", "q_proj,v_proj", "--batch-size", "2", "--seq-len",
               "32", "--strategy", "zero2", "--world-size", "2", "--json", "--budget-gib", "1"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert {"per_rank_peak_bytes", "world_size", "strategy", "min_world_size", "components"} <= set(doc)
    assert (doc["strategy"], doc["world_size"], doc["min_world_size"]) == ("zero2", 2, 1)
    assert sum(doc["components"].values()) == doc["per_rank_peak_bytes"]
    rc = main(["estimate", f"--model={model}", "--targets", "q_proj,v_proj", "--strategy", "fsdp", "--world-size",
               "2", "--budget-gib", "0.0001", "--batch-size", "2", "--seq-len", "32"])
    out = capsys.readouterr().out
    assert rc == 1 and "does NOT fit" in out and "smallest world size that fits: none" in out

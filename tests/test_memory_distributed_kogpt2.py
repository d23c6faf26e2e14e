"""The issue's done criterion on the full-size KoGPT-2 config: FSDP2 on 4 ranks < 2 ranks < one GPU per rank,
with the sharded frozen weights in the components (two traces of ~15 s: a module of its own)."""
from __future__ import annotations

from structure_configs import KO_D, KO_LAYERS, KO_POS, KO_VOCAB, kogpt2_config


def _spec(strategy: str, n: int):
    from kolora_probe.plan.schema import DistributedSpec

    return DistributedSpec(strategy=strategy, world_size=n)


def test_full_size_kogpt2_fsdp_4_below_2_below_one_gpu():
    """b2 × s256 (at b1 × s64 two ranks are above one GPU: the root's tied embedding is all-gathered and copied
    out while the logits are live)."""
    from kolora_probe.memory.distributed import rank_estimate
    from kolora_probe.memory.trace import StepShape, trace_step

    shape = StepShape(batch_size=2, seq_len=256, targets=("c_attn", "c_proj", "c_fc"))
    config = kogpt2_config()
    single = trace_step(config, shape)
    two = rank_estimate(config, shape, _spec("fsdp", 2), single=single)
    four = rank_estimate(config, shape, _spec("fsdp", 4), single=single)
    assert four.per_rank_peak_bytes < two.per_rank_peak_bytes < single.predicted_peak_bytes
    weights = 4 * (KO_VOCAB * KO_D + KO_POS * KO_D + KO_LAYERS * 12 * KO_D * KO_D)   # fp32 matrices, ~0.5 GB
    assert weights / 4 * 0.98 < four.components["frozen_weights_sharded"] < weights / 4 * 1.05

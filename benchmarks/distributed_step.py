"""One real DDP LoRA step per rank, measured, beside the per-rank prediction (CPU semantics on the CPU).

    torchrun --standalone --nproc-per-node 2 benchmarks/distributed_step.py --model=DIR [--targets q_proj,v_proj]
        [--batch-size 2 --seq-len 32 --lora-r 8] [--output FILE]

Rank 0 prints (and writes to --output) JSON: per rank the measured peak and the prediction
(:func:`kolora_probe.memory.distributed.rank_estimate`, strategy ddp, on a CPU-semantics trace).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from kolora_probe.memory.distributed import measure_ddp_step, rank_estimate
    from kolora_probe.memory.trace import StepShape, trace_step
    from kolora_probe.model.source import resolve_config
    from kolora_probe.plan.schema import DistributedSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--output")
    a = ap.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    _, config = resolve_config(a.model, "main")
    shape = StepShape(batch_size=a.batch_size, seq_len=a.seq_len, targets=tuple(a.targets.split(",")), r=a.lora_r,
                      alpha=2.0 * a.lora_r, lora_dropout=0.0)
    m = measure_ddp_step(config, shape, "cpu")
    rows: list = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "measured_bytes": m.peak_allocated_bytes,
                                  "baseline_bytes": m.baseline_bytes})
    if rank == 0:
        single = trace_step(config, shape, cuda=False)
        pred = rank_estimate(config, shape, DistributedSpec(strategy="ddp", world_size=world), single=single)
        doc = {"world_size": world, "shape": shape.describe(), "predicted_bytes": pred.per_rank_peak_bytes,
               "components": dict(pred.components), "single_gpu_bytes": single.predicted_peak_bytes,
               "ranks": rows}
        text = json.dumps(doc, indent=2)
        print(text)
        if a.output:
            Path(a.output).write_text(text, encoding="utf-8")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

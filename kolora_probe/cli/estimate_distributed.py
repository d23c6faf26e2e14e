"""``kolora-probe estimate --strategy S --world-size N``: the per-rank peak of one training step under DDP,
FSDP2 or DeepSpeed ZeRO (:mod:`kolora_probe.memory.distributed`), by component, against the per-GPU budget, with
the smallest world size that fits. Exit 0 fits, 1 does not fit, 2 bad input (as ``estimate``)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from kolora_probe.cli.analyze import fail, table

GIB = 2 ** 30
MIB = 2 ** 20


def run_distributed(args: argparse.Namespace, plan: Any) -> int:
    from kolora_probe.distributed.config import resolve_distributed
    from kolora_probe.memory.budget import check_targets
    from kolora_probe.memory.distributed import min_world_size, rank_estimate
    from kolora_probe.memory.trace import StepShape
    from kolora_probe.model.source import resolve_config

    plan = resolve_distributed(plan)   # PlanError (bad accelerate / DeepSpeed file) → one line, exit 2
    dist = plan.distributed
    source, config = resolve_config(plan.model.id, plan.model.revision)
    problem = check_targets(config, plan)
    if problem:
        return fail("estimate", problem)
    method = "closed_form" if getattr(args, "method", "trace") == "closed-form" else "trace"
    shape = StepShape.from_plan(plan)
    est = rank_estimate(config, shape, dist, method=method)
    budget = plan.budget_bytes
    fits = est.per_rank_peak_bytes <= budget
    smallest = min_world_size(config, shape, dist, budget, est, method)
    doc = est.to_dict()
    doc.update({"min_world_size": smallest, "budget_bytes": budget, "fits": fits,
                "headroom_bytes": budget - est.per_rank_peak_bytes, "per_rank_batch_size": shape.batch_size,
                "model": {"id": plan.model.id, "revision": plan.model.revision, "source": source.kind,
                          "path": str(source.path)},
                "plan": plan.source, "distributed": {k: v for k, v in vars(dist).items()}})
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0 if fits else 1
    total = est.per_rank_peak_bytes
    print(f"model: {plan.model.id} @ {plan.model.revision} ({source.kind}: {source.path})")
    print(f"step per rank: {shape.describe()}")
    print(f"strategy: {est.strategy} on {est.world_size} rank(s), {est.nodes} node(s); method: {est.method} "
          f"({est.wall_s:.2f} s)")
    for note in est.notes:
        print(f"  note: {note}")
    print()
    rows = [[k, f"{b / MIB:,.1f}", f"{100 * b / total:.1f} %" if total else "-"]
            for k, b in est.components.items() if b]
    rows.append(["total (per-rank peak)", f"{total / MIB:,.1f}", "100.0 %"])
    print(table(["component", "MiB", "share"], rows))
    print()
    print(f"one GPU (no strategy): {est.single_gpu.predicted_peak_bytes / GIB:.3f} GiB; per rank with "
          f"{est.strategy} × {est.world_size}: {total / GIB:.3f} GiB")
    if est.offloaded_bytes:
        print(f"offloaded to host memory per rank: {est.offloaded_bytes / GIB:.3f} GiB")
    print(f"budget per GPU: {budget / GIB:.3f} GiB — " + ("fits" if fits else "does NOT fit")
          + f" (headroom {(budget - total) / GIB:+.3f} GiB)")
    print("smallest world size that fits: " + (str(smallest) if smallest else
          "none (activations, logits and workspace alone exceed the budget: lower [training].batch_size or "
          "seq_len, or enable gradient checkpointing)"))
    return 0 if fits else 1

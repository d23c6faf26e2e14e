"""``kolora-probe estimate``: predicted peak GPU memory of one training step of the plan, by component, against
the budget, with the largest batch size (and sequence length) that fits.

Needs only the model's ``config.json``. Exit 0 when the step fits the budget, 1 when it does not, 2 when the plan,
the model or the targets are invalid.
"""
from __future__ import annotations

import argparse
import json

from .cli_analyze import fail, table

HELP = "predict the peak GPU memory of one LoRA/QLoRA training step and check it against the budget"
GIB = 2 ** 30
MIB = 2 ** 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .plan_options import add_plan_options

    add_plan_options(p.add_argument)
    p.add_argument("--method", choices=("trace", "closed-form"), default="trace",
                   help="trace: one step on fake tensors (seconds); closed-form: the documented formula (instant)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from .plan_options import plan_from_namespace

    plan = plan_from_namespace(args)   # PlanError → cli.py prints one line per problem, exit 2
    if plan.distributed.strategy != "none" or plan.distributed.config:
        from .cli_estimate_distributed import run_distributed   # per-rank memory (DDP, FSDP2, ZeRO)

        return run_distributed(args, plan)
    from .model_source import resolve_config

    source, config = resolve_config(plan.model.id, plan.model.revision)  # errors: one line, exit 2 (cli.py)
    from .memory_budget import check_targets

    problem = check_targets(config, plan)
    if problem:
        return fail("estimate", problem)
    from .memory_budget import budget_verdict
    from .memory_trace import StepShape

    method = "closed_form" if args.method == "closed-form" else "trace"
    v = budget_verdict(config, StepShape.from_plan(plan), plan.budget_bytes, method)
    doc = v.to_dict()
    doc["model"] = {"id": plan.model.id, "revision": plan.model.revision, "source": source.kind,
                    "path": str(source.path)}
    doc["plan"] = plan.source
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0 if v.fits else 1

    e = v.estimate
    print(f"model: {plan.model.id} @ {plan.model.revision} ({source.kind}: {source.path})")
    print(f"step: {e.shape.describe()}")
    print(f"method: {e.method} ({e.wall_s:.2f} s){' — ' + '; '.join(e.notes) if e.notes else ''}")
    print()
    total = e.predicted_peak_bytes
    rows = [[k, f"{b / MIB:,.1f}", f"{100 * b / total:.1f} %" if total else "-"]
            for k, b in e.components.items() if b]
    rows.append(["total (predicted peak)", f"{total / MIB:,.1f}", "100.0 %"])
    print(table(["component", "MiB", "share"], rows))
    print()
    print(f"peak at: {e.peak_phase}, {e.peak_op}")
    print(f"predicted peak: {total / GIB:.3f} GiB ({total:,} bytes; what torch.cuda.max_memory_allocated() would "
          f"report; CUDA context and allocator slack not included)")
    print(f"budget: {v.budget_bytes / GIB:.3f} GiB — " + ("fits" if v.fits else "does NOT fit")
          + f" (headroom {v.headroom_bytes / GIB:+.3f} GiB)")
    print(f"largest batch size that fits at seq {e.shape.seq_len}: {v.max_batch_size}")
    lim = f" (model limit {v.seq_limit})" if v.seq_limit else ""
    print(f"largest sequence length that fits at batch {e.shape.batch_size}: {v.max_seq_len}{lim}")
    if not v.fits:
        print(v.message())
    return 0 if v.fits else 1

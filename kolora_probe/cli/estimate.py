"""``kolora-probe estimate``: predicted peak GPU memory of one training step of the plan, by component, against
the budget, with the largest batch size (and sequence length) that fits.

Needs only the model's ``config.json``. Exit 0 when the step fits the budget, 1 when it does not, 2 when the plan,
the model or the targets are invalid.
"""
from __future__ import annotations

import argparse
import json

from kolora_probe.report import strict_json
from kolora_probe.cli.analyze import fail, table

HELP = "predict the peak GPU memory of one LoRA/QLoRA training step and check it against the budget"
GIB = 2 ** 30
MIB = 2 ** 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kolora_probe.plan.options import add_plan_options

    add_plan_options(p.add_argument)
    p.add_argument("--method", choices=("trace", "closed-form"), default="trace",
                   help="trace: one step on fake tensors (seconds); closed-form: the documented formula (instant)")
    p.add_argument("--max-batch", "--search", dest="search", action="store_true",
                   help="confirm the largest batch size and sequence length that fit with traces even when the plan "
                        "fits (at most 8 more traces each; without it they are traced only when the plan does not "
                        "fit, and otherwise estimated from the closed form scaled to the plan's trace)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from kolora_probe.plan.options import plan_from_namespace

    plan = plan_from_namespace(args)   # PlanError → cli.py prints one line per problem, exit 2
    if plan.distributed.strategy != "none" or plan.distributed.config:
        from kolora_probe.cli.estimate_distributed import run_distributed   # per-rank memory (DDP, FSDP2, ZeRO)

        return run_distributed(args, plan)
    from kolora_probe.model.source import resolve_config

    source, config = resolve_config(plan.model.id, plan.model.revision)  # errors: one line, exit 2 (cli.py)
    from kolora_probe.plan.feasibility import first_gpu, plan_model_problems

    problems = plan_model_problems(config, plan, plan.model.id, first_gpu())   # before anything is computed
    if problems:
        return fail("estimate", "plan cannot run on this model: " + "; ".join(problems))
    from kolora_probe.memory.budget import check_targets

    problem = check_targets(config, plan)
    if problem:
        return fail("estimate", problem)
    from kolora_probe.memory.budget import budget_verdict
    from kolora_probe.memory.trace import StepShape

    method = "closed_form" if args.method == "closed-form" else "trace"
    v = budget_verdict(config, StepShape.from_plan(plan), plan.budget_bytes, method, search=args.search)
    doc = v.to_dict()
    doc["model"] = {"id": plan.model.id, "revision": plan.model.revision, "source": source.kind,
                    "path": str(source.path)}
    doc["plan"] = plan.source
    doc["plan_notes"] = list(plan.notes)
    if args.json:
        print(strict_json.dumps(doc, indent=2, ensure_ascii=False))
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
    print(f"predicted peak allocated: {total / GIB:.3f} GiB ({total:,} bytes; what torch.cuda.max_memory_allocated() "
          f"would report)")
    print(f"+ allocator overhead:     {v.allocator_overhead_bytes / GIB:.3f} GiB (the step's allocations replayed through "
          f"the CUDA caching allocator's rules: rounding, segments, fragmentation)")
    print(f"+ CUDA context:           {v.cuda_context_bytes / GIB:.3f} GiB (documented figure for this torch; "
          f"measured by -m gpu)")
    if e.paged_optimizer_bytes:
        print(f"  (paged optimizer states {e.paged_optimizer_bytes / GIB:.3f} GiB in CUDA managed memory, evictable "
              f"to host RAM: not counted)")
    print(f"= card needs:             {v.card_required_bytes / GIB:.3f} GiB")
    print(f"budget: {v.budget_bytes / GIB:.3f} GiB — " + ("fits" if v.fits else "does NOT fit")
          + f" (headroom {v.headroom_bytes / GIB:+.3f} GiB)")
    how = (" (≈: closed form scaled to the plan's trace; --max-batch confirms with traces)"
           if v.limits_approximate else "")
    approx = "≈" if v.limits_approximate else ""
    print(f"largest batch size that fits at seq {e.shape.seq_len}: {approx}{v.max_batch_size}{how}")
    lim = f" (model limit {v.seq_limit})" if v.seq_limit else ""
    print(f"largest sequence length that fits at batch {e.shape.batch_size}: {approx}{v.max_seq_len}{lim}")
    if v.traces:
        print(f"searches: {v.traces} more traces, {v.search_s:.1f} s")
    for note in plan.notes:
        print(f"plan note: {note}")
    if not v.fits:
        print(v.message())
    return 0 if v.fits else 1

"""``kolora-probe lora``: exact trainable-parameter count of a LoRA plan, analytic and by PEFT, with findings.

Needs only the model's ``config.json``. Exit 0 when the analytic and PEFT counts agree and equal the expected
count where one applies (``--expected-trainable``, or the plan's value unless --targets/--r change the LoRA
shape), 1 when they do not, 2 when the model cannot be found or the targets do not match.
"""
from __future__ import annotations

import argparse
import json

from kolora_probe.report import strict_json
from kolora_probe.cli.analyze import fail, grouped_rows, layer_table, table, tensor_groups

HELP = "count LoRA trainable parameters for --targets/--r (analytic and PEFT) and report the consequences"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kolora_probe.plan.options import add_plan_options

    add_plan_options(p.add_argument)
    p.add_argument("--json", action="store_true", help="print JSON")


def _expected_applies(args: argparse.Namespace) -> bool:
    """The plan's expected count is compared when given explicitly, or when the plan's LoRA shape is unchanged."""
    if getattr(args, "plan_expected_trainable", None) is not None:
        return True
    return all(getattr(args, d, None) is None for d in ("plan_targets", "plan_r", "plan_target_parameters"))


def parameter_table(rows) -> str:
    """LoRA on weight tensors (PEFT target_parameters), one row per name pattern."""
    return table(["weight tensor (target_parameters)", "kind", "shape", "lora_params"],
                 [[pat, kind, shape, f"{n:,}"] for pat, kind, shape, n in
                  tensor_groups((p.name, p.module_kind, p.shape, p.lora_params) for p in rows)])


def run(args: argparse.Namespace) -> int:
    from kolora_probe.plan.options import plan_from_namespace

    plan = plan_from_namespace(args, budget_required=False)   # PlanError → cli.py: one line per problem, exit 2
    from kolora_probe.model.source import resolve_config

    source, config = resolve_config(plan.model.id, plan.model.revision)  # errors: one line, exit 2 (cli.py)
    from kolora_probe.lora.count import TargetError, count_lora, echo_list
    from kolora_probe.model.meta import build_meta_model

    lo = plan.lora
    try:
        c = count_lora(build_meta_model(config), lo.target_modules, lo.r, lo.alpha, lo.bias, lo.modules_to_save,
                       target_parameters=lo.target_parameters)
    except TargetError as exc:
        return fail("lora", str(exc))
    expected = lo.expected_trainable_params if _expected_applies(args) else None
    ok = c.agrees_with_peft and (expected is None or expected == c.trainable_params)
    doc = c.to_dict()
    doc["model"] = {"id": plan.model.id, "revision": plan.model.revision, "source": source.kind,
                    "path": str(source.path)}
    doc["expected_trainable_params"] = expected
    doc["notes"] = list(plan.notes)
    doc["ok"] = ok
    if args.json:
        print(strict_json.dumps(doc, indent=2, ensure_ascii=False))
        return 0 if ok else 1

    print(f"model: {plan.model.id} @ {plan.model.revision} ({source.kind}: {source.path})")
    print(f"LoRA: targets={echo_list(c.targets)} r={c.r} alpha={c.alpha:g} bias={c.bias}"
          + (f" modules_to_save={list(c.modules_to_save)}" if c.modules_to_save else "")
          + (f" target_parameters={list(c.target_parameters)}" if c.target_parameters else ""))
    print()
    print(layer_table(grouped_rows(doc["modules"]), "lora_params"))
    if c.parameters:
        print()
        print(parameter_table(c.parameters))
    print()
    print(f"trainable parameters: {c.trainable_params:,} (analytic: LoRA {c.lora_params:,}"
          + (f" + bias {c.bias_params:,}" if c.bias_params else "")
          + (f" + modules_to_save {c.modules_to_save_params:,}" if c.modules_to_save_params else "") + ")")
    peft = f"{c.peft_trainable_params:,}" if c.peft_trainable_params is not None else "not computed"
    print(f"PEFT get_nb_trainable_parameters(): {peft} trainable of {c.peft_all_params or 0:,} — "
          + ("agrees" if c.agrees_with_peft else "DISAGREES with the analytic count"))
    print(f"total parameters: {c.total_params:,} (base model, shared counted once); with adapter {c.all_params:,}")
    print(f"trainable: {c.trainable_percent:.4f} % of all parameters ({c.trainable_percent_of_base:.4f} % of the base)")
    if expected is not None:
        print(f"expected (plan): {expected:,} — " + ("matches" if expected == c.trainable_params else
              f"MISMATCH (actual {c.trainable_params:,}); fix [lora].expected_trainable_params or the targets"))
    for note in plan.notes:
        print(f"note: {note}")
    print(f"adapter size: ≈ {c.adapter_bytes / 1e6:.1f} MB")
    if c.findings:
        print("findings:")
        for f in c.findings:
            print(f"  [{f.severity}] {f.message}")
    return 0 if ok else 1

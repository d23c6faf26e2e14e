"""``kolora-probe analyze``: the model's adaptable layers by role, tied parameters and suggested LoRA targets.

Needs only the model's ``config.json`` (the model is built on the meta device: no weights, no memory).
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from kolora_probe.report import strict_json

HELP = "list a model's LoRA-adaptable layers (attention / MLP / head), tied parameters and suggested targets"
DEFAULT_R = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id or local directory (only config.json is needed); default: the default plan's model")
    p.add_argument("--revision", default="main", help="hub revision (default: main)")
    p.add_argument("--r", type=int, default=DEFAULT_R,
                   help=f"LoRA rank used for the per-layer lora_params column (default: {DEFAULT_R})")
    p.add_argument("--json", action="store_true", help="print JSON")


def pattern(name: str) -> str:
    """Layer name with block indices replaced by ``*`` (``transformer.h.*.attn.c_attn``)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def grouped_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold per-layer rows (name, kind, in/out, role, lora_params) into one row per name pattern."""
    groups: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r.get("role", ""), pattern(r["name"]), r["kind"], r["in_features"], r["out_features"])
        g = groups.setdefault(key, {"role": key[0], "pattern": key[1], "kind": key[2], "in_features": key[3],
                                    "out_features": key[4], "count": 0, "lora_params": 0})
        g["count"] += 1
        g["lora_params"] += int(r.get("lora_params", 0))
    return list(groups.values())


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    right = [all(re.fullmatch(r"[\d,.%]+", r[i] or "0") for r in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(row, widths, right)).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


def layer_table(groups: list[dict[str, Any]], params_header: str) -> str:
    """The per-pattern table of :func:`grouped_rows` (role, layers ×count, kind, in, out, LoRA parameters)."""
    return table(["role", "layers", "kind", "in", "out", params_header],
                 [[g["role"], f"{g['pattern']} ×{g['count']}", g["kind"], g["in_features"], g["out_features"],
                   f"{g['lora_params']:,}"] for g in groups])


def tensor_groups(rows: Any) -> list[tuple[str, str, str, int]]:
    """(name pattern ×count, module kind, shape, summed value) for (name, module kind, shape, value) rows."""
    groups: dict[tuple, list[int]] = {}
    for name, kind, shape, value in rows:
        groups.setdefault((pattern(name), kind, "×".join(map(str, shape))), []).append(value)
    return [(f"{pat} ×{len(vs)}", kind, shape, sum(vs)) for (pat, kind, shape), vs in groups.items()]


def fused_note(rep: Any) -> str:
    """The weight matrices ``target_modules`` cannot reach (mixture-of-experts tensors, routers), by pattern."""
    share = 100.0 * rep.fused_params / rep.total_params if rep.total_params else 0.0
    lines = [f"not reachable by target_modules: {rep.fused_params:,} parameters ({share:.1f} %) in weight tensors "
             f"held by modules LoRA cannot wrap (PEFT adapts them only through LoraConfig(target_parameters=...)):"]
    for pat, kind, shape, n in tensor_groups((f.name, f.module_kind, f.shape, f.numel) for f in rep.fused):
        lines.append(f"  {pat}  {kind}  {shape}  {n:,} parameters")
    return "\n".join(lines)


def fail(command: str, message: str) -> int:
    print(f"kolora-probe {command}: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from kolora_probe.model.source import resolve_config

    model_id = args.model
    if model_id is None:
        from kolora_probe.plan.schema import default_plan

        model_id = default_plan().model.id
    if args.r < 1:
        return fail("analyze", f"--r {args.r} is invalid; expected an integer >= 1")
    source, config = resolve_config(model_id, args.revision)  # errors: one line, exit 2 (cli.py)
    from kolora_probe.lora.count import count_lora
    from kolora_probe.model.meta import build_meta_model
    from kolora_probe.model.structure import analyze_model

    model = build_meta_model(config)
    rep = analyze_model(model)
    doc = rep.to_dict()
    doc["model"] = {"id": model_id, "revision": args.revision, "source": source.kind, "path": str(source.path)}
    doc["r"] = args.r
    for row in doc["layers"]:
        row["lora_params"] = args.r * (row["in_features"] + row["out_features"])
    doc["modules"] = doc["layers"]
    doc["trainable_params"] = rep.total_params       # without an adapter every parameter is trainable
    doc["trainable_percent"] = 100.0 if rep.total_params else 0.0
    for s in doc["suggested_targets"]:
        c = count_lora(model, s["targets"], args.r, report=rep, peft_model_factory=lambda: None)
        s["trainable_params"] = c.trainable_params
        s["trainable_percent"] = round(c.trainable_percent, 6)
    if args.json:
        print(strict_json.dumps(doc, indent=2, ensure_ascii=False))
        return 0

    print(f"model: {model_id} @ {args.revision} ({source.kind}: {source.path})")
    print(f"architecture: {rep.architecture} (model_type {rep.model_type or '?'}, rules: {rep.family})")
    print(f"total parameters: {rep.total_params:,} (shared parameters counted once"
          + (f"; {rep.total_params_if_untied:,} if the ties were lost)" if rep.tied_groups else ")"))
    for g in rep.tied_groups:
        print(f"tied: {' = '.join(g.names)} ({g.numel:,} parameters)")
    print()
    rows = grouped_rows(doc["layers"])
    order = {r: i for i, r in enumerate(("attention", "mlp", "other", "output_head", "embedding"))}
    rows.sort(key=lambda g: (order.get(g["role"], 9), g["pattern"]))
    print(layer_table(rows, f"LoRA r={args.r} params"))
    print()
    if rep.fused:
        print(fused_note(rep))
        print()
    print(f"suggested LoRA target sets (r={args.r}):")
    for s in doc["suggested_targets"]:
        print(f"  {s['name']:<24} --targets {','.join(s['targets'])}  ({s['modules']} layers, "
              f"{s['trainable_params']:,} trainable = {s['trainable_percent']:.4f} %)")
    heads = [l for l in rep.layers if l.role == "output_head"]
    if heads:
        h = heads[0]
        print(f"  {'output head':<24} --targets {h.leaf}  (1 layer, {args.r * (h.in_features + h.out_features):,}"
              f" trainable{'; tied to ' + ', '.join(h.tied_with) if h.tied_with else ''})")
    return 0

"""``kolora-probe plan show``: the effective plan (file(s) + overrides) as a kolora-probe TOML plan, each value
commented with where it came from (file key, command-line option, format default, kolora-probe default).

``--plan`` takes the kolora-probe TOML or the user's own training config (PEFT adapter_config.json, axolotl,
LLaMA-Factory, TRL/transformers training arguments; see :mod:`kolora_probe.plan.formats`). Exit 0, 2 on bad input.
A missing budget is shown as not set instead of failing (``plan show`` never uses it).
"""
from __future__ import annotations

import argparse

HELP = "show the effective plan (from --plan files and overrides) as TOML, with the source of every value"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kolora_probe.plan.options import add_plan_options

    sub = p.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help=HELP, description=HELP)
    add_plan_options(show.add_argument)


def run(args: argparse.Namespace) -> int:
    from kolora_probe.plan.formats import plan_toml
    from kolora_probe.plan.options import plan_from_namespace

    plan = plan_from_namespace(args, budget_required=False)   # PlanError → cli.py: one line per problem, exit 2
    print(plan_toml(plan), end="")
    return 0

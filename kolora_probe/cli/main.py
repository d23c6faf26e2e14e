"""``kolora-probe`` command line: one subcommand per module ``kolora_probe/cli/<name>.py``.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``, and
imports heavy libraries (torch, transformers) only inside ``run`` so ``--help`` stays instant.
"""
from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import sys

from kolora_probe.model.source import ModelConfigError, ModelNotFound, RemoteCodeRefused
from kolora_probe.plan.schema import PlanError

# At interpreter exit the cyclic collector would scan torch's, transformers' and peft's module state (millions of
# objects, none of it garbage) in several passes: ~0.5-0.9 s per command. Frozen, they are skipped; objects are still
# released by reference counting and module teardown. Registered once, when the command line is imported.
atexit.register(gc.freeze)

SUBCOMMANDS = ("check", "env", "analyze", "lora", "estimate", "monitor", "plan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kolora-probe",
                                     description="Validate a machine, model and LoRA/QLoRA plan before fine-tuning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"kolora_probe.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kolora_probe.cli.{name}":
                raise
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           add_help=not getattr(module, "PASS_THROUGH", False))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "check":  # every argument is pytest's (with the plugin's options)
        args.pytest_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = int(args._run(args) or 0)
        _hub_note(args.command)
        return code
    except PlanError as exc:
        for line in exc.lines:
            print(f"kolora-probe {args.command}: plan error: {line}", file=sys.stderr)
        return 2
    except (ModelNotFound, RemoteCodeRefused, ModelConfigError) as exc:
        print(f"kolora-probe {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kolora-probe {args.command}: interrupted", file=sys.stderr)
        return 130


def _hub_note(command: str) -> None:
    """Say once, on stderr, that the hub was unreachable and the run went offline (a not-found error says it)."""
    from kolora_probe.model.source import hub_status

    status = hub_status(probe=False)
    if status is not None and not status.reachable:
        print(f"kolora-probe {command}: note: {status.describe()}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

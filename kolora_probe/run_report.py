"""The JSON environment report (``reports/environment.json``): machine facts, plan, and per-check outcomes."""
from __future__ import annotations

import datetime as _dt
import time
from collections import Counter, defaultdict
from typing import Any

from . import __version__
from .environment import collect_environment
from .plan import Plan

SCHEMA_VERSION = 1


def family_summary(checks: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Counts of outcomes per requirement family, e.g. {"environment": {"passed": 12, "failed": 1}}."""
    out: dict[str, Counter] = defaultdict(Counter)
    for c in checks:
        out[c.get("family", "other")][c.get("outcome", "unknown")] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def build_run_document(*, plan: Plan | None, plan_errors: list[str], overrides: dict[str, Any],
                       checks: list[dict[str, Any]], exitstatus: int | None, started: float,
                       markexpr: str) -> dict[str, Any]:
    counts = Counter(c["outcome"] for c in checks)
    try:
        env = collect_environment().to_dict()
    except Exception as exc:  # noqa: BLE001 - the report is written whatever else broke
        env = {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "kolora-probe", "version": __version__},
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 2),
        "exit_status": exitstatus,
        "interrupted": exitstatus == 2,
        "selection": markexpr,
        "plan": plan.to_dict() if plan is not None else None,
        "plan_errors": list(plan_errors),
        "overrides": overrides,
        "environment": env,
        "summary": {"total": len(checks), **{k: counts.get(k, 0) for k in ("passed", "failed", "error", "skipped")},
                    "families": family_summary(checks)},
        "checks": checks,
    }

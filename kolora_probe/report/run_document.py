"""The JSON environment report (``reports/environment.json``): machine facts, plan, and per-check outcomes."""
from __future__ import annotations

import datetime as _dt
import re
import time
from collections import Counter, defaultdict
from typing import Any

from kolora_probe import __version__
from kolora_probe.env.facts import collect_environment
from kolora_probe.plan.schema import Plan

SCHEMA_VERSION = 1
MAX_LIST_ITEMS = 1000      # a plan's list (e.g. 200,000 target modules) is kept to this many items in the report
MAX_STRING_CHARS = 10_000  # and a plan's string to this many characters


_CUT = "… {left:,} more of {total:,} items not shown"   # the last item of a list bounded() cut


def bounded_list_total(items: list) -> tuple[list, int]:
    """(the items shown, how many the list had) of a list as :func:`bounded` left it."""
    items = list(items)
    cut = re.fullmatch(r"… [\d,]+ more of ([\d,]+) items not shown", items[-1]) if items and isinstance(
        items[-1], str) else None
    if cut:
        return items[:-1], int(cut.group(1).replace(",", ""))
    return items, len(items)


def bounded(value: Any, max_items: int = MAX_LIST_ITEMS, max_chars: int = MAX_STRING_CHARS) -> Any:
    """``value`` (JSON-like) with every list longer than ``max_items`` cut to its first ``max_items`` items plus
    one string saying how many were left out, and every string longer than ``max_chars`` cut likewise: the
    report of a plan with a huge target list stays readable and small; the checks see the whole plan."""
    if isinstance(value, dict):
        return {k: bounded(v, max_items, max_chars) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [bounded(v, max_items, max_chars) for v in value[:max_items]]
        if len(value) > max_items:
            items.append(_CUT.format(left=len(value) - max_items, total=len(value)))
        return items
    if isinstance(value, str) and len(value) > max_chars:
        return value[:max_chars] + f"… ({len(value) - max_chars:,} more characters not shown)"
    return value


def family_summary(checks: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Counts of outcomes per requirement family, e.g. {"environment": {"passed": 12, "failed": 1}}."""
    out: dict[str, Counter] = defaultdict(Counter)
    for c in checks:
        out[c.get("family", "other")][c.get("outcome", "unknown")] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def root_causes(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed checks grouped by root cause: each failure that is not "blocked" by another check, with the
    checks it blocked and the checks that failed with the very same message; blocked checks whose owner did not
    run form a group of their own."""
    failed = [c for c in checks if c.get("outcome") in ("failed", "error")]
    name = lambda c: c["nodeid"].split("::")[-1].split("[")[0]  # noqa: E731
    groups: list[dict[str, Any]] = []
    by_owner: dict[str, dict[str, Any]] = {}
    by_message: dict[str, dict[str, Any]] = {}
    for c in failed:
        if not c.get("blocked_by"):
            same = by_message.get(c.get("message", ""))
            if same is not None:  # e.g. every GPU check on a machine without one: one cause, listed once
                same["same_cause"].append(c["nodeid"])
                by_owner.setdefault(name(c), same)
                continue
            g = {"check": c["nodeid"], "message": c.get("message", ""), "blocked": [], "same_cause": []}
            groups.append(g)
            by_owner.setdefault(name(c), g)
            by_message[g["message"]] = g
    for c in failed:
        owner = c.get("blocked_by")
        if owner:
            g = by_owner.get(owner)
            if g is None:
                g = by_owner[owner] = {"check": f"{owner} (not run)", "message": c.get("message", ""), "blocked": [],
                                       "same_cause": []}
                groups.append(g)
            g["blocked"].append(c["nodeid"])
    return groups


def verdict(*, checks: list[dict[str, Any]], plan_errors: list[str], interrupted: bool,
            interrupt_reason: str | None = None, problems: list[str] | None = None) -> dict[str, str]:
    """READY / NOT READY / INCOMPLETE, and the sentence that says why."""
    counts = Counter(c["outcome"] for c in checks)
    failed = counts.get("failed", 0) + counts.get("error", 0)
    if interrupted:
        return {"status": "INCOMPLETE", "text": f"INCOMPLETE: the run was interrupted ({interrupt_reason or 'stopped'})"
                f" after {len(checks)} check(s), {failed} failed; run it again to the end for a verdict"}
    if failed:
        return {"status": "NOT READY", "text": f"NOT READY: {failed} check(s) failed"}
    if plan_errors or problems:
        return {"status": "NOT READY", "text": "NOT READY: " + "; ".join([*plan_errors, *(problems or [])])}
    if not checks:
        return {"status": "NOT READY", "text": "NOT READY: no check ran"}
    return {"status": "READY", "text": "READY: every selected requirement passed"}


def build_run_document(*, plan: Plan | None, plan_errors: list[str], overrides: dict[str, Any],
                       checks: list[dict[str, Any]], exitstatus: int | None, started: float,
                       markexpr: str, interrupt_reason: str | None = None,
                       problems: list[str] | None = None) -> dict[str, Any]:
    """``interrupt_reason``: set when the run stopped early (SIGINT/SIGTERM); ``problems``: run-level failures
    outside any check (e.g. an unwritable reports directory)."""
    counts = Counter(c["outcome"] for c in checks)
    interrupted = exitstatus == 2 or interrupt_reason is not None
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
        "interrupted": interrupted,
        "interrupt_reason": interrupt_reason,
        "verdict": verdict(checks=checks, plan_errors=plan_errors, interrupted=interrupted,
                           interrupt_reason=interrupt_reason, problems=problems),
        "problems": list(problems or []),
        "selection": markexpr,
        "plan": bounded(plan.to_dict()) if plan is not None else None,
        "plan_errors": list(plan_errors),
        "overrides": bounded(overrides),
        "environment": env,
        "summary": {"total": len(checks), **{k: counts.get(k, 0) for k in ("passed", "failed", "error", "skipped")},
                    "families": family_summary(checks)},
        "root_causes": root_causes(checks),
        "checks": checks,
    }

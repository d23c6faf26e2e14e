"""The ten-second summary at the top of the HTML report, rendered from the run document (run_report).

Shown without a click: the verdict, the plan, the trainable count, predicted (and measured) peak memory against
the budget with the breakdown chart, the largest batch and sequence length that fit, the LoRA findings, and the
failures grouped by root cause. Numbers carry human units beside the raw value.
"""
from __future__ import annotations

import html
from typing import Any

_STYLE = """<style>
body{display:flex;flex-direction:column}
body>h1{order:-3} body>p:first-of-type{order:-2} body>.summary{order:-1}
.summary__data{flex:1 1 auto}
.kp-summary{font-family:sans-serif;margin:8px 0 16px 0;color:#222;font-size:14px}
.kp-summary h3{margin:14px 0 4px 0}
.kp-summary table{border-collapse:collapse;margin:4px 0 10px 0}
.kp-summary td,.kp-summary th,.kp-evidence td,.kp-evidence th{border:1px solid #ccc;padding:3px 8px;text-align:left;
 vertical-align:top}
.kp-evidence{border-collapse:collapse;margin:4px 0}
.kp-num{text-align:right;font-variant-numeric:tabular-nums}
.kp-pass{background:#dff0d8}.kp-fail{background:#f2dede}.kp-skip{background:#fcf8e3}.kp-warn{background:#fcf8e3}
.kp-verdict{font-size:1.3em;font-weight:bold;padding:6px 10px;display:inline-block;border-radius:4px}
.kp-chart{max-width:900px;margin:4px 0 10px 0}.kp-chart svg{max-width:100%;height:auto;border:1px solid #ccc}
.kp-blocked{color:#555;font-size:0.95em}
.logwrapper:not(:has(.log)){display:none}
</style>"""
_CLASS = {"READY": "kp-pass", "NOT READY": "kp-fail", "INCOMPLETE": "kp-warn"}


def _e(v: Any) -> str:
    return html.escape(str(v))


def _first(items: Any, n: int = 20) -> str:
    """A list as Python shows it, its first ``n`` items only, and how many more the plan had (the run document
    keeps at most 1,000 of a list: :func:`kolora_probe.report.run_document.bounded`)."""
    from kolora_probe.report.run_document import bounded_list_total

    shown, total = bounded_list_total(items or [])
    more = total - min(n, len(shown))
    return str(shown[:n]) + (f" … and {more:,} more" if more > 0 else "")


def human_bytes(b: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{b / size:,.2f} {unit}"
    return f"{b:,.0f} B"


def human(value: Any, unit: str | None = None) -> str:
    """``1073741824, "bytes"`` → ``1.00 GiB (1,073,741,824 bytes)``; ints get thousands separators; ``None`` → —."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)) and unit == "bytes":
        return f"{human_bytes(value)} ({value:,} bytes)" if isinstance(value, int) else human_bytes(value)
    if isinstance(value, int):
        return f"{value:,}" + (f" {unit}" if unit else "")
    if isinstance(value, float):
        return f"{value:,.6g}" + (f" {unit}" if unit else "")
    if isinstance(value, dict):
        return "; ".join(f"{k}: {human(v, unit)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(human(v, unit) for v in value)
    return str(value) + (f" {unit}" if unit else "")


def _find(doc: dict[str, Any], name: str, where: str = "") -> dict[str, Any] | None:
    """The last evidence row called ``name`` of a check whose node id contains ``where``."""
    found = None
    for c in doc.get("checks", []):
        if where not in c.get("nodeid", ""):
            continue
        for ev in c.get("evidence", []):
            if ev.get("name") == name:
                found = ev
    return found


def _findings(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    for c in doc.get("checks", []):
        for ev in c.get("evidence", []):
            if str(ev.get("name", "")).startswith("finding:"):
                out.append((ev.get("note", ""), ev["name"].split(":", 1)[1], str(ev.get("actual", ""))))
    return out


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def summary_html(doc: dict[str, Any], images: dict[str, str] | None = None) -> str:
    """The summary block; ``images``: title → SVG text of the checks' charts (the memory breakdown), inline."""
    s = doc.get("summary", {})
    v = doc.get("verdict") or {"status": "NOT READY", "text": "NOT READY"}
    parts = [_STYLE, "<div class='kp-summary'>",
             f"<div class='kp-verdict {_CLASS.get(v['status'], 'kp-fail')}'>{_e(v['text'])}</div>"]
    rows: list[tuple[str, str]] = [("Problem", p) for p in doc.get("problems", [])]
    rows += [("Plan error", e) for e in doc.get("plan_errors", [])]
    plan = doc.get("plan")
    if plan:
        m, lo, t, b = plan["model"], plan["lora"], plan["training"], plan["budget"]
        rows += [("Plan", plan.get("source")), ("Model", f"{m['id']} @ {m['revision']}"),
                 ("LoRA", f"r={lo['r']} alpha={lo['alpha']:g} dropout={lo['dropout']:g} "
                          f"targets={_first(lo['target_modules'])}"),
                 ("Training", f"{t['dtype']} (weights {t['weights_dtype']}), quantization {t['quantization']}, "
                              f"batch {t['batch_size']} × seq {t['seq_len']}, grad ckpt {t['gradient_checkpointing']}, "
                              f"{t['optimizer']}"),
                 ("Budget", f"{b['gpu_memory_gib']:g} GiB = {human(int(b['gpu_memory_gib'] * 2**30), 'bytes')}, "
                            f"tolerance {b.get('tolerance_percent', 0):g} %")]
    rows.append(("Selection", doc.get("selection", "")))
    env = doc.get("environment", {})
    tf = env.get("torch") or {}
    gpus = ", ".join(g["name"] for g in tf.get("gpus", [])) or "none visible to torch"
    rows.append(("Machine", f"Python {env.get('python_version')}, torch {tf.get('version')} "
                            f"(CUDA build {tf.get('cuda_build') or 'none'}), GPUs: {gpus}"))
    tp = _find(doc, "trainable_params", "test_lora.py")
    if tp:
        pct = _find(doc, "trainable_percent")
        rows.append(("Trainable parameters", f"{human(tp['actual'])} (expected {human(tp.get('expected'))})"
                     + (f", {pct['actual']:.4g} % of all parameters" if pct and pct.get("actual") is not None
                        else "")))
    ab = _find(doc, "adapter_bytes")
    if ab:
        rows.append(("Adapter size", human(ab["actual"], "bytes")))
    parts.append(_table(rows))

    groups = doc.get("root_causes", [])
    if groups:
        parts.append("<h3>Failures by root cause</h3><table><tr><th>Root cause (failed check)</th><th>Why</th>"
                     "<th>Other checks failing from it</th></tr>")
        for g in groups:
            others = [*g["blocked"], *g.get("same_cause", [])]
            n = len(others)
            blocked = (f"{n} {'check' if n == 1 else 'checks'}: " + ", ".join(_e(x.split("::")[-1]) for x in others)
                       if n else "—")
            parts.append(f"<tr class='kp-fail'><td>{_e(g['check'])}</td><td>{_e(g['message'])}</td>"
                         f"<td class='kp-blocked'>{blocked}</td></tr>")
        parts.append("</table>")

    pred, meas = _find(doc, "predicted_peak_bytes"), _find(doc, "measured_peak_bytes")
    if pred or meas:
        budget = int(plan["budget"]["gpu_memory_gib"] * 2**30) if plan else None
        mem = [("Predicted peak", human(pred["actual"], "bytes") if pred else "—"),
               ("Measured peak (GPU)", human(meas["actual"], "bytes") if meas else "not measured (run -m gpu)")]
        for name, label in (("allocator_overhead_bytes", "+ allocator overhead (predicted)"),
                            ("cuda_context_bytes", "+ CUDA context"),
                            ("card_required_bytes", "= the card needs (decides the verdict)")):
            ev = _find(doc, name)
            if ev:
                mem.append((label, human(ev["actual"], "bytes")))
        mem.append(("Budget", human(budget, "bytes")))
        for name, label in (("max_batch_size", "Largest batch size that fits"),
                            ("max_seq_len", "Largest sequence length that fits")):
            ev = _find(doc, name)
            if ev:
                mem.append((label, human(ev["actual"]) + (f" ({ev['note']})" if ev.get("note") else "")))
        comps = _find(doc, "components")
        if comps and isinstance(comps.get("actual"), dict):
            mem += [(f"· {k}", human_bytes(b) if isinstance(b, (int, float)) else str(b))
                    for k, b in comps["actual"].items()]
        parts.append("<h3>Memory</h3>" + _table(mem))
    for title, svg in (images or {}).items():
        parts.append(f"<div><b>{_e(title)}</b><br><div class='kp-chart' role='img' aria-label='{_e(title)}'>"
                     f"{svg}</div></div>")

    findings = _findings(doc)
    if findings:
        parts.append("<h3>LoRA findings</h3><table><tr><th>severity</th><th>finding</th><th>message</th></tr>"
                     + "".join(f"<tr class='{'kp-warn' if sev == 'warning' else ''}'><td>{_e(sev)}</td>"
                               f"<td>{_e(code)}</td><td>{_e(msg)}</td></tr>" for sev, code, msg in findings)
                     + "</table>")

    fam_rows = []
    for fam, counts in s.get("families", {}).items():
        bad = counts.get("failed", 0) + counts.get("error", 0)
        cls = "kp-fail" if bad else ("kp-pass" if counts.get("passed") else "kp-skip")
        fam_rows.append(f"<tr class='{cls}'><td>{_e(fam)}</td><td>{counts.get('passed', 0)}</td><td>{bad}</td>"
                        f"<td>{counts.get('skipped', 0)}</td></tr>")
    parts.append("<h3>Requirements</h3><table><tr><th>Requirement family</th><th>passed</th><th>failed</th>"
                 "<th>skipped</th></tr>" + "".join(fam_rows) + "</table>")
    parts.append("</div>")
    return "".join(parts)

"""The ten-second summary at the top of the HTML report, rendered from the run document (run_report)."""
from __future__ import annotations

import html
from typing import Any

_STYLE = """<style>
body{display:flex;flex-direction:column}
body>h1{order:-3} body>p:first-of-type{order:-2} body>.summary{order:-1}
.summary__data{flex:1 1 auto}
.kp-summary{font-family:sans-serif;margin:8px 0 16px 0;color:#222}
.kp-summary table{border-collapse:collapse;margin:4px 0 10px 0}
.kp-summary td,.kp-summary th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
.kp-pass{background:#dff0d8}.kp-fail{background:#f2dede}.kp-skip{background:#fcf8e3}
.kp-verdict{font-size:1.3em;font-weight:bold;padding:6px 10px;display:inline-block;border-radius:4px}
</style>"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _gib(b: Any) -> str:
    return f"{b / 2**30:.2f} GiB" if isinstance(b, (int, float)) else "—"


def _find(doc: dict[str, Any], name: str) -> Any:
    for c in doc.get("checks", []):
        for ev in c.get("evidence", []):
            if ev.get("name") == name:
                return ev
    return None


def summary_html(doc: dict[str, Any]) -> str:
    s = doc.get("summary", {})
    failed = s.get("failed", 0) + s.get("error", 0)
    ok = failed == 0 and not doc.get("plan_errors") and s.get("total", 0) > 0
    verdict = ("READY: every selected requirement passed" if ok else
               f"NOT READY: {failed} check(s) failed" if failed else "NOT READY: plan invalid or nothing ran")
    parts = [_STYLE, "<div class='kp-summary'>",
             f"<div class='kp-verdict {'kp-pass' if ok else 'kp-fail'}'>{_e(verdict)}</div>"]

    plan = doc.get("plan")
    rows = []
    if doc.get("plan_errors"):
        rows += [("Plan error", e) for e in doc["plan_errors"]]
    if plan:
        m, lo, t, b = plan["model"], plan["lora"], plan["training"], plan["budget"]
        rows += [("Plan", plan.get("source")), ("Model", f"{m['id']} @ {m['revision']}"),
                 ("LoRA", f"r={lo['r']} alpha={lo['alpha']:g} dropout={lo['dropout']:g} targets={list(lo['target_modules'])}"),
                 ("Training", f"{t['dtype']} (weights {t['weights_dtype']}), quantization {t['quantization']}, "
                              f"batch {t['batch_size']} × seq {t['seq_len']}, grad ckpt {t['gradient_checkpointing']}, "
                              f"{t['optimizer']}"),
                 ("Budget", f"{b['gpu_memory_gib']:g} GiB")]
    env = doc.get("environment", {})
    tf = env.get("torch") or {}
    gpus = ", ".join(g["name"] for g in tf.get("gpus", [])) or "none visible to torch"
    rows += [("Machine", f"Python {env.get('python_version')}, torch {tf.get('version')} "
                         f"(CUDA build {tf.get('cuda_build') or 'none'}), GPUs: {gpus}")]
    tp = _find(doc, "trainable_params")
    if tp:
        pct = _find(doc, "trainable_percent")
        rows.append(("Trainable parameters", f"{tp['actual']:,} (expected {tp.get('expected', '—')})"
                     + (f", {pct['actual']:.4g} %" if pct else "")))
    pred, meas = _find(doc, "predicted_peak_bytes"), _find(doc, "measured_peak_bytes")
    if pred or meas:
        budget = plan["budget"]["gpu_memory_gib"] * 2**30 if plan else None
        rows.append(("Peak memory", f"predicted {_gib(pred['actual']) if pred else '—'}, measured "
                                    f"{_gib(meas['actual']) if meas else 'not measured'}, budget {_gib(budget)}"))
    parts.append("<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>")

    fam_rows = []
    for fam, counts in s.get("families", {}).items():
        bad = counts.get("failed", 0) + counts.get("error", 0)
        cls = "kp-fail" if bad else ("kp-pass" if counts.get("passed") else "kp-skip")
        fam_rows.append(f"<tr class='{cls}'><td>{_e(fam)}</td><td>{counts.get('passed', 0)}</td><td>{bad}</td>"
                        f"<td>{counts.get('skipped', 0)}</td></tr>")
    parts.append("<table><tr><th>Requirement family</th><th>passed</th><th>failed</th><th>skipped</th></tr>"
                 + "".join(fam_rows) + "</table>")
    fails = [c for c in doc.get("checks", []) if c["outcome"] in ("failed", "error")]
    if fails:
        parts.append("<table><tr><th>Failed check</th><th>Why</th></tr>" + "".join(
            f"<tr class='kp-fail'><td>{_e(c['nodeid'])}</td><td>{_e(c['message'])}</td></tr>" for c in fails)
            + "</table>")
    parts.append("</div>")
    return "".join(parts)

"""The plan's LoRA targets: every name matches, analytic == PEFT == expected trainable count, findings reported."""
import warnings

import pytest

from kolora_probe_checks.fixtures_structure import html_table

pytestmark = pytest.mark.cpu


def test_every_target_matches(plan, structure_report, evidence):
    """Each [lora].target_modules name matches at least one adaptable layer (PEFT's suffix rule), and each
    [lora].target_parameters name at least one weight tensor of a module LoRA cannot wrap."""
    from kolora_probe.lora.count import TargetError, resolve_target_parameters, resolve_targets

    try:
        matches = resolve_targets(structure_report, plan.lora.target_modules, plan.lora.modules_to_save)
        matches += resolve_target_parameters(structure_report, plan.lora.target_parameters)
    except TargetError as exc:
        evidence("target_modules", list(plan.lora.target_modules) + list(plan.lora.target_parameters))
        pytest.fail(str(exc), pytrace=False)
    evidence("target_matches", {m.target: len(m.modules) for m in matches})


def test_analytic_count_equals_peft(lora_count, evidence):
    """r·(in+out) summed over the targeted layers (+bias, modules_to_save) == PEFT get_nb_trainable_parameters()."""
    c = lora_count
    evidence("peft_trainable_params", c.peft_trainable_params, expected=c.trainable_params,
             note="expected = analytic count")
    evidence.html("LoRA module table", html_table(
        ["name", "kind", "in_features", "out_features", "role", "lora_params"],
        [[m.name, m.kind, m.in_features, m.out_features, m.role, m.lora_params] for m in c.modules]
        + [[p.name, p.module_kind, p.shape[-1], "×".join(map(str, p.shape[:-1])), "target_parameters",
            p.lora_params] for p in c.parameters]
        + [["total", "", "", "", "", c.trainable_params]]))
    assert c.peft_trainable_params == c.trainable_params, (
        f"PEFT counts {c.peft_trainable_params:,} trainable parameters but the analytic count is "
        f"{c.trainable_params:,} for targets {list(c.targets)}; fix kolora_probe/lora/count.py or report the model")


def test_trainable_params_as_planned(plan, lora_count, evidence):
    """The trainable count equals [lora].expected_trainable_params (when the plan sets it)."""
    c, expected = lora_count, plan.lora.expected_trainable_params
    evidence("trainable_params", c.trainable_params, expected=expected)
    if expected is None:
        why = next((n for n in plan.notes if "expected_trainable_params" in n),
                   "plan sets no [lora].expected_trainable_params")
        pytest.skip(f"{why}; the count is {c.trainable_params:,} — set --expected-trainable to pin it")
    partial = [f.message for f in c.findings if f.code == "partial_kind"]
    assert c.trainable_params == expected, (
        f"trainable parameters {c.trainable_params:,} != expected {expected:,} for targets {list(c.targets)} "
        f"r={c.r}; fix [lora].expected_trainable_params (--expected-trainable) or [lora].target_modules/r"
        + ("; note: " + "; ".join(partial) if partial else ""))


def test_trainable_percent(plan, lora_count, evidence):
    """Trainable share of all parameters (PEFT's trainable%) is consistent with PEFT and with the plan."""
    c = lora_count
    expected_n = plan.lora.expected_trainable_params
    peft_pct = 100.0 * c.peft_trainable_params / c.peft_all_params if c.peft_all_params else None
    expected_pct = (100.0 * expected_n / (c.all_params - c.trainable_params + expected_n)
                    if expected_n is not None else peft_pct)
    evidence("trainable_percent", round(c.trainable_percent, 4),
             expected=round(expected_pct, 4) if expected_pct is not None else None, unit="%",
             note=f"of all {c.all_params:,} parameters incl. the adapter; "
                  f"{c.trainable_percent_of_base:.4f} % of the base {c.total_params:,}")
    assert 0 < c.trainable_percent < 100, f"trainable share {c.trainable_percent:.4f} % is not in (0, 100); fix the targets"
    assert peft_pct is not None and abs(c.trainable_percent - peft_pct) < 1e-6, (
        f"trainable {c.trainable_percent:.4f} % != PEFT's {peft_pct} %; fix kolora_probe/lora/count.py")
    assert abs(c.trainable_percent - expected_pct) < 5e-5, (
        f"trainable {c.trainable_percent:.4f} % != planned {expected_pct:.4f} %; "
        f"fix [lora].expected_trainable_params or the targets")


def test_lora_findings(lora_count, evidence):
    """Consequences of the targets: tied head (adapter saves the embedding), Conv1D fan_in_fan_out, adapter size."""
    c = lora_count
    evidence("adapter_bytes", c.adapter_bytes, unit="bytes")
    for f in c.findings:
        evidence(f"finding:{f.code}", f.message, note=f.severity)
    evidence.html("LoRA findings", html_table(["severity", "finding", "message"],
                                              [[f.severity, f.code, f.message] for f in c.findings]
                                              + [["peft", "warning", w] for w in c.peft_warnings]))
    for f in c.findings:
        if f.severity == "warning":
            warnings.warn(f.message, UserWarning, stacklevel=1)
    assert any(f.code == "adapter_size" for f in c.findings), "adapter size finding missing"

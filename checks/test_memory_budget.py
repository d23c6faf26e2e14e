"""Memory budget: the plan's training step must fit ``[budget].gpu_memory_gib``.

CPU gate: what the card needs (the predicted peak of a fake-tensor trace of one step, i.e. what
``torch.cuda.max_memory_allocated()`` would report, + the allocator's segment overhead + the CUDA context) ≤ budget. GPU (``-m gpu``): the measured peak ≤ budget, and the prediction within the plan's tolerance.
"""
from __future__ import annotations

import pytest

from kolora_probe_checks.fixtures_structure import html_table

GIB = 2 ** 30


def _gib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / GIB:.2f} GiB"


@pytest.mark.cpu
def test_predicted_peak_fits_budget(plan, memory_verdict, evidence):
    """Predicted peak of one step ≤ budget; on failure the message names the largest batch size that fits."""
    from kolora_probe.report.memory_chart import verdict_chart_svg

    v = memory_verdict
    e = v.estimate
    evidence("card_required_bytes", v.card_required_bytes, expected=v.budget_bytes, unit="bytes",
             note="allocated + allocator overhead + CUDA context; expected = budget (upper bound)")
    evidence("predicted_peak_bytes", e.predicted_peak_bytes, expected=v.budget_bytes, unit="bytes",
             note=f"{e.method}; peak at {e.peak_phase}: {e.peak_op}; what max_memory_allocated() would report")
    evidence("allocator_overhead_bytes", v.allocator_overhead_bytes, unit="bytes",
             note="reserved − allocated: the step's allocations replayed through the CUDA caching allocator")
    evidence("cuda_context_bytes", v.cuda_context_bytes, unit="bytes", note="documented figure for this torch")
    evidence("components", dict(e.components), unit="bytes")
    how = "; closed form scaled to the trace (not traced: the plan fits)" if v.limits_approximate else ""
    evidence("max_batch_size", v.max_batch_size, note=f"at seq_len {e.shape.seq_len}{how}")
    evidence("max_seq_len", v.max_seq_len, note=f"at batch {e.shape.batch_size}{how}")
    evidence("trace_wall_s", round(e.wall_s, 2), unit="s")
    evidence.html("memory breakdown", html_table(["component", "MiB"],
                                                 [[k, f"{b / 2**20:,.1f}"] for k, b in e.components.items()]))
    evidence.svg("memory breakdown (predicted)", verdict_chart_svg(v))
    assert v.fits, v.message()


@pytest.mark.gpu
def test_measured_peak_fits_budget(plan, memory_verdict, memory_measurement, evidence):
    """One real step on the GPU: max_memory_allocated ≤ budget (an OOM fails here with the numbers)."""
    from kolora_probe.report.memory_chart import verdict_chart_svg

    m, v = memory_measurement, memory_verdict
    evidence("measured_peak_bytes", m.peak_allocated_bytes, expected=v.budget_bytes, unit="bytes",
             note="torch.cuda.max_memory_allocated() of one step after a warm-up step")
    evidence("measured_reserved_bytes", m.peak_reserved_bytes, unit="bytes")
    evidence("context_overhead_bytes", m.context_overhead_bytes, expected=v.cuda_context_bytes, unit="bytes",
             note="NVML used − torch reserved; expected = the documented CUDA context the CPU verdict assumed")
    if m.peak_reserved_bytes is not None:
        evidence("measured_reserved_minus_allocated_bytes", m.peak_reserved_bytes - (m.peak_allocated_bytes or 0),
                 expected=v.allocator_overhead_bytes, unit="bytes",
                 note="allocator overhead measured vs predicted (replay of the traced step's allocations)")
    evidence.svg("memory breakdown (predicted vs measured)", verdict_chart_svg(v, m.peak_allocated_bytes))
    if m.oom:
        pytest.fail(f"the plan's step ran out of GPU memory ({m.error}); peak allocated before the failure "
                    f"{_gib(m.peak_allocated_bytes)}, predicted {_gib(v.predicted_peak_bytes)}, budget "
                    f"{_gib(v.budget_bytes)}; largest batch predicted to fit: {v.max_batch_size}", pytrace=False)
    assert m.ok, f"measurement failed: {m.error}"
    assert m.peak_allocated_bytes <= v.budget_bytes, (
        f"measured peak {_gib(m.peak_allocated_bytes)} > budget {_gib(v.budget_bytes)}; largest batch size "
        f"predicted to fit: {v.max_batch_size}; lower [training].batch_size or raise [budget].gpu_memory_gib")


@pytest.mark.gpu
def test_prediction_matches_measurement(plan, memory_verdict, memory_measurement, evidence):
    """|measured − predicted| / measured ≤ [budget].tolerance_percent."""
    m, v = memory_measurement, memory_verdict
    if not m.ok:
        pytest.fail(f"no measurement to compare with the prediction ({m.error}); predicted "
                    f"{_gib(v.predicted_peak_bytes)}", pytrace=False)
    err = 100.0 * abs(m.peak_allocated_bytes - v.predicted_peak_bytes) / m.peak_allocated_bytes
    evidence("prediction_error_percent", round(err, 3), expected=f"<= {plan.budget.tolerance_percent:g}", unit="%")
    evidence("predicted_peak_bytes", v.predicted_peak_bytes, unit="bytes")
    assert err <= plan.budget.tolerance_percent, (
        f"prediction {_gib(v.predicted_peak_bytes)} vs measured {_gib(m.peak_allocated_bytes)}: error {err:.2f} % "
        f"> tolerance {plan.budget.tolerance_percent:g} %; report the plan and both numbers to kolora-probe "
        f"(memory_closed_form / memory_trace)")

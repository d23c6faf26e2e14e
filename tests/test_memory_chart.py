"""The memory breakdown chart (inline SVG): what it draws must be the verdict's numbers, to scale."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from structure_configs import kogpt2_config

from kolora_probe.memory.budget import budget_verdict
from kolora_probe.memory.trace import StepShape
from kolora_probe.report.memory_chart import breakdown_chart_svg, verdict_chart_svg

NS = {"s": "http://www.w3.org/2000/svg"}
GIB = 2 ** 30


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)   # well-formed XML, or this raises


def _segments(root: ET.Element) -> list[ET.Element]:
    return [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("class") == "kp-segment"]


def test_segments_are_the_nonzero_components_then_the_extras_to_scale():
    comps = {"frozen_weights": 300 * 2**20, "lora_weights": 0, "activations": 100 * 2**20, "logits": 50 * 2**20}
    extra = {"allocator overhead": 30 * 2**20, "CUDA context": 0}
    root = _parse(breakdown_chart_svg(comps, "t", budget_bytes=1024 * 2**20, extra=extra))
    segs = _segments(root)
    assert [s.get("data-name") for s in segs] == ["frozen_weights", "activations", "logits", "allocator overhead"]
    assert [int(s.get("data-bytes")) for s in segs] == [300 * 2**20, 100 * 2**20, 50 * 2**20, 30 * 2**20]
    px_per_byte = {round(float(s.get("height")) / int(s.get("data-bytes")) * 2**20, 3) for s in segs}
    assert len(px_per_byte) == 1                            # one scale for every segment
    scale = px_per_byte.pop()
    # stacked: each segment starts where the one below it ends
    for lower, upper in zip(segs, segs[1:]):
        assert float(upper.get("y")) + float(upper.get("height")) == pytest.approx(float(lower.get("y")), abs=0.02)
    # the budget line sits at the budget's height above the baseline (the first segment's bottom)
    base = float(segs[0].get("y")) + float(segs[0].get("height"))
    budget = next(l for l in root.iter("{http://www.w3.org/2000/svg}line") if l.get("class") == "kp-budget")
    assert base - float(budget.get("y1")) == pytest.approx(1024 * scale, abs=0.02)
    assert float(budget.get("y1")) >= 0                     # the axis reaches above the budget


def test_measured_bar_and_axis_top_cover_the_largest_value():
    root = _parse(breakdown_chart_svg({"activations": 10 * 2**20}, "t", budget_bytes=5 * 2**20,
                                      measured_peak_bytes=40 * 2**20))
    meas = next(r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("class") == "kp-measured")
    seg = _segments(root)[0]
    assert float(meas.get("height")) == pytest.approx(4 * float(seg.get("height")), rel=1e-3)
    assert float(meas.get("y")) > 0                         # inside the drawing


def test_text_is_escaped():
    svg = breakdown_chart_svg({"<script>&": 2**20}, "a < b & c", budget_bytes=None)
    root = _parse(svg)
    assert "<script>" not in svg and root.find("s:title", NS).text == "a < b & c"


def test_verdict_chart_shows_what_the_card_needs():
    v = budget_verdict(kogpt2_config(), StepShape(batch_size=2, seq_len=128, targets=("c_attn",)), 8 * GIB)
    segs = _segments(_parse(verdict_chart_svg(v)))
    assert sum(int(s.get("data-bytes")) for s in segs) == v.card_required_bytes
    names = [s.get("data-name") for s in segs]
    assert names[-2:] == ["allocator overhead", "CUDA context"] and v.cuda_context_bytes > 0

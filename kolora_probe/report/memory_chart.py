"""The memory breakdown chart of the reports, as inline SVG text.

One stacked bar of the predicted peak's components (and, stacked on top, what the card needs beyond it: the
allocator's overhead and the CUDA context), a bar of the measured peak when there is one, and the budget as a
dashed line. SVG rather than a raster: it is a few kilobytes of text that scales and stays searchable inside the
self-contained HTML report, and drawing it costs nothing at gate time (no plotting library to import).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from html import escape

from kolora_probe.report.summary import human_bytes

MIB = 2 ** 20
COLOURS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#999999")
EXTRA_COLOURS = ("#e3c8a8", "#d9d9d9")
MEASURED_COLOUR = "#333333"
BUDGET_COLOUR = "#d62728"

WIDTH, HEIGHT = 660, 400
PLOT_LEFT, PLOT_TOP, PLOT_BOTTOM = 70, 40, 340     # plot area: x from PLOT_LEFT, y from PLOT_TOP to PLOT_BOTTOM
BAR_WIDTH, BAR_GAP = 90, 40
LEGEND_X = 380


def _nice_top(value: float) -> float:
    """The smallest 1/1.5/2/2.5/3/4/5/6/8 × 10^k at or above ``value`` (the y axis' top: five even steps)."""
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * exp >= value:
            return m * exp
    return 10 * exp


def breakdown_chart_svg(components: Mapping[str, int], title: str, *, budget_bytes: int | None = None,
                        measured_peak_bytes: int | None = None, extra: Mapping[str, int] | None = None,
                        predicted_label: str = "predicted") -> str:
    """SVG text: ``components`` (name → bytes, zero ones left out) stacked, then ``extra`` (name → bytes, e.g.
    allocator overhead, CUDA context) on top, a measured bar, and the budget line; the y axis is MiB."""
    segments = [(n, b, c) for (n, b), c in zip(components.items(), COLOURS * 4) if b > 0]
    segments += [(n, b, c) for (n, b), c in zip((extra or {}).items(), EXTRA_COLOURS * 4) if b > 0]
    stacked = sum(b for _, b, _ in segments)
    top = _nice_top(max(stacked, measured_peak_bytes or 0, budget_bytes or 0) / MIB * 1.05)
    span = PLOT_BOTTOM - PLOT_TOP

    def y(mib: float) -> float:
        return PLOT_BOTTOM - span * mib / top

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11" role="img">',
           f"<title>{escape(title)}</title>",
           f'<text x="{WIDTH / 2:.0f}" y="20" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for i in range(6):                                       # y axis: 0 … top in five steps
        mib = top * i / 5
        out.append(f'<line x1="{PLOT_LEFT}" x2="{LEGEND_X - 20}" y1="{y(mib):.1f}" y2="{y(mib):.1f}" '
                   f'stroke="#e5e5e5"/>')
        out.append(f'<text x="{PLOT_LEFT - 6}" y="{y(mib) + 4:.1f}" text-anchor="end">{mib:,.{0 if top >= 50 else 1}f}</text>')
    out.append(f'<text x="16" y="{(PLOT_TOP + PLOT_BOTTOM) / 2:.0f}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(PLOT_TOP + PLOT_BOTTOM) / 2:.0f})">MiB</text>')

    legend: list[tuple[str, str, str]] = []                  # colour, label, dash
    x = PLOT_LEFT + BAR_GAP
    bottom = 0.0
    for name, b, colour in segments:
        h = b / MIB
        out.append(f'<rect class="kp-segment" data-name="{escape(name)}" data-bytes="{b}" x="{x}" '
                   f'y="{y(bottom + h):.2f}" width="{BAR_WIDTH}" height="{y(bottom) - y(bottom + h):.2f}" '
                   f'fill="{colour}"><title>{escape(name)}: {h:,.1f} MiB</title></rect>')
        legend.append((colour, f"{name} {human_bytes(b)}", ""))
        bottom += h
    out.append(f'<text x="{x + BAR_WIDTH / 2}" y="{PLOT_BOTTOM + 16}" text-anchor="middle">'
               f"{escape(predicted_label)}</text>")
    if measured_peak_bytes is not None:
        x += BAR_WIDTH + BAR_GAP
        h = measured_peak_bytes / MIB
        out.append(f'<rect class="kp-measured" data-bytes="{measured_peak_bytes}" x="{x}" y="{y(h):.2f}" '
                   f'width="{BAR_WIDTH}" height="{y(0) - y(h):.2f}" fill="{MEASURED_COLOUR}">'
                   f"<title>measured: {h:,.1f} MiB</title></rect>")
        out.append(f'<text x="{x + BAR_WIDTH / 2}" y="{PLOT_BOTTOM + 16}" text-anchor="middle">measured</text>')
        out.append(f'<text x="{x + BAR_WIDTH / 2}" y="{PLOT_BOTTOM + 30}" text-anchor="middle">'
                   f"(max_memory_allocated)</text>")
        legend.append((MEASURED_COLOUR, f"measured {human_bytes(measured_peak_bytes)}", ""))
    if budget_bytes:
        h = budget_bytes / MIB
        out.append(f'<line class="kp-budget" data-bytes="{budget_bytes}" x1="{PLOT_LEFT}" x2="{LEGEND_X - 20}" '
                   f'y1="{y(h):.2f}" y2="{y(h):.2f}" stroke="{BUDGET_COLOUR}" stroke-width="2" '
                   f'stroke-dasharray="6 4"/>')
        legend.append((BUDGET_COLOUR, f"budget {human_bytes(budget_bytes)}", "6 4"))
    out.append(f'<line x1="{PLOT_LEFT}" x2="{PLOT_LEFT}" y1="{PLOT_TOP}" y2="{PLOT_BOTTOM}" stroke="#333"/>')
    out.append(f'<line x1="{PLOT_LEFT}" x2="{LEGEND_X - 20}" y1="{PLOT_BOTTOM}" y2="{PLOT_BOTTOM}" stroke="#333"/>')
    for i, (colour, label, dash) in enumerate(legend):       # legend, MiB
        ly = PLOT_TOP + 4 + 18 * i
        if dash:
            out.append(f'<line x1="{LEGEND_X}" x2="{LEGEND_X + 14}" y1="{ly + 5}" y2="{ly + 5}" stroke="{colour}" '
                       f'stroke-width="2" stroke-dasharray="{dash}"/>')
        else:
            out.append(f'<rect x="{LEGEND_X}" y="{ly}" width="14" height="10" fill="{colour}"/>')
        out.append(f'<text x="{LEGEND_X + 20}" y="{ly + 9}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def verdict_chart_svg(verdict, measured_peak_bytes: int | None = None) -> str:
    """The chart of a memory ``BudgetVerdict``: the predicted components, then the allocator overhead and the CUDA
    context that the card needs on top of them (the verdict compares that sum with the budget), the budget, and
    the measured peak when there is one."""
    e = verdict.estimate
    s = e.shape
    title = f"peak memory: batch {s.batch_size} × seq {s.seq_len}, {s.dtype}, quant {s.quantization}"
    return breakdown_chart_svg(e.components, title, budget_bytes=verdict.budget_bytes,
                               measured_peak_bytes=measured_peak_bytes,
                               extra={"allocator overhead": verdict.allocator_overhead_bytes or 0,
                                      "CUDA context": verdict.cuda_context_bytes or 0},
                               predicted_label=f"predicted ({e.method})")

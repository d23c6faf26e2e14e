"""Peak-memory prediction grid for full-size KoGPT-2 (config only): trace vs closed form vs accelerate's estimate,
the trace's wall time, and — on CPU, for shapes small enough to run here — the CPU-semantics trace vs a real CPU
step. The GPU column (predicted vs ``torch.cuda.max_memory_allocated``) is filled only where a CUDA device is
available (``--gpu``); otherwise it says "not measured".

usage: python benchmarks/memory_grid.py [--out benchmarks/results/memory-grid-cpu.json] [--no-cpu-measure] [--gpu]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MIB = 2 ** 20

LORA = ("c_attn", "c_proj", "c_fc")
# name: (StepShape overrides, measure on CPU?)
GRID: dict[str, tuple[dict, bool]] = {
    "lora fp32 b1 s128": (dict(batch_size=1, seq_len=128), True),
    "lora fp32 b2 s256": (dict(batch_size=2, seq_len=256), True),
    "lora fp32 b8 s512": (dict(batch_size=8, seq_len=512), False),
    "lora fp32 b8 s512 ckpt": (dict(batch_size=8, seq_len=512, gradient_checkpointing=True), False),
    "lora fp32 b4 s1024": (dict(batch_size=4, seq_len=1024), False),
    "lora bf16 b8 s512": (dict(batch_size=8, seq_len=512, dtype="bf16"), False),
    "lora bf16 b8 s512 ckpt": (dict(batch_size=8, seq_len=512, dtype="bf16", gradient_checkpointing=True), False),
    "lora bf16 b16 s1024 ckpt": (dict(batch_size=16, seq_len=1024, dtype="bf16", gradient_checkpointing=True), False),
    "lora bf16-weights b8 s512": (dict(batch_size=8, seq_len=512, weights_dtype="bf16"), False),
    "qlora bf16 b1 s128": (dict(batch_size=1, seq_len=128, quantization="4bit", dtype="bf16", weights_dtype="bf16"), False),
    "qlora bf16 b8 s512": (dict(batch_size=8, seq_len=512, quantization="4bit", dtype="bf16", weights_dtype="bf16"), False),
    "qlora bf16 b8 s512 ckpt (plan, no prepare_kbit)": (dict(batch_size=8, seq_len=512, quantization="4bit", dtype="bf16",
                                            weights_dtype="bf16", gradient_checkpointing=True), False),
    "qlora bf16 b4 s1024": (dict(batch_size=4, seq_len=1024, quantization="4bit", dtype="bf16", weights_dtype="bf16"), False),
    "qlora bf16 b16 s1024 ckpt": (dict(batch_size=16, seq_len=1024, quantization="4bit", dtype="bf16",
                                       weights_dtype="bf16", gradient_checkpointing=True), False),
    "head-lora fp32 b8 s512 (default plan)": (dict(batch_size=8, seq_len=512, targets=("lm_head",),
                                                   lora_dropout=0.1), False),
    "head-lora bf16 b16 s512": (dict(batch_size=16, seq_len=512, targets=("lm_head",), lora_dropout=0.1,
                                     dtype="bf16"), False),
}


def kogpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=51200, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                      activation_function="gelu_new", bos_token_id=0, eos_token_id=1, pad_token_id=3,
                      architectures=["GPT2LMHeadModel"])


def accelerate_estimate(config, shape) -> int | None:
    """accelerate estimate-memory's "training using Adam" figure: 4 × the model size in the plan's dtype."""
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes

    from kolora_probe.model.meta import build_meta_model

    total, _ = calculate_maximum_sizes(build_meta_model(config, "fp32"))
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "float16"}[shape.weights_dtype]
    if shape.quantization == "4bit":
        dtype = "int4"
    usage = estimate_training_usage(total, dtype)
    if isinstance(usage, dict):
        usage = max(v for v in usage.values() if isinstance(v, (int, float)))
    return int(usage) if usage and usage > 0 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory-grid-cpu.json"))
    ap.add_argument("--no-cpu-measure", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="also measure each configuration on cuda:0")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import torch

    from kolora_probe.memory.closed_form import closed_form, model_facts
    from kolora_probe.memory.measure import measure_step
    from kolora_probe.memory.trace import StepShape, trace_step

    cfg = kogpt2_config()
    rows = []
    for name, (kw, cpu_ok) in GRID.items():
        shape = StepShape(**{"targets": LORA, "lora_dropout": 0.05, **kw})
        tr = trace_step(cfg, shape)
        t0 = time.perf_counter()
        cf = closed_form(model_facts(cfg, shape), shape)
        cf_s = time.perf_counter() - t0
        row = {"config": name, "shape": shape.describe(), "trace_bytes": tr.predicted_peak_bytes,
               "trace_wall_s": round(tr.wall_s, 2), "peak_at": f"{tr.peak_phase}: {tr.peak_op}",
               "components": dict(tr.components), "closed_form_bytes": cf.predicted_peak_bytes,
               "closed_form_s": round(cf_s, 3),
               "closed_form_err_pct": round(100 * (cf.predicted_peak_bytes / tr.predicted_peak_bytes - 1), 2),
               "accelerate_bytes": accelerate_estimate(cfg, shape)}
        if row["accelerate_bytes"]:
            row["accelerate_err_pct"] = round(100 * (row["accelerate_bytes"] / tr.predicted_peak_bytes - 1), 1)
        if cpu_ok and not args.no_cpu_measure and shape.quantization == "none":
            cpu_tr = trace_step(cfg, shape, cuda=False)
            m = measure_step(cfg, shape, "cpu")
            row["cpu_trace_bytes"] = cpu_tr.predicted_peak_bytes
            row["cpu_measured_bytes"] = m.peak_allocated_bytes
            row["cpu_err_pct"] = (round(100 * (cpu_tr.predicted_peak_bytes / m.peak_allocated_bytes - 1), 3)
                                  if m.ok else None)
            row["cpu_measure_s"] = round(m.wall_s, 1)
        if args.gpu and torch.cuda.is_available():
            m = measure_step(cfg, shape, "cuda:0")
            row["gpu_measured_bytes"] = m.peak_allocated_bytes
            row["gpu_reserved_bytes"] = m.peak_reserved_bytes
            row["gpu_error"] = m.error
            if m.ok:
                row["gpu_err_pct"] = round(100 * (tr.predicted_peak_bytes / m.peak_allocated_bytes - 1), 2)
        else:
            row["gpu_measured_bytes"] = None
            row["gpu_note"] = "not measured (no CUDA device in this session)"
        rows.append(row)
        print(f"{name}: trace {tr.predicted_peak_bytes / MIB:,.1f} MiB ({tr.wall_s:.1f} s), closed form "
              f"{row['closed_form_err_pct']:+.2f} %", file=sys.stderr)

    errs = sorted(abs(r["closed_form_err_pct"]) for r in rows)
    doc = {"model": "KoGPT-2 full-size config (skt/kogpt2-base-v2 shapes), config only",
           "lora": {"r": 16, "alpha": 32, "targets_default": list(LORA)},
           "torch": torch.__version__, "machine": platform.platform(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "summary": {"closed_form_vs_trace_median_abs_err_pct": errs[len(errs) // 2],
                       "closed_form_vs_trace_max_abs_err_pct": errs[-1],
                       "trace_wall_s_median": sorted(r["trace_wall_s"] for r in rows)[len(rows) // 2]},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1), encoding="utf-8")

    lines: list[str] = []

    def emit(line: str = "") -> None:
        lines.append(line)
        print(line)

    def mib(b):
        return "—" if b is None else f"{b / MIB:,.0f}"

    emit("| configuration | trace MiB | closed form MiB (err) | accelerate MiB (err) | trace s | peak at | "
         "CPU: trace vs measured | GPU measured |")
    emit("|---|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        acc = (f"{mib(r['accelerate_bytes'])} ({r['accelerate_err_pct']:+.0f} %)" if r.get("accelerate_bytes")
               else "n/a (no int4 training estimate)")
        cpu = (f"{mib(r['cpu_trace_bytes'])} vs {mib(r['cpu_measured_bytes'])} ({r['cpu_err_pct']:+.3f} %)"
               if r.get("cpu_measured_bytes") else
               "n/a (4-bit needs CUDA)" if "qlora" in r["config"] else "not run (slow on this 2-core CPU)")
        gpu = (f"{mib(r['gpu_measured_bytes'])} ({r.get('gpu_err_pct', 0):+.2f} %)" if r.get("gpu_measured_bytes")
               else "not measured")
        emit(f"| {r['config']} | {mib(r['trace_bytes'])} | {mib(r['closed_form_bytes'])} "
             f"({r['closed_form_err_pct']:+.2f} %) | {acc} | {r['trace_wall_s']:.1f} | {r['peak_at']} | {cpu} | {gpu} |")
    s = doc["summary"]
    emit(f"\nclosed form vs trace: median |err| {s['closed_form_vs_trace_median_abs_err_pct']:.2f} %, max "
         f"{s['closed_form_vs_trace_max_abs_err_pct']:.2f} %; trace wall time median {s['trace_wall_s_median']:.1f} s")
    Path(args.out).with_suffix(".md").write_text(
        "CPU-semantics column: trace without CUDA emulation vs the real CPU step's profiler peak (validates the "
        "tracing mechanism; the CUDA prediction is the 'trace' column).\n\n" + "\n".join(lines) + "\n",
        encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

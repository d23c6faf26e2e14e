"""The Python half of ``benchmarks/gpu_proof.sh`` (the shell script orchestrates; this writes the JSON).

Subcommands (each reads/writes one JSON document, rewritten atomically after every change, so a run that is cut
short keeps what it has):

* ``prepare`` – versions (:func:`kolora_probe.env.facts.collect_environment`, the requirements' status and where
  the carried packages were imported from), then the two models from config with random weights, no hub: a
  KoGPT-2-shaped ``GPT2LMHeadModel`` saved with ``save_pretrained`` plus a KoGPT-2-like ``tokenizer.json`` (the
  directory ``pytest -m gpu`` / ``-m benchmark`` load with ``--model=DIR``), and a LLaMA-style config
  (Llama-3.2-1B shapes, 1.24 B parameters) that the grid builds on the device.
* ``grid`` – the memory + throughput grid: per row the predicted peak (:func:`kolora_probe.memory.trace.trace_step`),
  the measured peak (:func:`kolora_probe.memory.measure.measure_step`) and tokens/s + MFU of a few timed steps
  (:mod:`kolora_probe.memory.throughput`). Each row checks the time left before it starts.
* ``record`` – one orchestration step's outcome (exit code, wall time, the JUnit counts of a pytest run).
* ``finish`` – summary (rows, median/max |error|, wall time), the monitor's peaks; prints a short table.

``--rehearse`` (CPU): tiny shapes, and the CPU-semantics comparison — the trace with CPU semantics
(``trace_step(..., cuda=False)``) against a real CPU step's profiler peak, as ``benchmarks/memory_grid.py`` does.
4-bit rows are predicted only there (bitsandbytes NF4 steps are measured on CUDA only).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEMA = "kolora-probe gpu-proof 1"
ROW_KEYS = ("model", "config", "shape", "semantics", "measured_peak_bytes", "predicted_peak_bytes",
            "error_percent", "tokens_per_s", "mfu")
KOGPT2_LORA = ("c_attn", "c_proj", "c_fc")
LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Q4 = dict(quantization="4bit", dtype="bf16", weights_dtype="bf16")
# (model, name, StepShape overrides): LoRA and QLoRA, fp32/bf16, batch, sequence length, checkpointing, both models.
# The two models alternate, so a run cut short by its time budget still has rows of both.
GRID: tuple[tuple[str, str, dict], ...] = (
    ("kogpt2", "head-lora fp32 b8 s512 (default plan)", dict(batch_size=8, seq_len=512, targets=("lm_head",),
                                                             lora_dropout=0.1)),
    ("llama", "lora bf16-weights b4 s1024", dict(batch_size=4, seq_len=1024, dtype="bf16", weights_dtype="bf16")),
    ("kogpt2", "lora fp32 b8 s512", dict(batch_size=8, seq_len=512)),
    ("llama", "qlora bf16 b4 s1024", dict(batch_size=4, seq_len=1024, **Q4)),
    ("kogpt2", "qlora bf16 b8 s512 ckpt (plan)", dict(batch_size=8, seq_len=512, gradient_checkpointing=True, **Q4)),
    ("llama", "lora bf16-weights b4 s1024 ckpt", dict(batch_size=4, seq_len=1024, dtype="bf16", weights_dtype="bf16",
                                                       gradient_checkpointing=True)),
    ("kogpt2", "lora bf16 b8 s512", dict(batch_size=8, seq_len=512, dtype="bf16")),
    ("llama", "qlora bf16 b4 s1024 ckpt", dict(batch_size=4, seq_len=1024, gradient_checkpointing=True, **Q4)),
    ("kogpt2", "lora fp32 b8 s512 ckpt", dict(batch_size=8, seq_len=512, gradient_checkpointing=True)),
    ("llama", "lora fp32 b2 s512", dict(batch_size=2, seq_len=512)),
    ("kogpt2", "qlora bf16 b8 s512", dict(batch_size=8, seq_len=512, **Q4)),
    ("llama", "qlora bf16 b8 s2048 ckpt", dict(batch_size=8, seq_len=2048, gradient_checkpointing=True, **Q4)),
    ("kogpt2", "lora fp32 b4 s1024", dict(batch_size=4, seq_len=1024)),
    ("kogpt2", "lora bf16 b16 s1024 ckpt", dict(batch_size=16, seq_len=1024, dtype="bf16",
                                                 gradient_checkpointing=True)),
)
# Llama-3.2-1B shapes (grouped-query attention, tied head): 1,235,814,400 parameters
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)
LLAMA_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2)


# --- the JSON document ------------------------------------------------------------------------------------
def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def save(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    tmp.replace(path)


def log(msg: str) -> None:
    print(f"[gpu-proof {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- models ------------------------------------------------------------------------------------------------
def kogpt2_config(rehearse: bool, vocab_size: int | None = None):
    from transformers import GPT2Config

    from tests.model_factory import KOGPT2_CONFIG, TINY

    cfg = {k: v for k, v in KOGPT2_CONFIG.items() if k not in ("architectures", "model_type")}
    if rehearse:
        cfg.update(TINY, n_ctx=TINY["n_positions"], vocab_size=vocab_size or 1600)
    return GPT2Config(architectures=["GPT2LMHeadModel"], **cfg)


def llama_config(rehearse: bool):
    from transformers import LlamaConfig

    return LlamaConfig(architectures=["LlamaForCausalLM"], **(LLAMA_TINY if rehearse else LLAMA_1B))


def model_configs(work: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    return {name: AutoConfig.from_pretrained(work / name) for name in ("kogpt2", "llama")}


def build_models(work: Path, rehearse: bool, device: str) -> dict[str, Any]:
    """KoGPT-2-shaped model dir (random weights + tokenizer) and the LLaMA-style config dir under ``work``."""
    import torch
    from transformers import AutoModelForCausalLM

    from kolora_probe.model.meta import build_meta_model, count_parameters
    from tests.model_factory import KOGPT2_SPECIALS, sample_lines, train_kogpt2_like_tokenizer

    t0 = time.perf_counter()
    tok = train_kogpt2_like_tokenizer(sample_lines())
    assert all(tok.token_to_id(s) == i for i, s in enumerate(KOGPT2_SPECIALS))
    ko_cfg = kogpt2_config(rehearse, tok.get_vocab_size())
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(ko_cfg, trust_remote_code=False)
    ko_dir = work / "kogpt2"
    model.to("cpu").save_pretrained(ko_dir)   # config.json + model.safetensors (tied head stored once)
    (ko_dir / "generation_config.json").unlink(missing_ok=True)
    tok.save(str(ko_dir / "tokenizer.json"))
    ko_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    del model
    ll_cfg = llama_config(rehearse)
    ll_dir = work / "llama"
    ll_cfg.save_pretrained(ll_dir)
    ll_total, _ = count_parameters(build_meta_model(ll_cfg, "fp32"))
    return {"kogpt2": {"dir": str(ko_dir), "parameters": ko_total, "weights": "random (save_pretrained)",
                       "tokenizer_vocab": tok.get_vocab_size(), "config": ko_cfg.to_diff_dict()},
            "llama": {"dir": str(ll_dir), "parameters": int(ll_total), "weights": "random, built per row on the device",
                      "config": ll_cfg.to_diff_dict()},
            "build_s": round(time.perf_counter() - t0, 2)}


def versions() -> dict[str, Any]:
    """The machine's facts, the requirements' status and where the key packages were imported from."""
    import importlib

    from kolora_probe.env.facts import collect_environment
    from kolora_probe.report.redact import redact
    from kolora_probe.env.requirements import check_requirements

    facts = collect_environment()
    t = facts.torch
    try:
        reqs = [{"name": r.name, "specifier": r.specifier, "installed": r.installed, "satisfied": r.satisfied}
                for r in check_requirements(ROOT / "requirements.txt")]
    except Exception as exc:  # noqa: BLE001 - a fact, not a stop
        reqs = [{"error": f"{type(exc).__name__}: {exc}"}]
    paths = {}
    for mod in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "pytest", "pytest_html",
                "pytest_benchmark", "pynvml"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                paths[mod] = str(Path(importlib.import_module(mod).__file__).parent)
        except Exception as exc:  # noqa: BLE001
            paths[mod] = f"not importable: {type(exc).__name__}: {exc}"[:300]
    doc = {"python": facts.python_version, "torch": t.version if t else None,
           "cuda_build": t.cuda_build if t else None,
           "gpu": t.gpus[0].name if t and t.gpus else None,
           "driver": facts.nvml.driver_version if facts.nvml and facts.nvml.available else None,
           "bitsandbytes_backends": list(facts.bitsandbytes.backends) if facts.bitsandbytes else [],
           "packages": facts.packages, "import_paths": paths, "requirements": reqs,
           "environment": facts.to_dict()}
    return redact(doc)


def cmd_prepare(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.json)
    device = "cuda" if (not args.rehearse and torch.cuda.is_available()) else "cpu"
    doc = {"schema": SCHEMA, "mode": "rehearsal" if args.rehearse else "device", "device": args.device_name,
           "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": args.budget_s,
           "semantics": "cpu" if args.rehearse else "cuda",
           "error_percent": "100 * (predicted_peak_bytes / measured_peak_bytes - 1): positive = over-predicted",
           "measured": ("CPU profiler peak of one step after a warm-up step (memory_measure.measure_step)"
                        if args.rehearse else "torch.cuda.max_memory_allocated() of one step after a warm-up "
                        "step (memory_measure.measure_step)"),
           "predicted": f"memory_trace.trace_step(cuda={not args.rehearse})", "versions": None, "models": None,
           "steps": [], "rows": [], "summary": None}
    doc["steps"].append({"name": "wheels", "rc": args.wheels_rc, "wall_s": args.wheels_s,
                         "wheels": args.wheels.split() if args.wheels else [],
                         **({} if args.wheels else {"note": "no carried wheels: the installed packages were used"})})
    save(out, doc)
    t0 = time.perf_counter()
    doc["versions"] = versions()
    save(out, doc)
    log(f"versions: python {doc['versions']['python']}, torch {doc['versions']['torch']} "
        f"(CUDA {doc['versions']['cuda_build']}), GPU {doc['versions']['gpu']}, "
        + ", ".join(f"{k} {v}" for k, v in doc["versions"]["packages"].items() if k != "torch"))
    work = Path(args.work)
    doc["models"] = build_models(work, args.rehearse, device)
    doc["steps"].append({"name": "prepare", "rc": 0, "wall_s": round(time.perf_counter() - t0, 2)})
    save(out, doc)
    m = doc["models"]
    log(f"models: KoGPT-2-shaped {m['kogpt2']['parameters']:,} parameters in {m['kogpt2']['dir']}; "
        f"LLaMA-style {m['llama']['parameters']:,} parameters (config) in {m['llama']['dir']}")
    return 0


# --- grid --------------------------------------------------------------------------------------------------
def grid_shapes(rehearse: bool, select: str | None = None) -> list[tuple[str, str, Any]]:
    """(model, name, StepShape) for the grid rows whose "model name" matches the regular expression ``select``
    (all by default); rehearsal: batch ÷4 and sequence ÷16 (tiny models)."""
    import re

    from kolora_probe.memory.trace import StepShape

    rows = []
    for model, name, kw in GRID:
        if select and not re.search(select, f"{model} {name}"):
            continue
        kw = dict(kw)
        kw.setdefault("targets", KOGPT2_LORA if model == "kogpt2" else LLAMA_LORA)
        kw.setdefault("lora_dropout", 0.05)
        if rehearse:
            kw["batch_size"] = max(1, kw["batch_size"] // 4)
            kw["seq_len"] = max(8, kw["seq_len"] // 16)
        rows.append((model, name, StepShape(**kw)))
    return rows


def time_steps(config: Any, shape: Any, device: str, steps: int) -> dict[str, Any]:
    """tokens/s and MFU of ``steps`` timed training steps (after one warm-up) of the row's model on ``device``."""
    import torch

    from kolora_probe.memory.measure import _build_4bit_cuda, release_memory
    from kolora_probe.memory.trace import build_step_model, make_optimizer
    from kolora_probe.memory.throughput import (backward_scope, matmul_params, peak_tflops, shape_from_config,
                                         throughput_from_seconds, train_step, training_flops_per_token)

    cuda = device.startswith("cuda")
    holder: dict[str, Any] = {}
    try:
        if shape.quantization == "4bit":
            if not cuda:
                return {"throughput_note": "4-bit steps run on CUDA only"}
            holder["model"] = model = _build_4bit_cuda(config, shape, device)
        else:
            holder["model"] = model = build_step_model(config, shape, device)
        holder["opt"] = opt = make_optimizer(model, shape, cuda=cuda, traced=False)
        holder["ids"] = ids = torch.randint(0, int(config.vocab_size), (shape.batch_size, shape.seq_len),
                                            device=device)
        losses = [train_step(model, opt, ids, shape.dtype)]   # warm-up
        seconds = []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(train_step(model, opt, ids, shape.dtype))   # synchronises on CUDA
            seconds.append(time.perf_counter() - t0)
        ts = shape_from_config(config)
        n_matmul, n_trainable = matmul_params(model)
        flops = training_flops_per_token(n_matmul, n_trainable, ts.n_layers, shape.seq_len, ts.d_attn,
                                         shape.gradient_checkpointing, backward=backward_scope(model, ts.n_layers))
        peak = None
        if cuda:
            tf32 = bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
            peak = peak_tflops(torch.cuda.get_device_name(torch.device(device)), shape.dtype, allow_tf32=tf32)
        st = throughput_from_seconds(seconds, shape.batch_size, shape.seq_len, flops.total, peak)
        return {"tokens_per_s": round(st.tokens_per_s, 1), "mfu": None if st.mfu is None else round(st.mfu, 4),
                "step_ms": round(st.seconds * 1e3, 2), "achieved_tflops": round(st.achieved_tflops, 3),
                "flops_per_token": flops.total, "timed_steps": steps,
                "peak_tflops": None if peak is None else f"{peak.gpu} {peak.dtype} {peak.tflops}",
                "losses": [round(v, 4) for v in losses],
                **({} if peak or not cuda else {"throughput_note": "GPU not in PEAK_TFLOPS: no MFU"}),
                **({} if cuda else {"throughput_note": "CPU: no peak TFLOP/s, no MFU"})}
    except Exception as exc:  # noqa: BLE001 - one row's failure is a result; the grid goes on
        from kolora_probe.memory.measure import is_oom

        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return {"throughput_error": f"{type(exc).__name__}: {first}", "throughput_oom": is_oom(exc)}
    finally:
        holder.clear()
        release_memory(device)


def run_row(model_name: str, name: str, config: Any, shape: Any, device: str, rehearse: bool,
            steps: int) -> dict[str, Any]:
    from kolora_probe.memory.measure import measure_step
    from kolora_probe.memory.trace import trace_step

    t0 = time.perf_counter()
    row: dict[str, Any] = {"model": model_name, "config": name, "shape": shape.describe(),
                           "semantics": "cpu" if rehearse else "cuda", "measured_peak_bytes": None,
                           "predicted_peak_bytes": None, "error_percent": None, "tokens_per_s": None, "mfu": None}
    try:
        est = trace_step(config, shape, cuda=not rehearse)
        row.update(predicted_peak_bytes=est.predicted_peak_bytes, peak_at=f"{est.peak_phase}: {est.peak_op}",
                   trace_wall_s=round(est.wall_s, 2), components=dict(est.components))
    except Exception as exc:  # noqa: BLE001
        row["trace_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        m = measure_step(config, shape, device)
        row.update(measured_peak_bytes=m.peak_allocated_bytes if m.ok else None, measure=m.to_dict())
        if not m.ok:
            row["measure_error"] = m.error
    except Exception as exc:  # noqa: BLE001
        row["measure_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if row["measured_peak_bytes"] and row["predicted_peak_bytes"]:
        row["error_percent"] = round(100.0 * (row["predicted_peak_bytes"] / row["measured_peak_bytes"] - 1), 3)
    row.update(time_steps(config, shape, device, steps))
    row["row_wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def cmd_grid(args: argparse.Namespace) -> int:
    import torch

    warnings.filterwarnings("ignore")
    out = Path(args.json)
    doc = load(out)
    configs = model_configs(Path(args.work))
    device = "cpu" if args.rehearse else ("cuda:0" if torch.cuda.is_available() else "cpu")
    if not args.rehearse and device == "cpu":
        log("no CUDA device: the grid needs one (use --rehearse for the CPU rehearsal)")
    steps = 2 if args.rehearse else 5
    deadline = args.deadline or math.inf
    last_cost: dict[str, float] = {}
    t_start = time.perf_counter()
    for model_name, name, shape in grid_shapes(args.rehearse, args.rows):
        need = 1.5 * last_cost.get(model_name, args.first_row_s)
        if time.time() + need > deadline:
            doc["rows"].append({"model": model_name, "config": name, "shape": shape.describe(), "skipped":
                                f"not run: {need:.0f} s needed, {max(0.0, deadline - time.time()):.0f} s left "
                                "in the time budget"})
            save(out, doc)
            log(f"{model_name} {name}: skipped (time budget)")
            continue
        row = run_row(model_name, name, configs[model_name], shape, device, args.rehearse, steps)
        last_cost[model_name] = row["row_wall_s"]
        doc["rows"].append(row)
        save(out, doc)
        log(describe_row(row))
    doc["steps"].append({"name": "grid", "rc": 0, "wall_s": round(time.perf_counter() - t_start, 2)})
    save(out, doc)
    return 0


def _mib(b: Any) -> str:
    return "—" if b is None else f"{b / 2**20:,.1f}"


def describe_row(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"{r['model']:<7} {r['config']:<40} {r['skipped']}"
    err = "—" if r.get("error_percent") is None else f"{r['error_percent']:+.3f} %"
    tps = "—" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}"
    mfu = "—" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
    why = r.get("trace_error") or r.get("measure_error") or r.get("throughput_error") or ""
    return (f"{r['model']:<7} {r['config']:<40} measured {_mib(r.get('measured_peak_bytes')):>10} MiB  predicted "
            f"{_mib(r.get('predicted_peak_bytes')):>10} MiB  err {err:>10}  tok/s {tps:>9}  MFU {mfu:>7}  "
            f"{r.get('row_wall_s', 0):.1f} s {why[:90]}")


# --- record / finish ---------------------------------------------------------------------------------------
def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and the failed checks' one-line messages of a JUnit XML report."""
    if not path.is_file():
        return {"junit": None, "note": f"{path.name} was not written"}
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
        for case in suite.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                msg = (bad.get("message") or "").strip().splitlines()
                failed.append(f"{case.get('name')}: {msg[0][:200] if msg else ''}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def cmd_record(args: argparse.Namespace) -> int:
    out = Path(args.json)
    doc = load(out)
    step: dict[str, Any] = {"name": args.step, "rc": args.rc, "wall_s": args.wall_s}
    if args.note:
        step["note"] = args.note
    elif args.rc in (124, 137):
        step["note"] = "stopped by its time limit"
    if args.reports:
        rep = Path(args.reports)
        step["reports"] = sorted(p.name for p in rep.iterdir()) if rep.is_dir() else []
        step.update(junit_summary(rep / "junit.xml"))
        bench = rep / "benchmarks.json"
        if bench.is_file():
            step["benchmarks"] = json.loads(bench.read_text(encoding="utf-8"))
    doc["steps"].append(step)
    save(out, doc)
    extra = (f": {step.get('passed', 0)} passed, {step.get('failures', 0)} failed, {step.get('errors', 0)} errors"
             if args.reports else "")
    log(f"step {args.step}: exit {args.rc} in {args.wall_s:.1f} s{extra}")
    return 0


def summarize(doc: dict[str, Any], wall_s: float) -> dict[str, Any]:
    rows = doc["rows"]
    errs = [abs(r["error_percent"]) for r in rows if r.get("error_percent") is not None]
    return {"rows": len(rows), "rows_run": sum("skipped" not in r for r in rows),
            "rows_measured": len(errs), "rows_predicted": sum(r.get("predicted_peak_bytes") is not None for r in rows),
            "rows_with_tokens_per_s": sum(r.get("tokens_per_s") is not None for r in rows),
            "rows_with_mfu": sum(r.get("mfu") is not None for r in rows),
            "median_abs_error_percent": round(statistics.median(errs), 3) if errs else None,
            "max_abs_error_percent": round(max(errs), 3) if errs else None,
            "wall_s": round(wall_s, 1)}


def cmd_finish(args: argparse.Namespace) -> int:
    out = Path(args.json)
    doc = load(out)
    mon = Path(args.monitor) / "summary.json" if args.monitor else None
    if mon is not None and mon.is_file():
        m = json.loads(mon.read_text(encoding="utf-8"))
        doc["monitor"] = {k: m.get(k) for k in ("sample_count", "duration_s", "interval_s", "stop_reason",
                                                "gpu_unavailable_reason", "gpus", "system")}
    doc["summary"] = summarize(doc, args.wall_s)
    doc["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save(out, doc)
    print("\n".join(describe_row(r) for r in doc["rows"]))
    for st in doc["steps"]:
        junit = (f" ({st.get('passed')} passed, {st.get('failures')} failed, {st.get('errors')} errors)"
                 if "tests" in st else "")
        print(f"step {st['name']:<16} exit {st['rc']:<4} {st['wall_s']:>7.1f} s{junit}")
    s = doc["summary"]
    print(f"rows {s['rows_run']}/{s['rows']} run, {s['rows_measured']} measured vs predicted "
          f"({doc['semantics']} semantics): median |error| {s['median_abs_error_percent']} %, max "
          f"{s['max_abs_error_percent']} %; {s['rows_with_tokens_per_s']} with tokens/s, {s['rows_with_mfu']} with "
          f"MFU; wall {s['wall_s']} s; JSON: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", required=True, help="the gpu-<device>.json document")
    common.add_argument("--rehearse", action="store_true")
    common.add_argument("--work", default=None, help="folder for the model directories")
    p = sub.add_parser("prepare", parents=[common])
    p.add_argument("--device-name", required=True)
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--wheels", default="", help="the carried wheels installed (space-separated file names)")
    p.add_argument("--wheels-rc", type=int, default=0)
    p.add_argument("--wheels-s", type=float, default=0.0)
    g = sub.add_parser("grid", parents=[common])
    g.add_argument("--deadline", type=float, default=None, help="epoch seconds: no row starts that would end later")
    g.add_argument("--first-row-s", type=float, default=30.0, help="assumed cost of a model's first row")
    g.add_argument("--rows", default=None, help='regular expression on "model name": run only those rows')
    r = sub.add_parser("record", parents=[common])
    r.add_argument("--step", required=True)
    r.add_argument("--rc", type=int, required=True)
    r.add_argument("--wall-s", type=float, required=True)
    r.add_argument("--reports", default=None)
    r.add_argument("--note", default=None)
    f = sub.add_parser("finish", parents=[common])
    f.add_argument("--monitor", default=None)
    f.add_argument("--wall-s", type=float, required=True)
    args = ap.parse_args(argv)
    return {"prepare": cmd_prepare, "grid": cmd_grid, "record": cmd_record, "finish": cmd_finish}[args.cmd](args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

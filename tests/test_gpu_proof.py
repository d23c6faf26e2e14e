"""benchmarks/gpu_proof.sh: the CPU rehearsal runs end to end and writes the JSON the GPU run will write.

The rehearsal here runs three grid rows (LoRA on both models, one QLoRA row) with tiny shapes: the full rehearsal
(`bash benchmarks/gpu_proof.sh --rehearse`, every step and row) takes minutes on this 2-core machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_proof.sh"
ROWS = r"^kogpt2 lora fp32 b8 s512$|^kogpt2 qlora bf16 b8 s512$|^llama lora bf16-weights b4 s1024 ckpt$"
MAX_FILES_BACK = 8      # what a remote GPU runner copies back: at most 8 files, at most 2 folders down


def _helper():
    spec = importlib.util.spec_from_file_location("gpu_proof", ROOT / "benchmarks" / "gpu_proof.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-proof-out")
    empty = tmp_path_factory.mktemp("no-wheels")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_PROOF_WHEELS": str(empty),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "--rehearse", "--steps", "grid", "--rows", ROWS],
                          env=env, capture_output=True, text=True, timeout=240)
    return out, proc, time.monotonic() - t0


def test_rehearsal_writes_the_device_json(rehearsal):
    out, proc, _ = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu-cpu-rehearsal.json").read_text(encoding="utf-8"))
    assert doc["schema"] == _helper().SCHEMA and doc["mode"] == "rehearsal" and doc["semantics"] == "cpu"
    v = doc["versions"]
    import torch
    import transformers

    assert v["torch"] == torch.__version__ and v["packages"]["transformers"] == transformers.__version__
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"bitsandbytes", "peft", "pytest-html"} <= set(v["packages"])
    # both models, built from config with random weights; the KoGPT-2-shaped one saved for pytest --model=DIR
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in ("kogpt2", "llama"):
        cfg = AutoConfig.for_model(**doc["models"][name]["config"])
        model = AutoModelForCausalLM.from_config(cfg)
        assert doc["models"][name]["parameters"] == sum(p.numel() for p in model.parameters()), name
    assert [s["name"] for s in doc["steps"]] == ["wheels", "prepare", "grid"]
    assert all(s["rc"] == 0 for s in doc["steps"])
    assert doc["steps"][0]["wheels"] == [] and "no carried wheels" in doc["steps"][0]["note"]


def test_rehearsal_rows_have_measured_and_predicted_figures(rehearsal):
    out, _, _ = rehearsal
    doc = json.loads((out / "gpu-cpu-rehearsal.json").read_text(encoding="utf-8"))
    rows = doc["rows"]
    assert [(r["model"], r["config"]) for r in rows] == [
        ("kogpt2", "lora fp32 b8 s512"), ("llama", "lora bf16-weights b4 s1024 ckpt"), ("kogpt2", "qlora bf16 b8 s512")]
    for r in rows:
        assert set(_helper().ROW_KEYS) <= set(r), r
        assert r["predicted_peak_bytes"] > 0 and r["semantics"] == "cpu"
        assert "mfu" in r and r["mfu"] is None   # no peak TFLOP/s on a CPU
        if "qlora" in r["config"]:   # NF4 steps run on CUDA only: predicted, not measured, and says why
            assert r["measured_peak_bytes"] is None and "CUDA" in r["measure_error"]
            assert r["tokens_per_s"] is None and r["error_percent"] is None
            continue
        assert r["measured_peak_bytes"] > 0 and r["measure"]["method"] == "cpu_profiler"
        assert r["error_percent"] == pytest.approx(
            100 * (r["predicted_peak_bytes"] / r["measured_peak_bytes"] - 1), abs=1e-3)
        assert abs(r["error_percent"]) < 5, r   # CPU-semantics trace vs the real CPU step
        b, s = map(int, re.match(r"b=(\d+) s=(\d+) ", r["shape"]).groups())
        assert r["tokens_per_s"] == pytest.approx(b * s / (r["step_ms"] / 1e3), rel=1e-2)
        assert len(r["losses"]) == 3 and all(x == x for x in r["losses"])   # warm-up + 2 timed steps, finite
    s = doc["summary"]
    assert s["rows"] == 3 and s["rows_measured"] == 2 and s["rows_with_tokens_per_s"] == 2
    assert s["max_abs_error_percent"] == max(abs(r["error_percent"]) for r in rows if r["error_percent"] is not None)


def test_rehearsal_output_fits_what_comes_back(rehearsal):
    """Every file under OUT: at most 8, at most one folder down; the monitor ran through the whole run."""
    out, proc, wall = rehearsal
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) <= MAX_FILES_BACK and all(f.count("/") <= 2 for f in files), files
    assert {"gpu-cpu-rehearsal.json", "gpu-proof.log", "monitor/samples.jsonl", "monitor/summary.json",
            "monitor/timeline.png"} <= set(files)
    assert (out / "monitor" / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mon = json.loads((out / "monitor" / "summary.json").read_text(encoding="utf-8"))
    assert mon["stop_reason"] == "SIGTERM" and mon["sample_count"] >= 2
    assert mon["duration_s"] <= wall
    log = (out / "gpu-proof.log").read_text(encoding="utf-8")
    assert "rows 3/3 run, 2 measured vs predicted (cpu semantics)" in log
    assert "no carried wheels" in log


def test_grid_covers_the_issue_and_stops_at_the_deadline(tmp_path):
    """The full grid: >= 12 rows over both models, LoRA and QLoRA, fp32 and bf16, several batch sizes and sequence
    lengths, with and without checkpointing; a deadline already passed skips every row and keeps the JSON valid."""
    gp = _helper()
    gp.kogpt2_config(True).save_pretrained(tmp_path / "kogpt2")
    gp.llama_config(True).save_pretrained(tmp_path / "llama")
    doc_path = tmp_path / "gpu-x.json"
    gp.save(doc_path, {"rows": [], "steps": []})
    args = argparse.Namespace(json=str(doc_path), work=str(tmp_path), rehearse=True, deadline=time.time(),
                              first_row_s=5.0, rows=None)
    assert gp.cmd_grid(args) == 0
    rows = json.loads(doc_path.read_text(encoding="utf-8"))["rows"]
    shapes = [shape for _, _, shape in gp.grid_shapes(False)]
    assert len(rows) == len(shapes) >= 12
    assert all("time budget" in r["skipped"] for r in rows)
    assert {r["model"] for r in rows} == {"kogpt2", "llama"}
    assert {s.quantization for s in shapes} == {"none", "4bit"} and {s.dtype for s in shapes} == {"fp32", "bf16"}
    assert {s.gradient_checkpointing for s in shapes} == {True, False}
    assert len({s.batch_size for s in shapes}) >= 3 and len({s.seq_len for s in shapes}) >= 3
    for model in ("kogpt2", "llama"):
        mine = [s for (m, _, s) in gp.grid_shapes(False) if m == model]
        assert {s.quantization for s in mine} == {"none", "4bit"}, model


def test_junit_summary_counts_and_messages(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase name="a"/><testcase name="b"><failure message="no usable CUDA GPU: why&#10;more"/>'
                   '</testcase><testcase name="c"><skipped/></testcase></testsuite></testsuites>', encoding="utf-8")
    s = _helper().junit_summary(xml)
    assert (s["tests"], s["passed"], s["failures"], s["skipped"]) == (3, 1, 1, 1)
    assert s["failed"] == ["b: no usable CUDA GPU: why"]
    assert _helper().junit_summary(tmp_path / "missing.xml")["junit"] is None

"""Fault matrix, inputs part: sizes from a config never allocate, malformed files and options fail in one line
(checks and CLI), the monitor survives bad options, closed pipes and signals, refusals never advise unsafe loading.

Each case was a traceback, a hang or a multi-GB allocation before its fix (issue 17, points 6-9).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from suite_runner import ROOT, documented, run_suite

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kolora_probe", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout, **kw)


def cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """``kolora-probe ARGS`` in this process (no torch import per call); the same exit code and streams."""
    from kolora_probe.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_one_line_exit_2(r: subprocess.CompletedProcess, *fragments: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("kolora-probe ")]
    assert len(lines) == 1, r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def gpt2_dir(tmp_path: Path, name: str, **overrides) -> Path:
    from transformers import GPT2Config

    d = tmp_path / name
    d.mkdir(parents=True)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0,
                     eos_token_id=0).to_dict()
    cfg.update(overrides)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# --- point 6: nothing real is allocated for a count or a shape ---------------------------------------------
PEAK_RSS = r'''
import resource, sys
from kolora_probe.model.source import resolve_config
from kolora_probe.model.meta import build_meta_model
from kolora_probe.lora.count import count_lora
_, config = resolve_config(sys.argv[1])
model = build_meta_model(config)
import accelerate, peft  # noqa: E401,F401 - imported before the baseline: only the count itself is measured
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
c = count_lora(model, ["all-linear"], 256)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, c.lora_params, c.peft_trainable_params)
'''


def test_lora_count_with_a_large_rank_allocates_no_adapter_weights(tmp_path):
    """LoRA r=256 on every linear layer of 8 LLaMA-70B-sized blocks is ~1.3 GB of fp32 adapter weights: the
    PEFT cross-check must create them on the meta device (peak RSS grows by far less than that)."""
    from transformers import LlamaConfig

    d = tmp_path / "llama70b-8layers"
    LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=8,
                num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False).save_pretrained(d)
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, str(d)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    before_kb, after_kb, lora, peft = map(int, r.stdout.split()[-4:])
    assert lora == peft                                        # PEFT still counted, on meta tensors
    adapter_bytes = lora * 4
    assert adapter_bytes > 1.2e9
    assert (after_kb - before_kb) * 1024 < adapter_bytes / 10, (before_kb, after_kb, adapter_bytes)


def test_analyze_a_config_too_wide_to_allocate(tmp_path):
    """n_embd = 10^7: one Conv1D weight is 1.2 PB. Built on the meta device, analyze answers from the shapes."""
    d = gpt2_dir(tmp_path, "wide", n_embd=10_000_000, n_layer=1, n_head=1)
    r = cli("analyze", f"--model={d}", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    c_attn = next(l for l in doc["layers"] if l["name"].endswith("c_attn"))
    assert (c_attn["in_features"], c_attn["out_features"]) == (10_000_000, 30_000_000)


class CountingName(str):
    """A module name that counts the work done on it (``split``/``endswith``/``==``/hash lookups)."""
    calls = 0

    def split(self, *a, **k):
        CountingName.calls += 1
        return super().split(*a, **k)

    def endswith(self, *a, **k):
        CountingName.calls += 1
        return super().endswith(*a, **k)

    def __eq__(self, other):
        CountingName.calls += 1
        return super().__eq__(other)

    def __hash__(self):             # every set/dict lookup of a name
        CountingName.calls += 1
        return super().__hash__()


@pytest.mark.parametrize("blocks", [500, 2000])
def test_minimal_targets_work_is_linear_in_the_layers(blocks):
    """10,000-layer configs made the suggestion quadratic: the work per module name must stay constant."""
    from kolora_probe.model.structure import minimal_targets

    names = [CountingName(f"model.layers.{i}.{leaf}") for i in range(blocks)
             for leaf in ("self_attn", "self_attn.q_proj", "self_attn.v_proj", "mlp", "mlp.up_proj")]
    chosen = [n for n in names if n.endswith(("q_proj", "v_proj"))]
    CountingName.calls = 0
    assert minimal_targets(chosen, names) == ("q_proj", "v_proj")
    assert CountingName.calls <= 20 * len(names), CountingName.calls


# --- point 7: malformed inputs are one line -----------------------------------------------------------------
def safetensors_with_header(path: Path, header) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    return path


@pytest.mark.parametrize("header", [
    [1, 2, 3],
    7,
    {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", "16"]}},
    {"w": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}},
    {"w": [0, 16]},
], ids=["list", "int", "string-offsets", "string-shape", "entry-not-object"])
def test_malformed_safetensors_header_is_one_line(tmp_path, header):
    from kolora_probe.model.loading import ModelLoadError, check_safetensors

    f = safetensors_with_header(tmp_path / "model.safetensors", header)
    with pytest.raises(ModelLoadError) as e:
        check_safetensors(f)
    msg = str(e.value)
    documented("malformed safetensors header")
    assert "model.safetensors: malformed safetensors header" in msg and "fix:" in msg and "\n" not in msg


def local_source(d: Path):
    from kolora_probe.model.source import resolve_model_source

    return resolve_model_source(str(d))


@pytest.mark.parametrize("weight_map", [
    {"w": ["model-00001.safetensors"]}, {"w": 3}, [1, 2], {},
], ids=["value-list", "value-int", "map-list", "empty"])
def test_malformed_shard_index_is_one_line(tmp_path, weight_map):
    from kolora_probe.model.loading import ModelLoadError, find_weights

    d = gpt2_dir(tmp_path, "m")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ModelLoadError) as e:
        find_weights(local_source(d))
    documented("malformed shard index")
    assert "malformed shard index" in str(e.value) and "\n" not in str(e.value)


def test_shard_outside_the_model_directory_is_refused_by_the_gate(model_zoo, tmp_path):
    """An index naming ``../other/model.safetensors`` loaded another model's weights and passed."""
    model, other = tmp_path / "model", tmp_path / "other"
    shutil.copytree(model_zoo.tiny, model)
    other.mkdir()
    (model / "model.safetensors").rename(other / "model.safetensors")
    from safetensors import safe_open

    with safe_open(other / "model.safetensors", "pt") as f:
        names = list(f.keys())
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "../other/model.safetensors" for n in names}}))
    run = run_suite("checks/test_model.py", f"--model={model}", reports=tmp_path / "r")
    assert run.returncode == 1, run.output[-3000:]
    check = run.outcome("test_weights_load")
    documented("outside the model directory")
    assert check["outcome"] == "failed" and "outside the model directory" in check["message"], check
    assert "'../other/model.safetensors'" in check["message"] and "\n" not in check["message"]
    assert run.outcome("test_model_found")["outcome"] == "passed"      # the other checks still ran


@pytest.mark.parametrize("key, value, shown", [
    ("vocab_size", "1600", 'vocab_size = "1600"'),
    ("n_head", 0, "n_head = 0"),
    ("vocab_size", -5, "vocab_size = -5"),
    ("n_layer", 2.5, "n_layer = 2.5"),
])
def test_config_value_of_the_wrong_type_or_impossible_cli(tmp_path, capsys, key, value, shown):
    d = gpt2_dir(tmp_path, "bad", **{key: value})
    documented("expected an integer >= 1; fix config.json")
    for command in ("analyze", "lora"):
        line = assert_one_line_exit_2(cli_here(capsys, command, f"--model={d}"), str(d / "config.json"), shown,
                                      "expected an integer >= 1; fix config.json")
        assert line.startswith(f"kolora-probe {command}: ")


def test_config_sizes_that_do_not_fit_together_cli(tmp_path, capsys):
    d = gpt2_dir(tmp_path, "heads", n_head=5)                  # 64 is not divisible by 5 heads
    documented("transformers cannot build")
    assert_one_line_exit_2(cli_here(capsys, "analyze", f"--model={d}"), "transformers cannot build 'gpt2'", "divisible")


def test_config_value_of_the_wrong_type_in_the_gate(model_zoo, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_zoo.tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": str(cfg["vocab_size"])}))
    run = run_suite("checks/test_model.py", "checks/test_structure.py", f"--model={d}", reports=tmp_path / "r")
    assert run.returncode == 1, run.output[-3000:]
    for check in ("test_weights_load", "test_adaptable_layers_found"):
        c = run.outcome(check)
        assert c["outcome"] == "failed" and "vocab_size = \"1600\" is invalid" in c["message"], c
        assert "\n" not in c["message"]
    assert "Traceback" not in run.output


def test_model_path_too_long(tmp_path, capsys):
    long_model = "/" + "a" * 5000
    documented("cannot be a path here")
    line = assert_one_line_exit_2(cli_here(capsys, "analyze", f"--model={long_model}"), "cannot be a path here",
                                  "(5,001 characters)")
    assert len(line) < 600
    run = run_suite("checks/test_model.py::test_model_found", f"--model={long_model}", reports=tmp_path / "r")
    c = run.outcome("test_model_found")
    assert c["outcome"] == "failed" and "cannot be a path here" in c["message"] and len(c["message"]) < 600, c


# --- point 8: the monitor ---------------------------------------------------------------------------------
def monitor(*args: str, **kw) -> subprocess.CompletedProcess:
    return cli("monitor", *args, **kw)


def test_monitor_output_is_a_file_or_unwritable(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    documented("is not a writable directory")
    assert_one_line_exit_2(monitor("--output", str(afile), "--interval", "0.05", "--duration", "0.1"),
                           f"--output {afile} is not a writable directory")
    assert_one_line_exit_2(monitor("--output", str(afile / "sub"), "--interval", "0.05", "--duration", "0.1"),
                           "is not a writable directory")


@pytest.mark.parametrize("interval", ["1e-300", "0.0001", "1e9"])
def test_monitor_interval_out_of_bounds(interval):
    """``--interval 1e-300 --duration 0`` used to sample forever."""
    documented("is out of range; fix: give --interval")
    assert_one_line_exit_2(monitor("--interval", interval, "--duration", "0", timeout=60),
                           "is out of range; fix: give --interval between")


def test_monitor_duration_is_wall_time(tmp_path):
    """A tiny interval with a duration stops after the duration, not after duration / interval samples."""
    from kolora_probe.monitor.recorder import Monitor, SystemMemory

    class System:
        def sample(self):
            return SystemMemory(1, 2, 1, None)

    class NoGpu:
        def open(self):
            return "no GPU in this test"

        def sample(self):
            return []

        def close(self):
            pass

    m = Monitor(None, 1e-9, gpu_source=NoGpu(), system_source=System())
    t0 = time.monotonic()
    summary = m.run(0.2)
    assert summary.stop_reason == "duration" and time.monotonic() - t0 < 30
    assert summary.sample_count >= 1


def test_monitor_stdout_closed_still_writes_summary_and_png(tmp_path):
    out = tmp_path / "mon"
    p = subprocess.Popen([sys.executable, "-m", "kolora_probe", "monitor", "--interval", "0.05", "--output", str(out)],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        for _ in range(2):                         # like `| head -2`
            p.stdout.readline()
        p.stdout.close()
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "stdout closed"
    assert (out / "timeline.png").read_bytes().startswith(b"\x89PNG")


def test_monitor_sigterm_always_stops(tmp_path):
    """SIGTERM at random moments (in the wait, in a sample, while writing): the monitor always ends with a
    summary. A handler calling Event.set() could deadlock against the waiting main thread."""
    rng = random.Random(17)
    for i in range(6):
        out = tmp_path / f"m{i}"
        p = subprocess.Popen([sys.executable, "-m", "kolora_probe", "monitor", "--interval", "0.01",
                              "--output", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 60
            while not (out / "samples.jsonl").exists() or not (out / "samples.jsonl").stat().st_size:
                assert time.time() < deadline and p.poll() is None
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.05))
            p.send_signal(signal.SIGTERM)
            _, stderr = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, stderr
        assert json.loads((out / "summary.json").read_text())["stop_reason"] == "SIGTERM"


# --- point 9: refusals never advise unsafe loading; huge target lists are echoed capped, matched linearly -----
def test_refused_pickle_names_the_global_and_never_suggests_unsafe_loading(tmp_path, model_zoo):
    from kolora_probe.model.loading import ModelLoadError, verify_bin_weights_only

    marker = tmp_path / "PWNED"
    evil = tmp_path / "pytorch_model.bin"
    code = ("import os, sys, torch\n"
            "class E:\n"
            "    def __reduce__(self):\n"
            f"        return (os.system, ('touch {marker}',))\n"
            f"torch.save({{'w': E()}}, {str(evil)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    messages = []
    for f in (evil, model_zoo.pickle_bin / "pytorch_model.bin"):
        with pytest.raises(ModelLoadError) as e:
            verify_bin_weights_only(f)
        messages.append(str(e.value))
    documented("refused: it is not a plain weights pickle")
    assert "unsupported global posix.system" in messages[0] or "unsupported global os.system" in messages[0]
    assert "unsupported global exec" in messages[1]
    for m in messages:
        assert "weights_only` set to `False" not in m and "weights_only=False" not in m, m
        assert "Re-running" not in m and "\n" not in m
    assert not marker.exists()


def test_a_huge_target_list_is_echoed_capped():
    from kolora_probe.lora.count import TargetError, resolve_targets
    from kolora_probe.model.meta import build_meta_model
    from kolora_probe.model.structure import analyze_model
    from transformers import GPT2Config

    report = analyze_model(build_meta_model(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100,
                                                       n_positions=32, bos_token_id=0, eos_token_id=0)))
    targets = [f"x{i}" for i in range(200_000)] + ["y" * 10_000]
    with pytest.raises(TargetError) as e:
        resolve_targets(report, targets)
    msg = str(e.value)
    assert len(msg) < 2000 and "\n" not in msg, len(msg)
    assert "target 'x0' matches no module" in msg and "and 199,996 more of the 200,001 targets" in msg
    # repeated names count once (PEFT keeps a set) and still match
    assert [m.target for m in resolve_targets(report, ["c_attn"] * 100_000)] == ["c_attn"]

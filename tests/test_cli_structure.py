"""`kolora-probe analyze` and `kolora-probe lora` as users run them (subprocess, HF_HUB_OFFLINE=1, config-only dir)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from structure_configs import kogpt2_config, save_config
from suite_runner import run_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ko_dir(tmp_path_factory):
    return save_config(kogpt2_config(), tmp_path_factory.mktemp("kogpt2-config-only"))


def cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "kolora_probe", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args)


def our_lines(stderr: str, command: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith(f"kolora-probe {command}:")]


def test_analyze_json_on_config_only_dir(ko_dir):
    p = cli("analyze", "--model", str(ko_dir), "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["total_params"] == 125_164_032 and d["total_params_if_untied"] == 164_485_632
    assert d["trainable_params"] == 125_164_032 and d["trainable_percent"] == 100.0   # no adapter yet
    rows = {m["name"]: m for m in d["modules"]}
    assert rows["transformer.h.0.attn.c_attn"] == {**rows["transformer.h.0.attn.c_attn"], "kind": "Conv1D",
                                                    "in_features": 768, "out_features": 2304, "role": "attention",
                                                    "lora_params": 16 * (768 + 2304)}
    assert rows["lm_head"]["lora_params"] == 831_488 and rows["lm_head"]["role"] == "output_head"
    assert d["roles"] == {"attention": 24, "mlp": 24, "output_head": 1, "embedding": 2, "other": 0}
    sugg = {s["name"]: s for s in d["suggested_targets"]}
    assert sugg["attention+mlp"]["targets"] == ["c_attn", "c_proj", "c_fc"]
    assert sugg["attention+mlp"]["trainable_params"] == 2_359_296


def test_analyze_table(ko_dir):
    p = cli("analyze", "--model", str(ko_dir))
    assert p.returncode == 0, p.stderr
    assert "total parameters: 125,164,032" in p.stdout and "164,485,632 if the ties were lost" in p.stdout
    assert "tied: transformer.wte.weight = lm_head.weight" in p.stdout
    assert "transformer.h.*.attn.c_attn ×12  Conv1D" in p.stdout
    assert "--targets c_attn,c_proj,c_fc" in p.stdout


def test_lora_default_plan_lm_head_json(ko_dir):
    p = cli_subprocess("lora", "--model", str(ko_dir), "--expected-trainable=831488", "--json")   # the real entry point
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(p.stdout)
    assert (d["total_params"], d["trainable_params"], d["peft_trainable_params"]) == (125_164_032, 831_488, 831_488)
    assert d["expected_trainable_params"] == 831_488 and d["ok"] is True
    assert round(d["trainable_percent"], 2) == 0.66
    assert d["trainable_percent"] == pytest.approx(100 * 831_488 / (125_164_032 + 831_488), abs=1e-5)
    assert d["modules"] == [{"name": "lm_head", "kind": "Linear", "in_features": 768, "out_features": 51200,
                             "role": "output_head", "lora_params": 831_488, "bias_params": 0}]
    assert "tied_target" in {f["code"] for f in d["findings"]}


def test_lora_on_another_model_drops_the_plans_count_and_says_so(tmp_path):
    """The default plan pins 831,488 for skt/kogpt2-base-v2's lm_head; on another --model it is not compared (exit
    0, not MISMATCH), the note says why, and the count is still shown. --expected-trainable=none unsets it."""
    from structure_configs import llama_config

    cfg = llama_config()
    other = save_config(cfg, tmp_path / "llama")
    count = 16 * (cfg.hidden_size + cfg.vocab_size)                 # LoRA r=16 on lm_head (hidden → vocab)
    p = cli("lora", "--model", str(other))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "MISMATCH" not in p.stdout and f"trainable parameters: {count:,}" in p.stdout
    assert "note: lora.expected_trainable_params = 831,488 from " in p.stdout and f"--model {other}" in p.stdout
    p = cli("lora", "--model", str(other), "--expected-trainable=none", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(p.stdout)
    assert d["expected_trainable_params"] is None and d["ok"] is True and d["trainable_params"] == count


def test_lora_c_attn_json(ko_dir):
    p = cli("lora", "--model", str(ko_dir), "--targets", "c_attn", "--r", "16", "--alpha", "32", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(p.stdout)
    assert d["trainable_params"] == d["peft_trainable_params"] == 589_824
    assert d["expected_trainable_params"] is None          # the plan's 831,488 is for lm_head, not c_attn
    assert len(d["modules"]) == 12 and {m["lora_params"] for m in d["modules"]} == {16 * (768 + 2304)}
    assert "conv1d_fan_in_fan_out" in {f["code"] for f in d["findings"]}


def test_lora_with_qlora_plan_file(ko_dir):
    p = cli("lora", "--plan", str(ROOT / "plans" / "kogpt2-qlora.toml"), "--model", str(ko_dir),
            "--expected-trainable=2359296")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "trainable parameters: 2,359,296" in p.stdout
    assert "expected (plan): 2,359,296 — matches" in p.stdout and "agrees" in p.stdout


def test_lora_expected_mismatch_exits_1(ko_dir):
    p = cli("lora", "--model", str(ko_dir), "--expected-trainable", "1")
    assert p.returncode == 1
    assert "trainable parameters: 831,488" in p.stdout
    assert "expected (plan): 1 — MISMATCH (actual 831,488)" in p.stdout


def test_lora_misspelt_target_one_line_exit_2(ko_dir):
    p = cli("lora", "--model", str(ko_dir), "--targets", "c_atn")
    assert p.returncode == 2 and p.stdout == ""
    assert our_lines(p.stderr, "lora") == [
        "kolora-probe lora: target 'c_atn' matches no module; close names: c_attn; "
        "fix [lora].target_modules or --targets"]


def test_missing_model_one_line_exit_2(tmp_path):
    for command in ("analyze", "lora"):
        p = cli(command, "--model", "no-such-org/no-such-model")
        assert p.returncode == 2 and p.stdout == ""
        (line,) = our_lines(p.stderr, command)
        assert "'no-such-org/no-such-model' (revision main) not found" in line
        assert "HF_HUB_OFFLINE" in line and "--model DIR" in line
    p = cli("analyze", "--model", str(tmp_path))                  # a directory without config.json
    assert p.returncode == 2 and "has no config.json" in our_lines(p.stderr, "analyze")[0]


def test_unusable_config_one_line_exit_2(tmp_path):
    import json

    from transformers import T5Config

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text('{"model_type": "gpt2", ')
    future = tmp_path / "future"
    future.mkdir()
    (future / "config.json").write_text(json.dumps({"model_type": "kolora-future-arch"}))
    t5 = tmp_path / "t5"
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=100).save_pretrained(t5)
    for command, d, fragment in (("analyze", cut, f"{cut / 'config.json'} is not valid JSON"),
                                 ("lora", future, "model_type 'kolora-future-arch' is not known to transformers"),
                                 ("estimate", t5, "model_type 't5' (T5Config) is not a causal language model")):
        p = cli(command, f"--model={d}")
        assert p.returncode == 2 and p.stdout == "", (command, p.stdout, p.stderr)
        (line,) = our_lines(p.stderr, command)
        assert fragment in line and "fix" in line, line
        assert "Traceback" not in p.stderr


def test_cli_help_path_imports_no_torch():
    code = ("import sys; from kolora_probe.cli import main as cli; cli.build_parser(); "
            "print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "kolora_probe", "lora", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "--targets" in p.stdout and "--plan" in p.stdout and "--json" in p.stdout

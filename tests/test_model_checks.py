"""The model checks on a checkpoint with non-finite weights (the gate's test_weights_finite and generation)."""
from __future__ import annotations

import shutil

import torch

from suite_runner import run_suite


def test_nan_and_inf_weights_are_named(tmp_path, model_zoo):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_zoo.tiny)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 5] = float("nan")      # one value of 16k
        model.transformer.h[1].ln_2.bias[7] = -float("inf")
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    shutil.copy(model_zoo.tiny / "tokenizer.json", broken / "tokenizer.json")
    run = run_suite("checks/test_model.py", f"--model={broken}", reports=tmp_path / "r")
    entry = run.outcome("test_weights_finite")
    assert entry["outcome"] == "failed" and "2 weight tensors contain NaN/inf" in entry["message"]
    ev = {e["name"]: e["actual"] for e in entry["evidence"]}
    assert ev["non_finite_tensors"] == ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.ln_2.bias"]
    assert run.outcome("test_greedy_generation")["outcome"] == "failed"
    assert run.outcome("test_weights_load")["outcome"] == "passed"

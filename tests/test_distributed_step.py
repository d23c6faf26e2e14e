"""A real 2-rank DDP LoRA step on the CPU (gloo, torchrun), measured per rank, against the per-rank prediction
with CPU semantics (one rank's traced step + DDP's gradient buckets + gloo's all-reduce scratch)."""
from __future__ import annotations

import json

from distributed_runner import torchrun
from transformers import GPT2Config


def test_two_rank_ddp_step_measured_per_rank_matches_prediction(tmp_path):
    model = tmp_path / "gpt2"
    GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
               architectures=["GPT2LMHeadModel"]).save_pretrained(model)
    out = tmp_path / "ddp.json"
    proc = torchrun("benchmarks/distributed_step.py", f"--model={model}", "--targets=c_attn,c_proj,c_fc",
                    "--batch-size=2", "--seq-len=32", "--lora-r=8", f"--output={out}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    doc = json.loads(out.read_text())
    assert [r["rank"] for r in doc["ranks"]] == [0, 1]
    predicted = doc["predicted_bytes"]
    for r in doc["ranks"]:
        err = (predicted - r["measured_bytes"]) / r["measured_bytes"]
        assert abs(err) < 0.01, f"rank {r['rank']}: predicted {predicted:,} vs measured {r['measured_bytes']:,}"
    # the buckets are what DDP adds on top of one rank's step: without them the prediction falls short
    without = predicted - doc["components"]["ddp_gradient_buckets"] - doc["components"]["gloo_allreduce_scratch"]
    assert all(r["measured_bytes"] - without > 0.5 * doc["components"]["ddp_gradient_buckets"] for r in doc["ranks"])

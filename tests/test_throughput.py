"""FLOPs per token against hand-derived numbers and against torch's own FLOP counter; peaks, MFU, rates."""
from __future__ import annotations

import math

import pytest

from kolora_probe.memory.throughput import (PEAK_TFLOPS, BackwardScope, Peak, StepThroughput, attention_flops_per_token,
                                     backward_scope, forward_flops_per_token, forward_pass, gpu_key, lora_copy,
                                     make_batch, matmul_params, measure_tokenization, mfu, optimizer_for,
                                     peak_tflops, shape_from_config, throughput_from_seconds, train_step,
                                     training_flops_per_token)

# A GPT-2 with d=8, 2 layers, 2 heads, vocabulary 16, MLP 4·d = 32. Per layer the matmul weights are
# c_attn 8×24 = 192, attn.c_proj 8×8 = 64, mlp.c_fc 8×32 = 256, mlp.c_proj 32×8 = 256 → 768; two layers
# 1536; lm_head 8×16 = 128 (tied to wte, still a matmul) → N = 1664. LoRA r=2 on c_attn adds A 8×2 = 16 and
# B 2×24 = 48 per layer → N_trainable = 128, N = 1792.
N_BASE, N_LORA, L, D, S = 1664, 128, 2, 8, 4
N = N_BASE + N_LORA


def tiny_config():
    from transformers import GPT2Config

    return GPT2Config(n_embd=D, n_layer=L, n_head=2, vocab_size=16, n_positions=32, bos_token_id=0,
                      eos_token_id=0)


@pytest.fixture(scope="module")
def tiny_models():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    full = GPT2LMHeadModel(tiny_config())
    torch.manual_seed(0)
    lora = get_peft_model(GPT2LMHeadModel(tiny_config()),
                          LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["c_attn"],
                                     fan_in_fan_out=True))
    return full, lora


def test_hand_derived_numbers():
    # attention: 4·L·s·d = 4·2·4·8 = 256 forward per token
    assert attention_flops_per_token(L, S, D) == 256
    assert forward_flops_per_token(N, L, S, D) == 2 * 1792 + 256 == 3840
    f = training_flops_per_token(N, N_LORA, L, S, D)
    # backward: activation grads 2·1792 + weight grads 2·128 + attention 2·256 = 4352
    assert (f.forward, f.backward) == (3840, 4352)
    assert f.total == 4 * N + 2 * N_LORA + 12 * L * S * D == 8192
    assert f.recompute == 0 and f.with_recompute == f.total
    full = training_flops_per_token(N_BASE, N_BASE, L, S, D)
    assert full.total == 6 * N_BASE + 12 * L * S * D == 10752     # PaLM App. B: 6N + 12·L·s·d
    ckpt = training_flops_per_token(N, N_LORA, L, S, D, gradient_checkpointing=True)
    assert ckpt.total == f.total and ckpt.with_recompute == f.total + 3840  # recompute is not model FLOPs
    with pytest.raises(ValueError):
        training_flops_per_token(10, 11, L, S, D)


def test_shape_and_matmul_params_of_a_real_model(tiny_models):
    full, lora = tiny_models
    shape = shape_from_config(tiny_config())
    assert (shape.n_layers, shape.d_model, shape.d_attn, shape.vocab_size) == (L, D, D, 16)
    assert matmul_params(full) == (N_BASE, N_BASE)
    assert matmul_params(lora) == (N, N_LORA)


def _flops_counted(model, x):
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad()
    with FlopCounterMode(display=False) as fwd:
        out = model(input_ids=x, labels=x)
    with FlopCounterMode(display=False) as bwd:
        out.loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def test_formula_matches_torch_flop_counter(tiny_models):
    """torch's FlopCounterMode counts the real model's matmul and attention FLOPs. Forward matches the formula
    exactly; so does the backward of full fine-tuning (6N + 12·L·s·d). With LoRA on c_attn autograd skips the
    input gradients of layer 0's c_attn and lora_A (their inputs need no gradient): the plain formula counts
    them, the backward scope does not and matches exactly."""
    import torch

    x = torch.randint(0, 16, (1, S))
    tokens = x.numel()
    full, lora = tiny_models
    fwd, bwd = _flops_counted(full, x)
    f = training_flops_per_token(N_BASE, N_BASE, L, S, D)
    assert (fwd, bwd) == (f.forward * tokens, f.backward * tokens)
    assert backward_scope(full, L) == BackwardScope(N_BASE, L)

    fwd, bwd = _flops_counted(lora, x)
    plain = training_flops_per_token(N, N_LORA, L, S, D)
    assert fwd == plain.forward * tokens
    skipped = 2 * (D * 3 * D) + 2 * (D * 2)          # layer-0 c_attn (8×24) and lora_A (8×2) input gradients
    assert bwd == (plain.backward - skipped) * tokens
    scope = backward_scope(lora, L)
    assert scope == BackwardScope(N - D * 3 * D - D * 2, L)
    assert bwd == training_flops_per_token(N, N_LORA, L, S, D, backward=scope).backward * tokens


@pytest.mark.parametrize("targets, extra_blocks", [(["lm_head"], 0), (["c_fc"], 1)])
def test_backward_scope_for_adapters_high_in_the_model(targets, extra_blocks):
    """Adapters only on lm_head: no block back-propagates, the backward is the adapters' own few FLOPs (exact).
    Adapters on the MLP: the scope counts layer 0's attention too (documented: at most one block too many)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = get_peft_model(GPT2LMHeadModel(tiny_config()),
                           LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets))
    x = torch.randint(0, 16, (1, S))
    _, bwd = _flops_counted(model, x)
    n, n_t = matmul_params(model)
    scope = backward_scope(model, L)
    predicted = training_flops_per_token(n, n_t, L, S, D, backward=scope).backward * x.numel()
    assert predicted - bwd == extra_blocks * 2 * attention_flops_per_token(1, S, D) * x.numel()
    if targets == ["lm_head"]:
        assert scope == BackwardScope(2 * 16, 0)      # only lora_B (2×16) lies above lora_A
        assert predicted < training_flops_per_token(n, n_t, L, S, D).backward * x.numel() / 10


def test_gpu_names_map_to_the_table():
    cases = {
        "NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
        "NVIDIA H200": "H200 SXM", "NVIDIA H200 NVL": "H200 NVL", "NVIDIA A100-SXM4-80GB": "A100",
        "NVIDIA A100 80GB PCIe": "A100", "NVIDIA L4": "L4", "NVIDIA L40S": "L40S", "Tesla T4": "T4",
        "NVIDIA GeForce RTX 4090": "RTX 4090", "NVIDIA A10": "A10", "Tesla V100-SXM2-16GB": "V100",
    }
    for name, key in cases.items():
        assert gpu_key(name) == key, name
    assert gpu_key("NVIDIA A10G") is None          # not A10: unknown rather than wrong
    assert gpu_key("AMD Instinct MI300X") is None
    assert set(k for k in cases.values()) <= set(PEAK_TFLOPS)


def test_peak_lookup_by_dtype():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == Peak("H100 SXM", "bf16", 989.4)
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "fp32") == Peak("A100", "fp32", 19.5)
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "fp32", allow_tf32=True) == Peak("A100", "tf32", 156.0)
    assert peak_tflops("Tesla T4", "bf16") is None   # no bf16 tensor cores on Turing
    assert peak_tflops("Tesla T4", "fp16").tflops == 65.0
    assert peak_tflops("Some Unknown GPU", "bf16") is None
    for key, row in PEAK_TFLOPS.items():             # dense tensor-core peaks are never below CUDA-core fp32
        for dtype in ("tf32", "fp16", "bf16"):
            assert row[dtype] is None or row[dtype] >= row["fp32"], (key, dtype)


def test_mfu_and_step_throughput():
    # 4096 tokens in 0.5 s = 8192 tok/s; 8192 FLOPs/token → 67.1 MFLOP/s; against 1 TFLOP/s: 6.7e-5
    step = StepThroughput(8, 512, 0.5, flops_per_token=8192.0, peak=Peak("X", "bf16", 1.0))
    assert step.tokens == 4096 and step.tokens_per_s == 8192
    assert math.isclose(step.achieved_tflops, 8192 * 8192 / 1e12)
    assert math.isclose(step.mfu, 8192 * 8192 / 1e12)
    assert StepThroughput(1, 1, 1.0, 1.0).mfu is None
    assert math.isclose(mfu(1e9, 1e5, 989.4), 1e14 / 989.4e12)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)
    mean = throughput_from_seconds([1.0, 3.0], 2, 10)
    assert mean.seconds == 2.0 and mean.tokens_per_s == 10.0


def test_tokenization_throughput_counts_characters_and_tokens():
    calls = []

    def char_tokenizer(text, add_special_tokens=False):
        calls.append(add_special_tokens)
        return {"input_ids": [ord(c) for c in text if not c.isspace()]}

    ticks = iter([10.0, 12.0])
    r = measure_tokenization(char_tokenizer, ["한국어 문장", "둘"], repeats=2, timer=lambda: next(ticks))
    assert (r.texts, r.chars, r.tokens, r.seconds) == (4, 14, 12, 2.0)
    assert r.chars_per_s == 7.0 and r.tokens_per_s == 6.0 and set(calls) == {False}
    with pytest.raises(ValueError):
        measure_tokenization(char_tokenizer, [])


def _plan(targets=("c_attn",), grad_ckpt=False, dtype="fp32"):
    from kolora_probe.plan.schema import BudgetSpec, LoraSpec, ModelSpec, Plan, TrainingSpec

    return Plan(ModelSpec("tiny"), LoraSpec(r=2, alpha=4, dropout=0.0, target_modules=tuple(targets)),
                TrainingSpec(dtype=dtype, batch_size=2, seq_len=6, gradient_checkpointing=grad_ckpt),
                BudgetSpec(gpu_memory_gib=1))


def test_make_batch_packs_real_tokens_to_the_plan_shape():
    def tok(text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 16 for c in text]}

    batch = make_batch(tok, ["ab", "c"], batch_size=2, seq_len=4)
    assert batch.shape == (2, 4) and batch.flatten().tolist() == [ord(c) % 16 for c in "abcabcab"]
    with pytest.raises(ValueError):
        make_batch(tok, [""], 1, 1)


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_lora_training_step_trains_adapters_only_and_leaves_the_shared_model_alone(grad_ckpt):
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_config())
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    plan = _plan(grad_ckpt=grad_ckpt)
    model = lora_copy(base, plan)
    assert matmul_params(model) == (N, N_LORA)
    inner = model.get_base_model()
    assert getattr(inner, "is_activation_checkpointing", None) in (grad_ckpt, None)
    assert inner.is_gradient_checkpointing == grad_ckpt and inner.config.use_cache is False
    opt = optimizer_for(model, "adamw", lr=1e-2)
    batch = torch.randint(0, 16, (2, 6))
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = [train_step(model, opt, batch) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]   # it learns the batch
    assert all(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    # the shared (session) model is untouched: same weights, no adapters, still trainable as before
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    assert not any("lora" in n for n, _ in base.named_modules())
    logits = forward_pass(base, batch)
    assert logits.shape == (2, 6, 16) and bool(logits.isfinite().all())


def test_benchmark_checks_end_to_end_on_the_tiny_model(model_zoo, tmp_path):
    """``pytest -m benchmark`` on the tiny KoGPT-2 stand-in: all three benchmark checks pass and their results
    land in reports/benchmarks.json, reports/pytest-benchmark.json and the checks' evidence."""
    import json

    from suite_runner import run_suite

    reports = tmp_path / "reports"
    run = run_suite("-m", "benchmark", "--model", str(model_zoo.tiny), "--seq-len", "32", "--batch-size", "2",
                    "checks/test_benchmarks.py", reports=reports, timeout=300)
    outcomes = run.outcomes()
    assert len(outcomes) == 3 and set(outcomes.values()) == {"passed"}, run.output[-3000:]
    results = json.loads((reports / "benchmarks.json").read_text())["results"]
    by_name = {k.split("::")[1]: v for k, v in results.items()}
    assert by_name["test_korean_tokenization_throughput"]["tokenization_chars_per_s"] > 0
    assert by_name["test_forward_latency"]["forward_shape"].startswith("2x32 ")
    train = by_name["test_lora_training_step"]
    assert train["train_tokens_per_s"] > 0 and len(train["train_losses"]) >= 2
    raw = json.loads((reports / "pytest-benchmark.json").read_text())
    assert {b["name"] for b in raw["benchmarks"]} == set(by_name)
    evidence = {e["name"] for e in run.outcome("test_lora_training_step")["evidence"]}
    assert {"train_tokens_per_s", "train_step_ms", "train_mfu"} <= evidence

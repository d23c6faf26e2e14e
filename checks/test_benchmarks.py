"""Throughput benchmarks (``pytest -m benchmark``; not part of the default gate).

Korean tokenisation (chars/s), inference forward latency and one LoRA training step (tokens/s) at the plan's
``batch_size × seq_len``, on the device the model fixture loaded the model to; on a GPU also model FLOPs
utilisation against the device's dense peak (:mod:`kolora_probe.memory.throughput` documents the formula and table).
Timings: pytest-benchmark (``reports/pytest-benchmark.json``); derived numbers: ``reports/benchmarks.json`` and
the evidence rows of each check. The assertions check that what was timed is real work (tokens produced, finite
logits of the right shape, adapters trained and frozen weights untouched, MFU physically possible), never speed.
"""
from __future__ import annotations

import math
import time

import pytest

from kolora_probe.memory.throughput import (Peak, StepThroughput, backward_scope, forward_flops_per_token, forward_pass,
                                     lora_copy, make_batch, matmul_params, optimizer_for, peak_tflops,
                                     shape_from_config, synchronize, tokenize_all, train_step,
                                     training_flops_per_token)

pytestmark = pytest.mark.benchmark


def _texts(korean_texts) -> list[str]:
    return [korean_texts] if isinstance(korean_texts, str) else [t for t in korean_texts if t]


def _rounds(device) -> tuple[int, int]:
    """(rounds, warm-up rounds): a GPU step takes milliseconds, a CPU step of a 125M model at 8×512 seconds."""
    return (10, 2) if device.type == "cuda" else (2, 1)


def _timed(fn, timings: list[float]):
    def run(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timings.append(time.perf_counter() - start)
        return result
    return run


def _mean(timings: list[float], warmup: int) -> float:
    """Mean of the timed rounds (all calls when pytest-benchmark is disabled and ran the target once)."""
    timed = timings[warmup:] or timings
    return sum(timed) / len(timed)


def _peak(device, dtype: str) -> tuple[Peak | None, str | None]:
    """The device's dense peak for ``dtype``, or None and why there is none."""
    if device.type != "cuda":
        return None, f"no peak TFLOP/s for a {device.type} device: MFU is measured on a GPU only"
    import torch

    name = torch.cuda.get_device_name(device)
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
    peak = peak_tflops(name, dtype, allow_tf32=tf32)
    return peak, None if peak else f"{name!r} ({dtype}) is not in kolora_probe.memory.throughput.PEAK_TFLOPS"


def _device_and_batch(model, plan, tokenizer, korean_texts):
    """The model's device and a plan-sized batch of Korean text on it; fails when seq_len exceeds the positions."""
    t = plan.training
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if n_pos and t.seq_len > n_pos:
        pytest.fail(f"plan seq_len {t.seq_len} exceeds the model's {n_pos} positions; "
                    f"lower [training].seq_len or --seq-len", pytrace=False)
    device = next(model.parameters()).device
    return device, make_batch(tokenizer, _texts(korean_texts), t.batch_size, t.seq_len, device)


def _record(evidence, benchmark, benchmark_results, nodeid: str, values: dict, units: dict,
            mfu_note: str | None = None) -> None:
    if mfu_note:
        values["mfu_note"] = mfu_note
    for name, value in values.items():
        evidence(name, value, unit=units.get(name))
    benchmark.extra_info.update(values)
    benchmark_results.add(nodeid, **values)


def test_korean_tokenization_throughput(benchmark, tokenizer, korean_texts, evidence, benchmark_results, request):
    texts = _texts(korean_texts)
    assert texts, "no Korean text to tokenise; check kolora_probe/data/korean_sample.txt or [checks].korean_sample"
    timings: list[float] = []
    rounds, warmup = 20, 2
    tokens = benchmark.pedantic(_timed(tokenize_all, timings), args=(tokenizer, texts), rounds=rounds,
                                warmup_rounds=warmup)
    seconds = _mean(timings, warmup)
    chars = sum(len(t) for t in texts)
    values = {"tokenization_chars_per_s": round(chars / seconds), "tokenization_tokens_per_s": round(tokens / seconds),
              "tokenization_chars": chars, "tokenization_tokens": tokens,
              "tokenization_chars_per_token": round(chars / tokens, 3) if tokens else None}
    _record(evidence, benchmark, benchmark_results, request.node.nodeid, values,
            {"tokenization_chars_per_s": "chars/s", "tokenization_tokens_per_s": "tokens/s"})
    assert tokens > 0, "the tokenizer produced no tokens for the Korean text"
    # A byte-level tokenizer that does not know Hangul needs ~3 tokens per syllable (< 1 char/token):
    # then this benchmark would time the wrong tokenizer.
    assert chars / tokens >= 1.0, (f"{chars / tokens:.2f} characters per token on Korean text: the tokenizer splits "
                                   "Hangul into bytes; fix [model].tokenizer_class (e.g. PreTrainedTokenizerFast)")


def test_forward_latency(benchmark, loaded_model, tokenizer, korean_texts, plan, evidence, benchmark_results,
                         request):
    model = loaded_model.model
    device, batch = _device_and_batch(model, plan, tokenizer, korean_texts)
    t = plan.training
    was_training = model.training
    model.eval()
    timings: list[float] = []
    rounds, warmup = _rounds(device)
    try:
        logits = benchmark.pedantic(_timed(forward_pass, timings), args=(model, batch, t.dtype), rounds=rounds,
                                    warmup_rounds=warmup)
    finally:
        model.train(was_training)
    shape = shape_from_config(model.config)
    n_matmul, _ = matmul_params(model)
    flops = forward_flops_per_token(n_matmul, shape.n_layers, t.seq_len, shape.d_attn)
    peak, why = _peak(device, t.dtype)
    step = StepThroughput(t.batch_size, t.seq_len, _mean(timings, warmup), flops, peak)
    values = {"forward_latency_ms": round(step.seconds * 1e3, 2), "forward_tokens_per_s": round(step.tokens_per_s),
              "forward_achieved_tflops": round(step.achieved_tflops, 3),
              "forward_mfu": round(step.mfu, 4) if step.mfu is not None else None,
              "forward_shape": f"{t.batch_size}x{t.seq_len} {t.dtype} on {device}"}
    _record(evidence, benchmark, benchmark_results, request.node.nodeid, values,
            {"forward_latency_ms": "ms", "forward_tokens_per_s": "tokens/s", "forward_achieved_tflops": "TFLOP/s"},
            mfu_note=why)
    assert tuple(logits.shape[:2]) == (t.batch_size, t.seq_len), f"logits shape {tuple(logits.shape)}"
    assert bool(logits.float().isfinite().all()), "the forward pass produced NaN/inf logits"
    if step.mfu is not None:
        assert 0 < step.mfu <= 1, f"forward MFU {step.mfu:.2f} > 1 is impossible: FLOPs formula or peak table wrong"


def test_lora_training_step(benchmark, loaded_model, tokenizer, korean_texts, plan, evidence, benchmark_results,
                            request):
    import torch

    base = loaded_model.model
    device, batch = _device_and_batch(base, plan, tokenizer, korean_texts)
    t = plan.training
    model = lora_copy(base, plan)
    optimizer = optimizer_for(model, t.optimizer)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_name, frozen = next((n, p) for n, p in model.named_parameters()
                               if not p.requires_grad and p.dtype.is_floating_point)
    frozen_before = frozen.detach().clone()
    timings: list[float] = []
    losses: list[float] = []
    rounds, warmup = _rounds(device)

    def step(m, opt, ids):
        loss = train_step(m, opt, ids, t.dtype)
        losses.append(loss)
        return loss

    try:
        benchmark.pedantic(_timed(step, timings), args=(model, optimizer, batch), rounds=rounds, warmup_rounds=warmup)
        shape = shape_from_config(base.config)
        n_matmul, n_trainable = matmul_params(model)
        scope = backward_scope(model, shape.n_layers)   # where autograd really back-propagates
        flops = training_flops_per_token(n_matmul, n_trainable, shape.n_layers, t.seq_len, shape.d_attn,
                                         t.gradient_checkpointing, backward=scope)
        peak, why = _peak(device, t.dtype)
        s = StepThroughput(t.batch_size, t.seq_len, _mean(timings, warmup), flops.total, peak)
        changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
        frozen_same = torch.equal(frozen.detach(), frozen_before)
    finally:
        del optimizer
        synchronize(device)
    values = {"train_step_ms": round(s.seconds * 1e3, 2), "train_tokens_per_s": round(s.tokens_per_s),
              "train_flops_per_token": flops.total, "train_achieved_tflops": round(s.achieved_tflops, 3),
              "train_mfu": round(s.mfu, 4) if s.mfu is not None else None,
              "train_matmul_params": n_matmul, "train_trainable_matmul_params": n_trainable,
              "train_backprop_matmul_params": scope.matmul_params, "train_backprop_layers": scope.layers,
              "train_shape": f"{t.batch_size}x{t.seq_len} {t.dtype} grad_ckpt={t.gradient_checkpointing} on {device}",
              "train_losses": [round(v, 4) for v in losses]}
    _record(evidence, benchmark, benchmark_results, request.node.nodeid, values,
            {"train_step_ms": "ms", "train_tokens_per_s": "tokens/s", "train_flops_per_token": "FLOPs",
             "train_achieved_tflops": "TFLOP/s"}, mfu_note=why)
    assert all(math.isfinite(v) for v in losses), f"non-finite training loss: {losses}"
    assert changed, "no trainable (LoRA) parameter changed after the optimizer steps: the step did not train"
    assert frozen_same, f"frozen weight {frozen_name} changed during LoRA training"
    if s.mfu is not None:
        assert 0 < s.mfu <= 1, f"training MFU {s.mfu:.2f} > 1 is impossible: FLOPs formula or peak table wrong"

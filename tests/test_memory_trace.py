"""The fake-tensor trace: hand-derived byte counts, a real CPU step, NF4 storage, and scoped CUDA emulation.

Full-size KoGPT-2 (config only): 125,164,032 parameters, V=51200, h=768, 12 layers. Expected values below are
derived by hand from the shapes (not from the code under test).
"""
import math

import pytest
import torch

from structure_configs import KO_D, KO_LAYERS, KO_VOCAB, kogpt2_config, llama_config

from kolora_probe.memory.trace import StepShape, adamw8bit_state_bytes, nf4_bytes, nf4_tensor_sizes, trace_step

KO_PARAMS = 125_164_032
MIB = 2 ** 20


@pytest.fixture(scope="module")
def ko():
    return kogpt2_config()


@pytest.fixture(scope="module")
def fp32_b8(ko):
    return trace_step(ko, StepShape(batch_size=8, seq_len=512, targets=("c_attn",), r=16))


def test_resident_and_loss_bytes_by_hand(fp32_b8):
    c = fp32_b8.components
    # LoRA on 12 × c_attn (768 → 2304), r=16, fp32: A 16×768, B 2304×16 (both multiples of 512 B)
    lora = KO_LAYERS * 16 * (KO_D + 3 * KO_D) * 4
    assert lora == 2_359_296
    assert c["lora_weights"] == lora
    # AdamW exp_avg + exp_avg_sq, plus one 4-byte "step" scalar per tensor (24), each a 512-B block in the trace
    # (torch keeps step on the CPU unless fused/capturable, so on a GPU these 12 KiB are not device memory)
    assert c["optimizer_states"] == 2 * lora + 24 * 512
    assert c["gradients"] == 0                                # freed by zero_grad(set_to_none=True) before the peak
    # frozen weights: 125,164,032 fp32 params, each tensor rounded up to 512 B (≤ 150 tensors)
    assert KO_PARAMS * 4 <= c["frozen_weights"] <= KO_PARAMS * 4 + 150 * 512
    # the peak is the backward of log_softmax: three fp32 b·s·V tensors
    three = 3 * 8 * 512 * KO_VOCAB * 4
    assert three == 2400 * MIB
    assert three <= c["logits_and_loss"] <= three + 4096      # + the scalar loss and its gradient (512-B blocks)
    assert fp32_b8.peak_phase == "backward" and "log_softmax_backward" in fp32_b8.peak_op
    assert sum(c.values()) == fp32_b8.predicted_peak_bytes
    assert fp32_b8.method == "trace" and fp32_b8.semantics == "cuda"


def test_checkpointing_keeps_one_input_per_layer(ko, fp32_b8):
    gc = trace_step(ko, StepShape(batch_size=8, seq_len=512, targets=("c_attn",), gradient_checkpointing=True))
    m = 8 * 512 * KO_D * 4   # one fp32 hidden-state tensor (12 MiB)
    # 12 block inputs + ln_f input + the embedding output, its dropout mask (1 B/elem) + LayerNorm statistics
    mask = 8 * 512 * KO_D
    assert 14 * m + mask <= gc.components["activations"] <= 14 * m + mask + 1 * MIB
    assert gc.components["activations"] < fp32_b8.components["activations"] / 10


def test_head_only_lora_saves_no_layer_activations(ko):
    e = trace_step(ko, StepShape(batch_size=8, seq_len=512, targets=("lm_head",)))
    # nothing below lm_head needs a gradient: only the head's LoRA input is kept (< 16 MiB), the logits dominate
    assert e.components["activations"] < 16 * MIB
    assert e.components["lora_weights"] == 16 * (KO_D + KO_VOCAB) * 4   # 831,488 params in fp32


def test_nf4_bytes_by_hand():
    # c_attn weight 768×2304 = 1,769,472 elements, blocks of 64 → 27,648 absmax; nested blocks of 256 → 108
    n = 768 * 2304
    assert nf4_bytes(n, double_quant=False) == 884_736 + 27_648 * 4 + 64 == 995_392
    assert nf4_bytes(n, double_quant=True) == 884_736 + 27_648 + 108 * 4 + 4 + 1024 + 64 == 913_908
    # on CUDA each tensor is its own allocation rounded to 512 B
    assert nf4_bytes(n, True, block=512) == 884_736 + 27_648 + 512 + 512 + 1024 + 512   # 27,648 = 54 × 512
    # bitsandbytes 8-bit AdamW: uint8 states + fp32 absmax per 256 elements; small tensors stay fp32
    assert adamw8bit_state_bytes([12_288, 100]) == 2 * (12_288 + 48 * 4) + 2 * 400


def test_nf4_bytes_match_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(2304, 768, dtype=torch.bfloat16)
    for dq in (False, True):
        q, qs = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        sizes = {"packed": q.numel() * q.element_size(), "absmax": qs.absmax.numel() * qs.absmax.element_size(),
                 "code": qs.code.numel() * qs.code.element_size()}
        if dq:
            sizes.update(offset=qs.offset.numel() * qs.offset.element_size(),
                         absmax2=qs.state2.absmax.numel() * qs.state2.absmax.element_size(),
                         code2=qs.state2.code.numel() * qs.state2.code.element_size())
        assert sizes == nf4_tensor_sizes(w.numel(), dq)


def test_qlora_frozen_weights_by_hand(ko):
    e = trace_step(ko, StepShape(batch_size=1, seq_len=64, dtype="bf16", weights_dtype="bf16",
                                 quantization="4bit", targets=("c_attn",)))
    # 48 Conv1D layers become NF4 (double quant); wte/wpe/LayerNorms/biases stay bf16 (40,229,376 params)
    per_layer = [768 * 2304, 768 * 768, 768 * 3072, 3072 * 768]
    quantized = sum(per_layer) * KO_LAYERS
    assert quantized == 84_934_656
    nf4 = KO_LAYERS * sum(math.ceil(n / 2) + math.ceil(n / 64) + 4 * math.ceil(n / 64 / 256) + 4 + 1024 + 64
                          for n in per_layer)
    rest = (KO_PARAMS - quantized) * 2
    got = e.components["frozen_weights"]
    assert nf4 + rest <= got <= (nf4 + rest) * 1.002, (got, nf4 + rest)   # + 512-B rounding of ~340 tensors


@pytest.mark.parametrize("kw", [dict(targets=("c_attn",)),
                                dict(targets=("c_attn", "c_proj", "c_fc"), gradient_checkpointing=True),
                                dict(targets=("lm_head",))],
                         ids=["c_attn", "all-ckpt", "lm_head"])
def test_cpu_semantics_trace_equals_real_cpu_step(kw):
    """Without CUDA emulation and rounding, the trace reproduces a real CPU step's profiler peak.

    KoGPT-2 widths and vocabulary with 2 layers instead of 12 (a real 125M-parameter step per case would take
    too long on this machine's 2 cores; the 12-layer comparison is in benchmarks/memory_grid.py)."""
    from kolora_probe.memory.measure import measure_step

    cfg = kogpt2_config()
    cfg.n_layer = 2
    shape = StepShape(batch_size=2, seq_len=64, **kw)
    predicted = trace_step(cfg, shape, cuda=False).predicted_peak_bytes
    measured = measure_step(cfg, shape, "cpu")
    assert measured.ok and measured.method == "cpu_profiler"
    assert abs(predicted - measured.peak_allocated_bytes) / measured.peak_allocated_bytes < 0.005, \
        (predicted, measured.peak_allocated_bytes)


def test_emulation_is_scoped_to_the_trace(ko):
    """After a CUDA-emulated trace, real CPU SDPA and dropout behave as before (kernels unregistered)."""
    trace_step(ko, StepShape(batch_size=1, seq_len=32, dtype="bf16"))
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.0, is_causal=True)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    x = torch.ones(1000)
    y = torch.nn.functional.dropout(x, 0.5, training=True)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    import transformers.masking_utils as mu
    assert mu.find_packed_sequence_indices.__module__ == "transformers.masking_utils"   # restored


def test_llama_style_model_traces(ko):
    e = trace_step(llama_config(), StepShape(batch_size=2, seq_len=32, targets=("q_proj", "v_proj")))
    assert e.predicted_peak_bytes == sum(e.components.values()) > 0
    # LoRA r=16 on 2 layers × (q 64→64, v 64→32): fp32 A and B
    assert e.components["lora_weights"] == 2 * (16 * (64 + 64) + 16 * (64 + 32)) * 4


def test_cuda_autocast_softmax_with_positional_dtype_runs_in_fp32():
    """CUDA's autocast runs softmax in fp32 (``fp32_set_opt_dtype``); eager attention code (BLOOM, Gemma 2) calls
    ``softmax(x, dim, dtype=...)``, which reaches the kernel with ``dtype`` as a positional argument."""
    from kolora_probe.memory.cuda_emulation import cuda_like_kernels

    x = torch.randn(2, 5).to(torch.bfloat16)
    with cuda_like_kernels(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.nn.functional.softmax(x, dim=-1)
        explicit = torch.nn.functional.softmax(x, dim=-1, dtype=torch.float64)
    assert plain.dtype == torch.float32          # CUDA policy: upcast when no dtype is given
    assert explicit.dtype == torch.float64       # an explicit dtype is kept
    assert torch.allclose(plain, torch.softmax(x.float(), -1), atol=1e-6)


@pytest.mark.parametrize("make", ["bloom", "gemma2"])
def test_eager_attention_models_trace_under_bf16_autocast(make):
    """Models whose eager attention calls softmax with a dtype trace (no fallback) in a bf16-autocast step."""
    from transformers import BloomConfig, Gemma2Config

    cfg = (BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4) if make == "bloom" else
           Gemma2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                        pad_token_id=0))
    from kolora_probe.memory.budget import estimate

    for weights in ("fp32", "bf16"):
        e = estimate(cfg, StepShape(batch_size=2, seq_len=16, dtype="bf16", weights_dtype=weights,
                                    targets=("lm_head",)), "trace")
        assert e.method == "trace", (weights, e.notes)
        assert e.predicted_peak_bytes == sum(e.components.values()) > 0


def test_a_trace_that_fails_falls_back_to_the_closed_form_with_the_reason(monkeypatch):
    import kolora_probe.memory.trace as mt
    from kolora_probe.memory.budget import estimate

    def broken(config, shape):
        raise RuntimeError("aten::foo has no fake kernel\nsecond line")

    monkeypatch.setattr(mt, "trace_step", broken)
    e = estimate(llama_config(), StepShape(batch_size=1, seq_len=8, targets=("q_proj",)), "trace")
    assert e.method == "closed_form" and e.predicted_peak_bytes > 0
    assert any("trace failed (RuntimeError: aten::foo has no fake kernel)" in n for n in e.notes), e.notes


def test_moe_target_parameters_are_traced():
    """LoRA on Mixtral's expert tensors (PEFT target_parameters) is part of the traced step: the fp32 LoRA
    weights are q_proj's plus r·E·(in + out) per expert tensor, by hand."""
    from transformers import MixtralConfig

    d, ff, experts, layers, r = 64, 96, 4, 2, 8
    cfg = MixtralConfig(vocab_size=100, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                        max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    shape = StepShape(batch_size=2, seq_len=16, dtype="bf16", weights_dtype="bf16", targets=("q_proj",), r=r,
                      lora_dropout=0.0, target_parameters=("experts.gate_up_proj", "experts.down_proj"))
    e = trace_step(cfg, shape)
    lora = layers * (r * (d + d) + r * experts * (d + 2 * ff) + r * experts * (ff + d))
    assert e.components["lora_weights"] >= lora * 4
    assert e.components["lora_weights"] <= lora * 4 + layers * 3 * 2 * 512    # 512-byte rounding per A and B
    plain = trace_step(cfg, shape.with_(target_parameters=()))
    assert e.predicted_peak_bytes > plain.predicted_peak_bytes


@pytest.mark.parametrize("kw", [
    dict(quantization="4bit", dtype="bf16", weights_dtype="bf16", prepare_kbit=True, gradient_checkpointing=True,
         checkpointing_reentrant=True),           # bitsandbytes casts Linear4bit's bias on its first forward
    dict(targets=("c_attn", "c_fc"), modules_to_save=("lm_head",)),
])
def test_steady_state_shortcut_equals_a_full_first_step(monkeypatch, kw):
    """The trace reaches step 2's state with a one-token forward and an optimizer step on zero gradients instead of
    a whole training step: the peak, its components and the allocator overhead must be what a full warm-up step
    gives."""
    import torch.nn as nn
    from transformers import GPT2Config

    import kolora_probe.memory.trace as trace_mod

    cfg = GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=3000, n_positions=256, bos_token_id=0,
                     eos_token_id=0)
    shape = StepShape(batch_size=2, seq_len=32, **{"targets": ("c_attn", "c_proj", "c_fc"), **kw})
    fast = trace_step(cfg, shape)
    calls = []

    def full_first_step(model: nn.Module, opt, autocast) -> None:
        calls.append(1)
        ids = torch.zeros((shape.batch_size, shape.seq_len), dtype=torch.long)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    monkeypatch.setattr(trace_mod, "reach_steady_state", full_first_step)
    slow = trace_step(cfg, shape)
    assert calls == [1]
    assert (fast.predicted_peak_bytes, dict(fast.components), fast.peak_op, fast.allocator_overhead_bytes) == \
        (slow.predicted_peak_bytes, dict(slow.components), slow.peak_op, slow.allocator_overhead_bytes)

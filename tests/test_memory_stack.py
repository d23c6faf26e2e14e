"""The QLoRA stack as users run it: plan keys and their defaults, PEFT's prepare_model_for_kbit_training in the
trace (fp32 norms → fp32 activations), a real CPU QLoRA step through bitsandbytes' CPU backend, the allocator's
segment model, the CUDA context and the verdict on the card's total.

Small LLaMA-style config (tests/structure_configs.py): V=100, h=64, ff=128, 2 layers, 4 heads (2 KV heads).
"""
import math

import pytest
import torch

from structure_configs import LL_D, LL_FF, LL_LAYERS, LL_VOCAB, kogpt2_config, llama_config

from kolora_probe.memory.budget import (CUDA_CONTEXT_EAGER_BYTES, CUDA_CONTEXT_LAZY_BYTES, budget_verdict,
                                        cuda_context_bytes)
from kolora_probe.memory.trace import (StepShape, add_lora, bnb_state_tensors, pool_charge, prepare_kbit,
                                       replay_caching_allocator, reserved_lower_bound, trace_step)
from kolora_probe.plan.schema import PlanError, apply_overrides, default_plan, load_plan

MIB = 2 ** 20
QLORA = dict(batch_size=4, seq_len=64, dtype="bf16", weights_dtype="bf16", quantization="4bit",
             gradient_checkpointing=True, targets=("q_proj", "v_proj"), lora_dropout=0.0, optimizer="sgd")


def _round(n: int) -> int:
    return math.ceil(n / 512) * 512


# --- plan keys ------------------------------------------------------------------------------------------
def test_stack_defaults_follow_the_recipes():
    lora = StepShape.from_plan(default_plan())                     # plain LoRA: a hand-rolled loop's stack
    assert (lora.prepare_kbit, lora.checkpointing_reentrant, lora.adapter_dtype, lora.attn_implementation,
            lora.fused_cross_entropy) == (False, False, "fp32", "sdpa", False)
    qlora = StepShape.from_plan(load_plan("plans/kogpt2-qlora.toml"))
    # PEFT's prepare_model_for_kbit_training on a 4-bit model, checkpointing through torch's default (reentrant)
    assert qlora.prepare_kbit and qlora.checkpointing_reentrant
    off = StepShape.from_plan(apply_overrides(load_plan("plans/kogpt2-qlora.toml"),
                                              {"training.prepare_kbit": False}))
    assert not off.prepare_kbit and not off.checkpointing_reentrant
    mixed = StepShape.from_plan(apply_overrides(default_plan(), {"training.checkpointing_reentrant": True,
                                                                 "training.adapter_dtype": "bf16",
                                                                 "training.optimizer": "paged_adamw_8bit"}))
    assert mixed.checkpointing_reentrant and mixed.adapter_dtype == "bf16" and not mixed.prepare_kbit
    assert "reentrant" not in StepShape.from_plan(default_plan()).describe()


def test_bad_stack_values_are_one_line_each():
    with pytest.raises(PlanError) as err:
        apply_overrides(default_plan(), {"training.attn_implementation": "flash3", "training.adapter_dtype": "int8",
                                         "training.prepare_kbit": "yes"})
    assert len(err.value.lines) == 3
    assert any("'sdpa', 'eager', 'flash_attention_2'" in line for line in err.value.lines)


# --- prepare_model_for_kbit_training in the trace -----------------------------------------------------------
@pytest.fixture(scope="module")
def ll():
    return llama_config()


@pytest.fixture(scope="module")
def ll_traces(ll):
    return {prep: trace_step(ll, StepShape(prepare_kbit=prep, **QLORA)) for prep in (False, True)}


def test_prepare_kbit_frozen_weights_by_hand(ll_traces):
    """prepare_model_for_kbit_training casts every non-4-bit weight to fp32: embeddings (V×h), head (V×h) and
    2L+1 RMSNorm weights (h) go from 2 to 4 bytes each (every tensor its own 512-B block)."""
    tensors = [LL_VOCAB * LL_D, LL_VOCAB * LL_D] + [LL_D] * (2 * LL_LAYERS + 1)
    delta = sum(_round(4 * n) - _round(2 * n) for n in tensors)
    got = ll_traces[True].components["frozen_weights"] - ll_traces[False].components["frozen_weights"]
    assert got == delta == 25_600


def test_prepare_kbit_fp32_norm_activations(ll):
    """Checkpointing keeps each layer's input: bf16 without prepare_kbit (bf16 embeddings, bf16 RMSNorm weights
    give bf16 hidden states, bnb 4-bit layers return their input's dtype); fp32 with it (fp32 embeddings and
    norms). The stored inputs of the L layers double, b·s·h·2 bytes more each, so the forward-peak difference
    grows by L·b·s·h·2 per doubling of b."""
    def acts(prep: bool, b: int) -> int:
        e = trace_step(ll, StepShape(prepare_kbit=prep, **{**QLORA, "batch_size": b, "optimizer": "sgd"}))
        return e.components["activations"]

    per_b = {prep: acts(prep, 16) - acts(prep, 8) for prep in (False, True)}
    # 8 more sequences: each stored layer input grows by 8·s·h elements
    extra_inputs = LL_LAYERS * 8 * 64 * LL_D * 2           # 2 more bytes each with fp32 inputs
    assert per_b[True] - per_b[False] >= extra_inputs
    assert per_b[True] > 1.3 * per_b[False]


def test_real_cpu_qlora_step_with_and_without_prepare_kbit(ll, tmp_path, ll_traces):
    """A real QLoRA step on the CPU through bitsandbytes' CPU backend (NF4, double quant, bf16 autocast) with and
    without prepare_model_for_kbit_training, against the CPU-semantics trace: the resident bytes (weights, NF4
    quant state, adapters) and prepare_kbit's extra bytes agree to the byte; each peak within 10 % (the trace is
    ~72 KB above here: about half the model's dequantized bf16 weights, where bitsandbytes' CPU kernels keep fewer
    than the fake-tensor dispatch of the same ops)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kolora_probe.memory.measure import measure_callable, resident_bytes

    AutoModelForCausalLM.from_config(ll, dtype=torch.bfloat16).save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    real, traced = {}, {}
    for prep in (False, True):
        shape = StepShape(prepare_kbit=prep, **QLORA)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map="cpu")
        model.config.use_cache = False
        if prep:
            model = prepare_kbit(model)
        model = add_lora(model, shape)
        norm = model.get_base_model().model.norm.weight
        assert norm.dtype == (torch.float32 if prep else torch.bfloat16)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, LL_VOCAB, (QLORA["batch_size"], QLORA["seq_len"]))

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        m = measure_callable(step, "cpu", baseline=lambda: resident_bytes(model, opt, ids))
        assert m.ok
        real[prep] = m.peak_allocated_bytes
        est = trace_step(ll, shape, cuda=False)
        traced[prep] = est.predicted_peak_bytes
        # SGD keeps no state, gradients are freed: resident = frozen weights + quant state + adapters + the ids
        assert m.baseline_bytes == est.components["frozen_weights"] + est.components["lora_weights"] + ids.numel() * 8
    assert real[True] - real[False] == traced[True] - traced[False] > 0
    for prep in (False, True):
        assert abs(traced[prep] - real[prep]) <= 0.10 * real[prep], (prep, traced, real)


def test_adapter_dtype_and_eager_attention(ll):
    base = trace_step(ll, StepShape(**{**QLORA, "optimizer": "adamw"}))
    bf16 = trace_step(ll, StepShape(adapter_dtype="bf16", **{**QLORA, "optimizer": "adamw"}))
    # q_proj 64→64, v_proj 64→32 (2 KV heads of 16), r=16, 2 layers: A r×in + B out×r per target
    lora = [16 * LL_D, LL_D * 16, 16 * LL_D, 32 * 16] * LL_LAYERS
    assert base.components["lora_weights"] == sum(_round(4 * n) for n in lora)
    assert bf16.components["lora_weights"] == sum(_round(2 * n) for n in lora)
    eager = trace_step(ll, StepShape(attn_implementation="eager", **{**QLORA, "gradient_checkpointing": False,
                                                                       "seq_len": 64}))
    sdpa = trace_step(ll, StepShape(**{**QLORA, "gradient_checkpointing": False, "seq_len": 64}))
    # eager keeps the b·h·s² softmax output (bf16) and its fp32 upcast for each layer
    assert eager.predicted_peak_bytes - sdpa.predicted_peak_bytes >= LL_LAYERS * 4 * 4 * 64 * 64 * 2


# --- bitsandbytes optimizers -----------------------------------------------------------------------------------
def test_paged_and_8bit_optimizer_states_by_hand():
    small, big = 4096 * 16, 200_000     # a LoRA A matrix (< 100,000 elements: never paged) and a large tensor
    eight = bnb_state_tensors([small, big], "adamw_8bit")
    assert sum(b for b, _ in eight) == 2 * (small + 4 * small // 256) + 2 * (big + 4 * math.ceil(big / 256))
    paged = bnb_state_tensors([small, big], "paged_adamw")
    assert sum(b for b, p in paged if p) == 2 * 4 * big and sum(b for b, p in paged if not p) == 2 * 4 * small
    p8 = bnb_state_tensors([big], "paged_adamw_8bit")
    assert sum(b for b, p in p8 if p) == 2 * big                       # the uint8 states; absmax stays allocated


# --- allocator and context ---------------------------------------------------------------------------------------
def test_allocator_segment_model_by_hand():
    assert pool_charge(512) == ("small", 512) and pool_charge(MIB) == ("small", MIB)
    assert pool_charge(MIB + 512) == ("mid", MIB + 512)
    assert pool_charge(10 * MIB + 512) == ("large", 12 * MIB)          # own segment, 2 MiB rounding
    # 3 × 512 B small → one 2 MiB segment; 3 MiB mid → one 20 MiB segment; 12 MiB large as is
    assert reserved_lower_bound({"small": 1536, "mid": 3 * MIB, "large": 12 * MIB}) == 2 * MIB + 20 * MIB + 12 * MIB
    assert reserved_lower_bound({"small": 0, "mid": 0, "large": 0}) == 0


def test_caching_allocator_replay_by_hand():
    KIB = 1024
    # two 600 KiB requests share one 2 MiB small segment; a 1.5 MiB request opens a 20 MiB large segment
    assert replay_caching_allocator([(1, 600 * KIB), (2, 600 * KIB), (3, 3 * MIB // 2)]) == 22 * MIB
    # freed blocks are reused: free + re-allocate the same size costs nothing
    assert replay_caching_allocator([(1, 12 * MIB), (1, 0), (2, 12 * MIB)]) == 12 * MIB
    # fragmentation: a freed 12 MiB block cannot hold 14 MiB → a new segment (38 MiB reserved, 26 MiB live)
    assert replay_caching_allocator([(1, 12 * MIB), (2, 12 * MIB), (1, 0), (3, 14 * MIB)]) == 38 * MIB
    # a large block is split only when more than 1 MiB would remain: 11 MiB takes the whole 12 MiB block, so the
    # next 1 MiB request (small pool) opens its own 2 MiB segment
    assert replay_caching_allocator([(1, 12 * MIB), (1, 0), (2, 11 * MIB), (3, MIB)]) == 14 * MIB
    # adjacent free blocks merge: two freed 6 MiB halves of a 12 MiB segment hold one 12 MiB request
    assert replay_caching_allocator([(1, 12 * MIB), (1, 0), (2, 6 * MIB), (3, 6 * MIB), (2, 0), (3, 0),
                                     (4, 12 * MIB)]) == 12 * MIB


def test_cuda_context_figures():
    assert cuda_context_bytes("2.5.1", "") == CUDA_CONTEXT_LAZY_BYTES == 287_047_680
    assert cuda_context_bytes("2.5.1", "EAGER") == CUDA_CONTEXT_EAGER_BYTES
    assert cuda_context_bytes("1.12.1", "") == CUDA_CONTEXT_EAGER_BYTES


def test_verdict_decides_on_the_card_total_and_traces_once_when_it_fits():
    ko = kogpt2_config()
    shape = StepShape(batch_size=2, seq_len=128, targets=("c_attn",))
    est = trace_step(ko, shape)
    assert est.allocator_overhead_bytes > 0
    need = est.predicted_peak_bytes + est.allocator_overhead_bytes
    ctx = CUDA_CONTEXT_LAZY_BYTES
    between = need + ctx // 2                 # allocated fits, the card's total does not
    v = budget_verdict(ko, shape, between, est=est, context_bytes=ctx)
    assert v.predicted_peak_bytes <= between and not v.fits
    assert v.card_required_bytes == need + ctx and v.headroom_bytes == between - need - ctx
    d = v.to_dict()
    assert d["card_required_bytes"] == need + ctx and d["cuda_context_bytes"] == ctx
    assert d["allocator_overhead_bytes"] == est.allocator_overhead_bytes
    assert "CUDA context" in v.message() and "does NOT fit" in v.message()
    roomy = budget_verdict(ko, shape, need + ctx + 200 * MIB, est=est, context_bytes=ctx)
    assert roomy.fits and roomy.traces == 0 and roomy.limits_approximate   # no search traces
    assert roomy.max_batch_size >= 2


def test_trl_casting_puts_embeddings_and_head_back_to_bf16(ll, ll_traces):
    """TRL's peft_module_casting_to_bf16 after prepare_kbit: only the 2L+1 norm weights stay fp32."""
    trl = trace_step(ll, StepShape(prepare_kbit=True, trl_casting=True, **QLORA))
    norms = sum(_round(4 * LL_D) - _round(2 * LL_D) for _ in range(2 * LL_LAYERS + 1))
    assert trl.components["frozen_weights"] - ll_traces[False].components["frozen_weights"] == norms


def test_fused_cross_entropy_never_holds_the_logits():
    """Liger's fused linear cross-entropy: the peak loses the three fp32 b·s·V tensors of the log-softmax
    backward (2400 MiB at b8 s512 V=51200) and keeps one b·(s−1)·h gradient instead."""
    from structure_configs import KO_D, KO_VOCAB

    ko = kogpt2_config()
    kw = dict(batch_size=8, seq_len=512, dtype="bf16", targets=("c_attn",), gradient_checkpointing=True)
    plain = trace_step(ko, StepShape(**kw))
    fused = trace_step(ko, StepShape(fused_cross_entropy=True, **kw))
    three = 3 * 8 * 512 * KO_VOCAB * 4
    assert plain.components["logits_and_loss"] >= three
    # the fused step's peak moves elsewhere (layer recomputation); at least two of the three tensors are saved
    # even after the fp32 b·(s−1)·h hidden-state gradient and the shifted hidden-state copy it keeps instead
    assert plain.predicted_peak_bytes - fused.predicted_peak_bytes >= 2 * three // 3 - 2 * 8 * 511 * KO_D * 4
    assert fused.components["logits_and_loss"] < MIB and "log_softmax" not in fused.peak_op

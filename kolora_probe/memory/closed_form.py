"""Closed-form peak memory of one LoRA/QLoRA training step: instant, for the max-batch search and the CLI.

peak = resident + saved activations + max(head/loss peak)  (every term in bytes, each tensor rounded to 512 B)

* **Resident** — frozen weights (their dtype; NF4 weights by bitsandbytes' layout, see
  :func:`kolora_probe.memory.trace.nf4_bytes`), LoRA weights (fp32: PEFT's ``autocast_adapter_dtype=True``),
  optimizer state (AdamW: 2 fp32 tensors per trainable tensor, ``torch.optim.AdamW``; 8-bit AdamW: bitsandbytes
  blockwise uint8 states; SGD without momentum: none). Gradients of LoRA weights are freed by
  ``zero_grad(set_to_none=True)`` and are not live at the loss-backward peak. Counts come from the plan's model
  built on the meta device (exact, no weights).
* **Saved activations per transformer layer** in the backward scope (layers at and above the lowest adapted layer:
  below it nothing needs a gradient). The per-tensor list follows what autograd saves for HF GPT-2 in
  transformers 5 with PEFT LoRA and CUDA kernels — derived from the fake-tensor trace's attribution
  (/work/shared/notes/memory-spike/spike2b_layer_breakdown.py), in the spirit of Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198, §4: ``sbh(34 + 5as/h)`` for
  full fine-tuning with unfused attention), adapted because (a) frozen base weights save no inputs for weight
  gradients, (b) flash / memory-efficient SDPA keeps O(s) state (output + logsumexp, Dao et al. 2022,
  arXiv:2205.14135) instead of the b·a·s² scores, (c) fused dropout keeps 1-byte masks, (d) CUDA autocast runs
  GPT-2's ``gelu_new`` pow/tanh in fp32 and keeps bf16 copies of the weights for backward.
  With gradient checkpointing (non-reentrant) each layer keeps only its input; one layer is recomputed at a time.
  ``attn_implementation = "eager"`` keeps the b·h·s² probabilities instead (softmax output, dropout mask and output,
  or the compute-dtype copy under autocast). The stack keys are modelled as the trace sees them: each frozen weight
  in its own dtype (prepare_kbit / TRL casting), Liger's fused cross-entropy as one chunk of logits.
* **Head and loss** — ``ForCausalLMLoss`` upcasts the logits to fp32 and takes ``log_softmax``: at the
  backward of ``log_softmax`` three fp32 b·s·V tensors are live (its output, the NLL gradient, its input gradient);
  with LoRA on the head, the forward holds base output, scaled LoRA output and their sum in the compute dtype.

The generic Korthikanti formula is off by −41 … −74 % for LoRA (spike5_analytic.py); this one is checked against
the trace within 3 % on the KoGPT-2 grid in tests/test_memory_closed_form.py. Other architectures (LLaMA-style:
RMSNorm, rotary, gated SiLU MLP) use the same structure with their own tensors and are approximate.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from kolora_probe.memory.trace import (BNB_OPTIMIZERS, COMPONENTS, CUDA_BLOCK, MemoryEstimate, StepShape, bnb_state_tensors,
                           nf4_bytes, round_block)

_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class ModelFacts:
    """What the closed form needs from the model: exact parameter storage and the layer geometry."""
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    gated_mlp: bool
    gelu_new: bool
    frozen_weight_bytes: int           # non-quantized frozen params in weights_dtype, rounded per tensor
    quantized_bytes: int               # NF4 packed + quant state, rounded per tensor
    lora_numels: tuple[int, ...]       # each trainable tensor's element count
    adapted: frozenset[str]            # leaf roles adapted: qkv, q, k, v, o, fc, proj, gate, up, down, head
    lowest_adapted_layer: int | None   # None: only the head (or nothing in the layers) is adapted
    head_adapted: bool
    tied_head: bool
    lora_r: int
    embed_bytes: int                   # bytes per element of the input embedding (fp32 after prepare_kbit)
    head_bytes: int                    # bytes per element of the output head's weight
    attn_dropout: float                # attention-probability dropout in training (GPT-2's attn_pdrop)


def _role(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if leaf in ("c_attn", "query_key_value", "qkv_proj", "Wqkv"):
        return "qkv"
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return leaf[0]
    if leaf in ("o_proj", "out_proj", "dense") or (leaf == "c_proj" and parent == "attn"):
        return "o"
    if leaf in ("c_fc", "fc1", "dense_h_to_4h", "fc_in"):
        return "fc"
    if leaf in ("gate_proj",):
        return "gate"
    if leaf in ("up_proj",):
        return "up"
    if leaf in ("down_proj", "fc2", "dense_4h_to_h", "fc_out") or (leaf == "c_proj" and parent == "mlp"):
        return "down"
    return None


def model_facts(config: Any, shape: StepShape) -> ModelFacts:
    """Build the plan's model on the meta device once and read the exact numbers the formula needs."""
    import re

    from kolora_probe.memory.trace import build_step_model

    model = build_step_model(config, shape, "meta", unquantized_8bit=True)
    base = model.get_base_model()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names: str, default: Any = None) -> Any:
        for n in names:
            v = getattr(text, n, None)
            if v is not None:
                return v
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head")
    ffn = first("intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden
    quant_bytes = 0
    frozen = 0
    wbytes = _BYTES[shape.weights_dtype]
    seen: set[int] = set()
    lin4 = ()
    if shape.quantization == "4bit":
        import bitsandbytes as bnb
        lin4 = (bnb.nn.Linear4bit,)
    if shape.quantization == "8bit":
        # LLM.int8 (bitsandbytes Linear8bitLt): int8 weight + one fp32 scale per output row (SCB); transformers
        # converts the same Linear/Conv1D layers as for 4-bit (get_keys_to_not_convert keeps the head)
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.base import get_keys_to_not_convert

        import torch

        skip = get_keys_to_not_convert(base)
        for name, mod in base.named_modules():
            if not isinstance(mod, (torch.nn.Linear, Conv1D)) or any(
                    name == k or name.startswith(k + ".") or name.endswith("." + k) for k in skip):
                continue
            if ".lora_" in name or name.endswith(("lora_A", "lora_B")) or mod.weight.requires_grad:
                continue
            w = mod.weight
            out_f = w.shape[1] if isinstance(mod, Conv1D) else w.shape[0]
            quant_bytes += round_block(w.numel()) + round_block(4 * out_f)
            seen.add(id(w))
    for mod in model.modules():
        if lin4 and isinstance(mod, lin4):
            quant_bytes += nf4_bytes(mod.in_features * mod.out_features, shape.double_quant, CUDA_BLOCK)
            seen.add(id(mod.weight))
            if mod.bias is not None and id(mod.bias) not in seen:
                seen.add(id(mod.bias))
                frozen += round_block(mod.bias.numel() * wbytes)   # bitsandbytes casts it on the first call
    lora: list[int] = []
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            lora.append(p.numel())
        else:   # its own dtype: prepare_kbit keeps norms, embeddings and head in fp32, TRL's casting some in bf16
            frozen += round_block(p.numel() * p.element_size())
    adapted: set[str] = set()
    lowest = None
    head = base.get_output_embeddings()
    head_adapted = False
    for name, mod in model.named_modules():
        if not hasattr(mod, "lora_A") or not hasattr(mod, "base_layer"):
            continue
        if mod is head or name.endswith(".lm_head"):
            head_adapted = True
            adapted.add("head")
            continue
        m = re.search(r"\.(?:h|layers|layer|blocks)\.(\d+)\.", name)
        if m:
            lowest = int(m.group(1)) if lowest is None else min(lowest, int(m.group(1)))
        role = _role(name)
        if role:
            adapted.add(role)
    act = str(first("activation_function", "hidden_act", default="gelu"))
    embed = base.get_input_embeddings()
    head_w = getattr(head, "base_layer", head)
    embed_bytes = embed.weight.element_size() if embed is not None and hasattr(embed, "weight") else wbytes
    head_bytes = head_w.weight.element_size() if head_w is not None and hasattr(head_w, "weight") else wbytes
    return ModelFacts(
        model_type=str(getattr(text, "model_type", "")), hidden=hidden, layers=first("num_hidden_layers", "n_layer"),
        heads=heads, kv_heads=first("num_key_value_heads", default=heads), ffn=ffn,
        vocab=first("vocab_size"), gated_mlp=act in ("silu", "swiglu") or hasattr(text, "mlp_bias"),
        gelu_new=act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"), frozen_weight_bytes=frozen,
        quantized_bytes=quant_bytes, lora_numels=tuple(lora), adapted=frozenset(adapted),
        lowest_adapted_layer=lowest, head_adapted=head_adapted,
        tied_head=bool(getattr(text, "tie_word_embeddings", False)), lora_r=shape.r, embed_bytes=embed_bytes,
        head_bytes=head_bytes,
        attn_dropout=float(first("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob", default=0.0) or 0))


def _dtypes(f: ModelFacts, s: StepShape) -> tuple[int, int, int, bool]:
    """(weight bytes, compute bytes, residual-stream bytes, autocast) of the step.

    Under autocast, matmul outputs are in the autocast dtype; the residual stream stays fp32 when the weights are
    fp32, and also with bitsandbytes 4-bit layers, which return their output in the dtype of their input (the fp32
    layer_norm output under CUDA autocast)."""
    ew = _BYTES[s.weights_dtype]
    autocast = s.dtype != "fp32"
    ec = _BYTES[s.dtype] if autocast else ew
    res = 4 if autocast and (ew == 4 or s.quantization != "none") else ew
    return ew, ec, res, autocast


def _lora_input_bytes(s: StepShape, ec: int, autocast: bool) -> int:
    """Bytes per element of what lora_A sees (and saves): PEFT casts its input to the LoRA weights' dtype; for
    fp32 adapters autocast casts it back to the compute dtype."""
    ab = _BYTES[s.adapter_dtype]
    return ab if ab != 4 else (ec if autocast else 4)


def _head_weight_copy(f: ModelFacts, s: StepShape) -> int:
    """The autocast copy of the head weight in the compute dtype (saved for the input gradient), when the head's own
    dtype differs from it (fp32 weights, or an fp32 head after prepare_kbit); 0 otherwise."""
    _, ec, _, autocast = _dtypes(f, s)
    return round_block(f.vocab * f.hidden * ec) if autocast and f.head_bytes != ec else 0


def _layer_bytes(f: ModelFacts, s: StepShape) -> int:
    """Bytes one transformer layer keeps for backward (no checkpointing), CUDA kernels, 512-B rounding."""
    R = round_block
    T = s.batch_size * s.seq_len
    h, r = f.hidden, s.r
    m = T * h
    ew, ec, res, autocast = _dtypes(f, s)
    quant = s.quantization != "none"                # 8-bit is assumed to behave like 4-bit here (approximate)
    drop = s.lora_dropout > 0
    kvh = f.kv_heads * (h // f.heads)
    lo = _lora_input_bytes(s, ec, autocast)

    def lora_site(in_elems: int) -> int:
        # dropout mask (1 B/elem) + lora_A's saved input + lora_A output (saved by lora_B)
        return (R(in_elems) if drop else 0) + R(in_elems * lo) + R(T * r * lo)

    a = f.adapted
    b = 2 * R(m * res) + 4 * R(T * 4)                # the two norms' inputs (residual stream) + mean/rstd
    if f.gated_mlp:                                  # RMSNorm (LLaMA): fp32 copy and normalised fp32 tensor
        b += 2 * R(m * 4)
    # attention
    if "qkv" in a:
        b += lora_site(m)
    for x in ("q", "k", "v"):
        if x in a:
            b += lora_site(m)
    if f.model_type == "gpt2":
        b += R(3 * m * ec)                           # fused qkv (views saved by SDPA); a bf16 cast with 4-bit layers
    else:
        b += R(m * ec) + 2 * R(T * kvh * ec)         # q, k (rotary outputs), v
    if s.use_cache:
        b += 2 * R(T * kvh * ec)                     # DynamicCache keeps K/V copies during training
    hd = h // f.heads
    if s.attn_implementation == "eager":
        # eager attention keeps b·h·s² tensors: the softmax output (fp32 under autocast), with dropout its mask
        # (1 B) and output, and under autocast the copy cast to the compute dtype for the product with V
        bhss = s.batch_size * f.heads * s.seq_len * s.seq_len
        probs = 4 if autocast else ew
        b += R(bhss * probs) + R(m * ec)
        if f.attn_dropout > 0:
            b += R(bhss) + (0 if autocast else R(bhss * probs))
        if autocast:
            b += R(bhss * ec)
    else:
        flash = autocast and hd % 8 == 0 and hd <= 256
        lse_s = s.seq_len if flash else math.ceil(s.seq_len / 32) * 32
        b += R(m * ec) + R(s.batch_size * f.heads * lse_s * 4)   # SDPA output + logsumexp
    if "o" in a:
        b += lora_site(m)
    if f.model_type == "gpt2":
        b += R(m)                                    # residual dropout mask (bool)
    # MLP
    ff = T * f.ffn
    if "fc" in a:
        b += lora_site(m)
    if "gate" in a:
        b += lora_site(m)
    if "up" in a:
        b += lora_site(m)
    if f.gelu_new:                                   # 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) keeps four tensors
        if autocast and quant:
            b += 4 * R(ff * 4)                       # 4-bit c_fc returns fp32 (input dtype); gelu runs in fp32
        elif autocast:
            b += 3 * R(ff * 4) + R(ff * ec)          # CUDA autocast runs pow in fp32
        else:
            b += 4 * R(ff * ew)
    else:
        b += R(ff * ec) * (3 if f.gated_mlp else 1)  # gate, up, act(gate) / fc output
    if "down" in a:
        b += lora_site(ff)
    if f.model_type == "gpt2":
        b += R(m)                                    # mlp dropout mask (bool)
    if autocast and not quant and ew != ec:          # low-precision copies of the frozen weights saved for backward
        b += R((h + 2 * kvh) * h * ec) + R(h * h * ec) + R(f.ffn * h * ec) * (3 if f.gated_mlp else 2)
    if autocast:
        for role, (i, o) in (("qkv", (h, h + 2 * kvh)), ("q", (h, h)), ("k", (h, kvh)), ("v", (h, kvh)),
                             ("o", (h, h)), ("fc", (h, f.ffn)), ("gate", (h, f.ffn)), ("up", (h, f.ffn)),
                             ("down", (f.ffn, h))):
            if role in a:
                if _BYTES[s.adapter_dtype] != ec:
                    b += R(i * r * ec) + R(r * o * ec)   # casts of lora_A / lora_B
    return b


def _head_peak(f: ModelFacts, s: StepShape, body_in_scope: bool) -> tuple[int, str, str]:
    """(bytes, phase, op) of the head and loss peak, above resident memory and saved activations."""
    R = round_block
    if s.fused_cross_entropy:
        return _fused_ce_peak(f, s)
    T = s.batch_size * s.seq_len
    TV = T * f.vocab
    _, ec, _, autocast = _dtypes(f, s)
    bwd = 3 * R(TV * 4)                               # log_softmax out + NLL grad + log_softmax grad (fp32)
    extra = _head_weight_copy(f, s) if body_in_scope else 0
    if f.head_adapted:
        drop = s.lora_dropout > 0
        lo = _lora_input_bytes(s, ec, autocast)
        extra += (R(T * f.hidden) if drop else 0) + R(T * f.hidden * lo) + R(T * s.r * lo)
        fwd = 3 * R(TV * ec) if ec == 4 else R(TV * ec) + 2 * R(TV * 4)
        if fwd > bwd:
            return fwd + extra, "forward", "LoRA output + base logits in lm_head"
    return bwd + extra, "backward", "aten._log_softmax_backward_data (fp32 logits)"


def _fused_ce_peak(f: ModelFacts, s: StepShape) -> tuple[int, str, str]:
    """Liger's fused linear cross-entropy (see :func:`kolora_probe.memory.trace._fused_linear_ce_function`): at the
    end of the forward the shifted hidden states (a contiguous copy), the gradient w.r.t. them and the per-token
    loss are live, plus one chunk of logits (chunk = next power of two of BT / ⌈V/H⌉ rows) and its product with
    the head weight; no b·s·V tensor exists."""
    R = round_block
    ew, ec, _, autocast = _dtypes(f, s)
    bt = s.batch_size * (s.seq_len - 1)
    h, v = f.hidden, f.vocab
    xb = 4 if autocast else ew                        # the final norm's output: fp32 under autocast
    mb = ec if autocast else ew                       # the matmuls' dtype
    chunk = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(bt / math.ceil(v / h))))))
    chunk = min(chunk, bt)
    peak = 2 * R(bt * h * xb) + R(bt * 4) + R(chunk * v * mb) + R(chunk * h * mb) + _head_weight_copy(f, s)
    return peak, "forward", "fused linear cross-entropy (one chunk of logits)"


def closed_form(facts: ModelFacts, shape: StepShape) -> MemoryEstimate:
    """Peak bytes of one step of ``shape`` on the model described by ``facts``."""
    t0 = time.perf_counter()
    R = round_block
    comp = {k: 0 for k in COMPONENTS}
    comp["frozen_weights"] = facts.frozen_weight_bytes + facts.quantized_bytes
    ab = _BYTES[shape.adapter_dtype]                   # PEFT's fp32, or what TRL / the user cast them to
    comp["lora_weights"] = sum(R(ab * n) for n in facts.lora_numels)
    if shape.optimizer == "adamw":
        comp["optimizer_states"] = sum(2 * R(ab * n) for n in facts.lora_numels)   # AdamW: the params' dtype
    elif shape.optimizer in BNB_OPTIMIZERS:   # paged state buffers live outside PyTorch's allocator
        comp["optimizer_states"] = sum(b for b, paged in bnb_state_tensors(list(facts.lora_numels), shape.optimizer,
                                                                           CUDA_BLOCK) if not paged)
    T = shape.batch_size * shape.seq_len
    m = T * facts.hidden
    ew, ec, res, _ = _dtypes(facts, shape)
    n_scope = 0 if facts.lowest_adapted_layer is None else facts.layers - facts.lowest_adapted_layer
    if shape.gradient_checkpointing and n_scope:
        # each checkpointed layer keeps only its input (the first one the embedding output, in the weight dtype);
        # HF's checkpointing makes the embedding output require grad, so its dropout mask and input stay too
        comp["activations"] = (n_scope - 1) * R(m * res) + 2 * R(m * facts.embed_bytes) + R(m)
    else:
        comp["activations"] = n_scope * _layer_bytes(facts, shape)
    if n_scope:
        comp["activations"] += R(m * res) + 2 * R(T * 4)   # ln_f input + its mean/rstd
    head, phase, op = _head_peak(facts, shape, n_scope > 0)
    comp["logits_and_loss"] = head
    if shape.gradient_checkpointing and n_scope:
        # later in backward the loss tensors are gone and one layer is recomputed at a time (plus the residual
        # gradient flowing in and out); with a small vocabulary that can be the peak instead
        # + the gradient of the MLP's inner activation the backward holds while it runs through the layer (fp32
        # from the activation's backward and its copy in the compute dtype; gate and up for a gated MLP)
        ff = T * facts.ffn
        recompute = (_layer_bytes(facts, shape) + 2 * R(m * res)
                     + (R(ff * 4) + R(ff * ec)) * (2 if facts.gated_mlp else 1))
        if recompute > head:
            comp["logits_and_loss"] = 0
            comp["activations"] += recompute
            phase, op = "backward", "recomputation of one checkpointed layer"
    return MemoryEstimate(predicted_peak_bytes=sum(comp.values()), components=comp, peak_phase=phase, peak_op=op,
                          method="closed_form", wall_s=time.perf_counter() - t0, shape=shape, semantics="cuda")


def closed_form_for(config: Any, shape: StepShape) -> MemoryEstimate:
    """:func:`closed_form` for ``config`` (builds the meta model once: ~0.1–0.5 s; reuse :func:`model_facts`
    for many shapes of the same model and LoRA set-up)."""
    from dataclasses import replace

    t0 = time.perf_counter()
    est = closed_form(model_facts(config, shape), shape)
    return replace(est, wall_s=time.perf_counter() - t0)

"""Throughput arithmetic: FLOPs per token, peak TFLOP/s per GPU and dtype, model FLOPs utilisation (MFU).

FLOPs per token
---------------
A matrix multiply with an ``m × n`` weight costs ``2·m·n`` FLOPs per token forward (one multiply, one add per
weight), so a model whose matmul weights hold ``N`` parameters costs ``2·N`` forward. The backward pass costs
``2·N`` for the gradient with respect to the activations (needed to reach every layer below) plus ``2·N_w`` for
the gradients with respect to the weights that are trained. Attention adds matmuls between activations:
``QKᵀ`` and ``softmax·V`` cost ``2·s·d_attn`` each per token and layer forward (``s`` = sequence length,
``d_attn`` = heads × head dimension, the full ``s × s`` matrix, no causal halving), i.e. ``4·L·s·d_attn``
forward and twice that backward (both operands are activations).

* Full fine-tuning (``N_w = N``): ``6·N + 12·L·s·d_attn`` per token — Kaplan et al. 2020, "Scaling Laws for
  Neural Language Models", Table 1 (``C_forward ≈ 2N + 2·n_layer·n_ctx·d_attn``, training ≈ 3× forward) and
  Chowdhery et al. 2022, "PaLM", Appendix B (``6N + 12·L·H·Q·T`` model FLOPs per token, the MFU numerator).
* LoRA (only the adapters are trained, ``N_w = N_trainable``): forward ``2·N`` + backward activation gradients
  ``2·N`` + weight gradients ``2·N_trainable`` = ``4·N + 2·N_trainable`` + ``12·L·s·d_attn``. With
  ``N_trainable = N`` this is the full fine-tuning formula again.

``N`` counts the weights of matrix multiplies only: every linear/Conv1D layer including the output projection
(``lm_head``, also when tied to the input embedding) and the LoRA adapters; embedding lookups and position
embeddings cost no FLOPs (the logits layer is counted as in Hoffmann et al. 2022, "Chinchilla", Appendix F).
Activation gradients are only computed above the lowest trained parameter: autograd never differentiates
with respect to inputs that need no gradient. The formula above assumes they flow through the whole network
(adapters in every layer, or full fine-tuning); :func:`backward_scope` measures the part of a real model that
does back-propagate (``N_act`` matmul weights above the first trainable module in registration order, ``L_act``
blocks from the one holding it), giving ``2·N + 4·L·s·d + 2·N_act + 2·N_trainable + 8·L_act·s·d``. For adapters
only on ``lm_head`` that is little more than a forward pass; for LoRA on every layer it is the formula above
minus the first projection's input gradient (checked against ``torch.utils.flop_counter`` in the tests).
Activation recomputation (gradient checkpointing) adds a forward pass that is *hardware* FLOPs, not model FLOPs;
MFU excludes it (PaLM, Appendix B), :attr:`FlopsPerToken.with_recompute` includes it.

Peak TFLOP/s
------------
:data:`PEAK_TFLOPS` holds NVIDIA's datasheet peaks for *dense* math (the "with sparsity" figures halved):
``fp32`` = CUDA-core FP32 (PyTorch's default for fp32 matmuls), ``tf32`` = TF32 tensor cores (when
``torch.backends.cuda.matmul.allow_tf32`` is on), ``fp16``/``bf16`` = tensor cores with FP32 accumulate.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

# --- FLOPs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerShape:
    """What the FLOPs formula needs from a model config."""
    n_layers: int
    d_model: int
    d_attn: int          # heads × head dimension (the width of Q and of the attention output)
    vocab_size: int
    d_ff: int | None = None


def shape_from_config(config: Any) -> TransformerShape:
    """Layers, widths and vocabulary of a transformers ``PretrainedConfig`` (GPT-2, Llama-style and friends)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names: str) -> Any:
        for n in names:
            v = getattr(cfg, n, None)
            if v is not None:
                return v
        return None

    d_model = int(first("hidden_size", "n_embd", "d_model"))
    n_layers = int(first("num_hidden_layers", "n_layer", "num_layers"))
    heads = first("num_attention_heads", "n_head")
    head_dim = first("head_dim")
    d_attn = int(heads) * int(head_dim) if heads and head_dim else d_model
    d_ff = first("intermediate_size", "n_inner", "ffn_dim")
    return TransformerShape(n_layers, d_model, d_attn, int(first("vocab_size")), int(d_ff) if d_ff else None)


def matmul_params(model: Any) -> tuple[int, int]:
    """(all, trainable) weights of matrix multiplies in ``model``: ``nn.Linear`` (incl. bitsandbytes and LoRA
    adapter layers) and transformers' ``Conv1D``. Embeddings, norms and biases are not matmuls. Works on a
    meta-device model (shapes only)."""
    total = trainable = 0
    for module in model.modules():  # modules() yields each module once, also when shared
        n = _is_matmul(module)
        if n:
            total += n
            weight = getattr(module, "weight", None)
            if weight is not None and weight.requires_grad:
                trainable += n
    return total, trainable


@dataclass(frozen=True)
class FlopsPerToken:
    """FLOPs per token of one training step (see the module docstring for the formula and its sources)."""
    matmul_params: int
    trainable_params: int
    attention_forward: float     # 4·L·s·d_attn
    forward: float               # 2·N + 4·L·s·d_attn
    backward: float              # 2·N + 2·N_trainable + 8·L·s·d_attn
    recompute: float = 0.0       # one more forward with gradient checkpointing (hardware FLOPs only)

    @property
    def total(self) -> float:
        """Model FLOPs per trained token (forward + backward): the MFU numerator."""
        return self.forward + self.backward

    @property
    def with_recompute(self) -> float:
        """Hardware FLOPs per token, including the recomputed forward of gradient checkpointing."""
        return self.total + self.recompute


def attention_flops_per_token(n_layers: int, seq_len: int, d_attn: int) -> float:
    """Forward FLOPs per token of ``QKᵀ`` and ``softmax·V``: ``2·2·L·s·d_attn`` (full ``s×s``, PaLM App. B)."""
    return 4.0 * n_layers * seq_len * d_attn


def forward_flops_per_token(matmul_params: int, n_layers: int, seq_len: int, d_attn: int) -> float:
    """``2·N + 4·L·s·d_attn`` (Kaplan et al. 2020, Table 1, with both attention matmuls counted)."""
    return 2.0 * matmul_params + attention_flops_per_token(n_layers, seq_len, d_attn)


def training_flops_per_token(matmul_params: int, trainable_params: int, n_layers: int, seq_len: int,
                             d_attn: int, gradient_checkpointing: bool = False, *,
                             backward: "BackwardScope | None" = None) -> FlopsPerToken:
    """``4·N + 2·N_trainable + 12·L·s·d_attn`` model FLOPs per token; ``6·N + 12·L·s·d_attn`` when every
    matmul weight is trained (PaLM App. B). ``trainable_params`` counts trained *matmul* weights (LoRA A/B).
    With ``backward`` (:func:`backward_scope`) the activation gradients cover only the part that back-propagates:
    ``2·N + 2·N_act + 2·N_trainable + 4·L·s·d + 8·L_act·s·d``."""
    if not 0 <= trainable_params <= matmul_params:
        raise ValueError(f"trainable_params must be in [0, matmul_params={matmul_params}], got {trainable_params}")
    n_act, l_act = (matmul_params, n_layers) if backward is None else (backward.matmul_params, backward.layers)
    attn = attention_flops_per_token(n_layers, seq_len, d_attn)
    forward = 2.0 * matmul_params + attn
    backward_flops = 2.0 * n_act + 2.0 * trainable_params + 2.0 * attention_flops_per_token(l_act, seq_len, d_attn)
    return FlopsPerToken(matmul_params, trainable_params, attn, forward, backward_flops,
                         forward if gradient_checkpointing else 0.0)


@dataclass(frozen=True)
class BackwardScope:
    """The part of a model the backward pass goes through (see :func:`backward_scope`)."""
    matmul_params: int   # N_act: matmul weights whose input gradient autograd computes
    layers: int          # L_act: transformer blocks whose attention is back-propagated


def _is_matmul(module: Any) -> int:
    import torch

    if isinstance(module, torch.nn.Linear):
        return int(module.in_features) * int(module.out_features)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]) * int(weight.shape[1])
    return 0


def backward_scope(model: Any, n_layers: int) -> BackwardScope:
    """Matmul weights and blocks above the first module (in registration order, which is forward order for
    decoder stacks) that holds a trainable parameter: only there does autograd compute activation gradients.
    The block that holds it counts whole (its attention may lie below the adapter: at most one block too many)."""
    modules = list(model.modules())
    first = next((i for i, m in enumerate(modules)
                  if any(p.requires_grad for p in m.parameters(recurse=False))), None)
    if first is None:
        return BackwardScope(0, 0)
    n_act = sum(_is_matmul(m) for m in modules[first + 1:])
    blocks = None
    import torch

    for m in modules:
        if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers and n_layers > 0:
            blocks = list(m)
            break
    if blocks is None:
        return BackwardScope(n_act, n_layers)
    index = {id(m): i for i, m in enumerate(modules)}
    layers = 0
    for block in blocks:
        last = max(index[id(m)] for m in block.modules())
        if last > first:
            layers += 1
    return BackwardScope(n_act, layers)


# --- peak TFLOP/s ---------------------------------------------------------------------------------------
# Dense peaks from NVIDIA datasheets (sparsity figures halved). None: the dtype has no fast path on that GPU.
PEAK_TFLOPS: dict[str, dict[str, float | None]] = {
    "H200 SXM": {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},   # same GH100 compute as H100 SXM
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5},
    "H100 SXM": {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},        # SXM4 and PCIe, 40 and 80 GB
    "L40S": {"fp32": 91.6, "tf32": 183.0, "fp16": 362.0, "bf16": 362.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "fp16": 125.0, "bf16": 125.0},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "fp16": 165.2, "bf16": 165.2},    # FP32 accumulate
    "RTX 3090": {"fp32": 35.6, "tf32": 35.6, "fp16": 71.0, "bf16": 71.0},      # FP32 accumulate
    "V100": {"fp32": 15.7, "tf32": None, "fp16": 125.0, "bf16": None},         # SXM2; no TF32/BF16 units
    "T4": {"fp32": 8.1, "tf32": None, "fp16": 65.0, "bf16": None},             # Turing: no TF32/BF16 units
}

# Device names as NVML/torch report them (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
# "Tesla T4", "NVIDIA GeForce RTX 4090") → table key; the most specific pattern first.
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200 SXM"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),
    (r"\bA100\b", "A100"),
    (r"\bL40S\b", "L40S"),
    (r"\bL4\b", "L4"),
    (r"\bA10\b", "A10"),                # not A10G (AWS part with other clocks): unknown on purpose
    (r"\bRTX 4090\b", "RTX 4090"),
    (r"\bRTX 3090\b", "RTX 3090"),
    (r"\bV100\b", "V100"),
    (r"\bT4\b", "T4"),
)


def gpu_key(name: str) -> str | None:
    """The :data:`PEAK_TFLOPS` key for a device name, or None when the GPU is not in the table."""
    upper = re.sub(r"[-_]", " ", name.upper())
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, upper):
            return key
    return None


@dataclass(frozen=True)
class Peak:
    gpu: str             # table key
    dtype: str           # the math the peak is for: fp32 / tf32 / fp16 / bf16
    tflops: float


def peak_tflops(gpu_name: str, dtype: str, allow_tf32: bool = False) -> Peak | None:
    """Dense peak TFLOP/s of ``gpu_name`` for the plan's compute ``dtype`` (fp32/fp16/bf16); fp32 matmuls use
    TF32 tensor cores only when ``allow_tf32``. None when the GPU or its fast path for the dtype is unknown."""
    key = gpu_key(gpu_name)
    if key is None:
        return None
    math = "tf32" if dtype == "fp32" and allow_tf32 else dtype
    value = PEAK_TFLOPS[key].get(math)
    return Peak(key, math, value) if value else None


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops_value: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s divided by the device's peak (a fraction, 0..1)."""
    if peak_tflops_value <= 0:
        raise ValueError("peak TFLOP/s must be > 0")
    return flops_per_token * tokens_per_s / (peak_tflops_value * 1e12)


# --- measured rates -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepThroughput:
    """One training step (or forward) at ``batch_size × seq_len`` tokens taking ``seconds``."""
    batch_size: int
    seq_len: int
    seconds: float
    flops_per_token: float | None = None
    peak: Peak | None = None

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def achieved_tflops(self) -> float | None:
        return None if self.flops_per_token is None else self.flops_per_token * self.tokens_per_s / 1e12

    @property
    def mfu(self) -> float | None:
        if self.flops_per_token is None or self.peak is None:
            return None
        return mfu(self.flops_per_token, self.tokens_per_s, self.peak.tflops)


@dataclass(frozen=True)
class TokenizationThroughput:
    texts: int
    chars: int
    tokens: int
    seconds: float

    @property
    def chars_per_s(self) -> float:
        return self.chars / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else float("nan")


def tokenize_all(tokenizer: Callable[..., Any], texts: Sequence[str]) -> int:
    """Tokenise every text (one call per text, no special tokens) and return the number of tokens."""
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def measure_tokenization(tokenizer: Callable[..., Any], texts: Sequence[str], repeats: int = 1,
                         timer: Callable[[], float] = time.perf_counter) -> TokenizationThroughput:
    """Time ``repeats`` passes of :func:`tokenize_all` over ``texts`` (chars/s counts Unicode characters)."""
    if not texts:
        raise ValueError("no texts to tokenise")
    start = timer()
    tokens = 0
    for _ in range(repeats):
        tokens = tokenize_all(tokenizer, texts)
    seconds = timer() - start
    return TokenizationThroughput(len(texts) * repeats, sum(len(t) for t in texts) * repeats, tokens * repeats,
                                  seconds)


def throughput_from_seconds(seconds: Iterable[float], batch_size: int, seq_len: int,
                            flops_per_token: float | None = None, peak: Peak | None = None) -> StepThroughput:
    """A :class:`StepThroughput` from the mean of measured step times."""
    values = list(seconds)
    return StepThroughput(batch_size, seq_len, sum(values) / len(values), flops_per_token, peak)


# --- benchmark bodies (torch/peft imported on use) ------------------------------------------------------
def make_batch(tokenizer: Callable[..., Any], texts: Sequence[str], batch_size: int, seq_len: int,
               device: Any = "cpu") -> Any:
    """A ``batch_size × seq_len`` LongTensor of real text: the texts tokenised back to back (cycled if short)."""
    import torch

    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError("the texts produced no tokens")
    need = batch_size * seq_len
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids, dtype=torch.long, device=device).view(batch_size, seq_len)


def lora_copy(model: Any, plan: Any) -> Any:
    """A LoRA-wrapped deep copy of ``model`` set up like the plan (gradient checkpointing, KV cache, PEFT LoRA:
    :func:`kolora_probe.memory.trace.add_lora`, the same set-up the memory trace uses); the shared model is left
    untouched. Non-reentrant checkpointing needs no ``enable_input_require_grads`` (which would make autograd
    differentiate the whole network, down to the embeddings)."""
    import copy

    from kolora_probe.memory.trace import StepShape, add_lora

    clone = copy.deepcopy(model)
    if getattr(clone, "config", None) is not None:
        clone.config.use_cache = plan.training.use_cache
    return add_lora(clone, StepShape.from_plan(plan))


def optimizer_for(model: Any, name: str, lr: float = 1e-4) -> Any:
    """The plan's optimizer over the trainable parameters (``adamw_8bit`` needs bitsandbytes on CUDA)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name in ("adamw_8bit", "paged_adamw", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
               "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
        return cls(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


def synchronize(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: Any, optimizer: Any, input_ids: Any, dtype: str = "fp32") -> float:
    """One causal-LM training step (forward with labels, backward, optimizer step); returns the loss."""
    from kolora_probe.model.meta import autocast_for

    with autocast_for(input_ids.device, dtype):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(input_ids.device)
    return float(loss.detach())


def forward_pass(model: Any, input_ids: Any, dtype: str = "fp32") -> Any:
    """One inference forward (no grad) returning the logits, synchronised so it can be timed."""
    import torch

    from kolora_probe.model.meta import autocast_for

    with torch.no_grad(), autocast_for(input_ids.device, dtype):
        logits = model(input_ids=input_ids, use_cache=False).logits
    synchronize(input_ids.device)
    return logits

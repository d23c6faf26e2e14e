"""Predicted peak memory of one real LoRA/QLoRA training step, traced on fake tensors (no GPU, no weights).

How (details and measurements: /work/shared/notes/memory-estimation.md):

* The plan's model is built on the meta device from its config (:func:`kolora_probe.model.meta.build_meta_model`),
  optionally with bitsandbytes ``Linear4bit`` layers (NF4, double quantization) in place of the Linear/Conv1D
  layers transformers would quantize, then wrapped with PEFT LoRA exactly as the plan says.
* Every parameter and buffer is converted to a ``FakeTensor`` on the CPU (``FakeTensorMode``): shapes, dtypes
  and storages exist, no memory does. :func:`reach_steady_state` brings model and optimizer to the state a first
  step leaves, untracked (a one-token no-grad forward, an optimizer step on zero gradients); the traced step
  (forward with labels, backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``) runs under PyTorch's
  ``torch.distributed._tools.mem_tracker.MemTracker``, which follows every storage's lifetime.
* :class:`_LoRAMemTracker` adapts MemTracker: upstream registers gradient hooks on every parameter and raises on
  frozen ones (LoRA base weights); every storage is rounded up to the CUDA caching allocator's 512-byte block;
  and the live bytes are grouped into components as they change so the breakdown at the peak is exact.
* With ``cuda=True`` (the default) :func:`kolora_probe.memory.cuda_emulation.cuda_like_kernels` makes the CPU trace
  pick CUDA's kernels (flash / memory-efficient SDPA, fused dropout, CUDA autocast policy). ``cuda=False`` traces
  CPU semantics without rounding, which a real CPU step reproduces byte for byte (tests/test_memory_trace.py).

``predicted_peak_bytes`` means what ``torch.cuda.max_memory_allocated()`` would report for the step. The
allocator's slack (reserved − allocated) is ``allocator_overhead_bytes``: every allocation and free of the traced
step replayed through the CUDA caching allocator's rules (:func:`replay_caching_allocator`). The CUDA context is
added by the budget verdict (:mod:`kolora_probe.memory.budget`).

The stack is the plan's (:class:`StepShape`): PEFT's ``prepare_model_for_kbit_training`` (non-quantized weights in
fp32, so hidden states leave each norm in fp32 and bitsandbytes layers return their input's dtype), TRL's bf16
casting, reentrant or non-reentrant checkpointing, the adapters' dtype, eager or SDPA/flash attention,
bitsandbytes 8-bit / paged optimizers and a Liger-style fused linear cross-entropy.

NF4 storage (bitsandbytes 0.50, measured equal on CPU in the spike): without double quantization
``⌈n/2⌉ + 4·⌈n/64⌉ + 64`` bytes; with it ``⌈n/2⌉ + ⌈n/64⌉ + 4·⌈n/16384⌉ + 4 + 1024 + 64`` bytes. The quant-state
tensors are not module parameters, so MemTracker does not see them: they are added as resident bytes (each its
own CUDA allocation, rounded to 512 B). 8-bit AdamW (bitsandbytes) keeps two uint8 states plus one fp32 absmax
per 256-element block per state for tensors of ≥ 4096 elements and fp32 states below that
(``bnb.optim.Optimizer8bit``, ``min_8bit_size=4096``, ``block_wise=True``): traced as a stateless step plus those
resident bytes.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

CUDA_BLOCK = 512  # bytes; PyTorch's CUDA caching allocator rounds every allocation up to this
COMPONENTS = ("frozen_weights", "lora_weights", "gradients", "optimizer_states", "activations",
              "logits_and_loss", "workspace")
BNB_8BIT_MIN_SIZE = 4096      # bnb.optim min_8bit_size
BNB_8BIT_BLOCK = 256          # bnb blockwise optimizer block size
# PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp): requests ≤ kSmallSize (1 MiB) come from
# 2 MiB segments (kSmallBuffer); requests below kMinLargeAlloc (10 MiB) from 20 MiB segments (kLargeBuffer);
# larger ones get their own segment rounded up to kRoundLarge (2 MiB).
K_SMALL_SIZE = 1 << 20
K_SMALL_BUFFER = 2 << 20
K_MIN_LARGE_ALLOC = 10 << 20
K_LARGE_BUFFER = 20 << 20
K_ROUND_LARGE = 2 << 20


class TraceUnsupported(RuntimeError):
    """This configuration cannot be traced (the message says why); use the closed form instead."""


@dataclass(frozen=True)
class StepShape:
    """What one training step looks like: everything in the plan that changes memory."""
    batch_size: int
    seq_len: int
    dtype: str = "fp32"              # fp32, or the autocast dtype fp16/bf16
    weights_dtype: str = "fp32"
    quantization: str = "none"
    double_quant: bool = True
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    use_cache: bool = False
    targets: tuple[str, ...] = ("c_attn",)
    r: int = 16
    alpha: float = 32.0
    lora_dropout: float = 0.05
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    target_parameters: tuple[str, ...] = ()
    # the stack as users run it (plan [training] keys of the same names; defaults = a hand-rolled loop)
    prepare_kbit: bool = False             # PEFT prepare_model_for_kbit_training: non-quantized params in fp32
    checkpointing_reentrant: bool = False  # torch.utils.checkpoint(use_reentrant=...)
    trl_casting: bool = False              # TRL's peft_module_casting_to_bf16 after prepare_kbit (bf16 plans)
    adapter_dtype: str = "fp32"            # LoRA weights' dtype (PEFT autocasts them to fp32 by default)
    attn_implementation: str = "sdpa"      # sdpa | eager | flash_attention_2 (traced as CUDA's flash SDPA)
    fused_cross_entropy: bool = False      # Liger-style fused linear cross-entropy (no b·s·V logits)

    @classmethod
    def from_plan(cls, plan: Any, batch_size: int | None = None, seq_len: int | None = None) -> "StepShape":
        t, lo = plan.training, plan.lora
        quantized = t.quantization != "none"
        # HF/PEFT/TRL QLoRA recipes call prepare_model_for_kbit_training on a 4/8-bit model; PEFT passes no
        # use_reentrant, so torch.utils.checkpoint's default (reentrant) applies; transformers' own default is not.
        prepare = quantized if t.prepare_kbit is None else t.prepare_kbit
        reentrant = prepare if t.checkpointing_reentrant is None else t.checkpointing_reentrant
        return cls(batch_size=batch_size or t.batch_size, seq_len=seq_len or t.seq_len, dtype=t.dtype,
                   weights_dtype=t.weights_dtype, quantization=t.quantization, double_quant=t.double_quant,
                   gradient_checkpointing=t.gradient_checkpointing, optimizer=t.optimizer, use_cache=t.use_cache,
                   targets=tuple(lo.target_modules), r=lo.r, alpha=lo.alpha, lora_dropout=lo.dropout,
                   bias=lo.bias, modules_to_save=tuple(lo.modules_to_save),
                   target_parameters=tuple(lo.target_parameters), prepare_kbit=prepare,
                   checkpointing_reentrant=reentrant, trl_casting=t.trl_casting, adapter_dtype=t.adapter_dtype,
                   attn_implementation=t.attn_implementation, fused_cross_entropy=t.fused_cross_entropy)

    def with_(self, **kw: Any) -> "StepShape":
        return replace(self, **kw)

    def describe(self) -> str:
        stack = [k for k, on in (("prepare_kbit", self.prepare_kbit), ("TRL casting", self.trl_casting),
                                 ("fused-CE", self.fused_cross_entropy)) if on]
        if self.gradient_checkpointing:
            stack.append("reentrant" if self.checkpointing_reentrant else "non-reentrant")
        if self.adapter_dtype != "fp32":
            stack.append(f"{self.adapter_dtype} adapters")
        if self.attn_implementation != "sdpa":
            stack.append(self.attn_implementation)
        return (f"b={self.batch_size} s={self.seq_len} {self.dtype} (weights {self.weights_dtype}) "
                f"quant={self.quantization} gc={self.gradient_checkpointing} opt={self.optimizer} "
                f"lora r={self.r} on {','.join(self.targets + self.target_parameters)}"
                + (f" [{', '.join(stack)}]" if stack else ""))


@dataclass(frozen=True)
class MemoryEstimate:
    predicted_peak_bytes: int
    components: Mapping[str, int]            # name → bytes live at the peak; sums to predicted_peak_bytes
    peak_phase: str                          # forward | backward | optimizer
    peak_op: str                             # e.g. "aten._log_softmax_backward_data in lm_head"
    method: str                              # trace | closed_form
    wall_s: float
    shape: StepShape
    semantics: str = "cuda"                  # cuda (emulated kernels, 512-B rounding) | cpu
    notes: tuple[str, ...] = field(default=())
    allocator_overhead_bytes: int = 0        # reserved − allocated of the replayed caching allocator (trace only)
    paged_optimizer_bytes: int = 0           # bitsandbytes paged states in CUDA managed memory (not allocated)

    def to_dict(self) -> dict[str, Any]:
        return {"predicted_peak_bytes": self.predicted_peak_bytes, "components": dict(self.components),
                "allocator_overhead_bytes": self.allocator_overhead_bytes,
                "paged_optimizer_bytes": self.paged_optimizer_bytes,
                "peak_phase": self.peak_phase, "peak_op": self.peak_op, "method": self.method,
                "wall_s": round(self.wall_s, 3), "semantics": self.semantics, "notes": list(self.notes),
                "shape": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.shape).items()}}


def round_block(n: int, block: int = CUDA_BLOCK) -> int:
    return int(math.ceil(n / block) * block) if block > 1 else int(n)


def allocator_pool(nbytes: int) -> str:
    """Which kind of CUDA caching-allocator segment serves a (512-B rounded) request of ``nbytes``."""
    if nbytes <= K_SMALL_SIZE:
        return "small"
    return "mid" if nbytes < K_MIN_LARGE_ALLOC else "large"


def pool_charge(nbytes: int) -> tuple[str, int]:
    """(pool, bytes counted for it): small and mid requests share segments (bytes as requested), a large request
    occupies its own segment (rounded up to 2 MiB)."""
    pool = allocator_pool(nbytes)
    return pool, (round_block(nbytes, K_ROUND_LARGE) if pool == "large" else nbytes)


def allocation_size(nbytes: int) -> int:
    """Segment size cudaMalloc'ed for a request the caches cannot serve (CUDACachingAllocator get_allocation_size)."""
    if nbytes <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if nbytes < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return round_block(nbytes, K_ROUND_LARGE)


def replay_caching_allocator(events: list[tuple[int, int]]) -> int:
    """Peak reserved bytes of PyTorch's CUDA caching allocator replaying ``events`` in order: (key, bytes) allocates
    ``bytes`` for ``key``, (key, 0) frees it. Modelled after c10/cuda/CUDACachingAllocator.cpp with its defaults
    (no ``max_split_size``, no ``expandable_segments``, nothing released): requests rounded to 512 B; ≤ 1 MiB from
    the small pool, larger from the large pool; the smallest cached free block that fits is reused (best fit) and
    split when the rest is ≥ 512 B (small pool) or > 1 MiB (large pool), otherwise the whole block is used; a miss
    cudaMallocs a new segment (:func:`allocation_size`); freed blocks merge with free neighbours of their segment."""
    import bisect

    free: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}   # small? → sorted (size, seg, offset)
    blocks: dict[int, dict[int, list]] = {}      # seg → offset → [size, is_free]
    offsets: dict[int, list[int]] = {}           # seg → sorted offsets
    live: dict[int, tuple[int, int]] = {}        # key → (seg, offset)
    reserved = 0
    for key, nbytes in events:
        if nbytes == 0:
            where = live.pop(key, None)
            if where is None:
                continue
            seg, off = where
            size = blocks[seg][off][0]
            small = blocks[seg][off][2]
            offs = offsets[seg]
            i = bisect.bisect_left(offs, off)
            if i + 1 < len(offs) and blocks[seg][offs[i + 1]][1]:          # merge with the next free block
                nxt = offs[i + 1]
                free[small].remove((blocks[seg][nxt][0], seg, nxt))
                size += blocks[seg].pop(nxt)[0]
                offs.pop(i + 1)
            if i > 0 and blocks[seg][offs[i - 1]][1]:                      # and the previous one
                prv = offs[i - 1]
                free[small].remove((blocks[seg][prv][0], seg, prv))
                size += blocks[seg][prv][0]
                blocks[seg].pop(off)
                offs.pop(i)
                off = prv
            blocks[seg][off] = [size, True, small]
            bisect.insort(free[small], (size, seg, off))
            continue
        if key in live:
            continue
        n = max(CUDA_BLOCK, round_block(nbytes))
        small = n <= K_SMALL_SIZE
        fl = free[small]
        j = bisect.bisect_left(fl, (n, -1, -1))
        if j < len(fl):
            size, seg, off = fl.pop(j)
        else:
            size = allocation_size(n)
            seg = len(blocks)
            reserved += size
            blocks[seg], offsets[seg], off = {}, [0], 0
        rest = size - n
        if (small and rest >= CUDA_BLOCK) or (not small and rest > K_SMALL_SIZE):
            blocks[seg][off + n] = [rest, True, small]
            bisect.insort(offsets[seg], off + n)
            bisect.insort(fl, (rest, seg, off + n))
            size = n
        blocks[seg][off] = [size, False, small]
        live[key] = (seg, off)
    return reserved


def reserved_lower_bound(pools: Mapping[str, int]) -> int:
    """The least the caching allocator can have reserved (cudaMalloc'ed) to hold live requests whose bytes per pool
    are ``pools`` (from :func:`pool_charge`): small requests packed into 2 MiB segments, mid ones into 20 MiB
    segments, large ones in their own 2-MiB-rounded segments. Fragmentation (freed blocks that a later request
    cannot reuse) comes on top and depends on the order of allocations; it is not modelled."""
    small, mid, large = pools.get("small", 0), pools.get("mid", 0), pools.get("large", 0)
    return (round_block(small, K_SMALL_BUFFER) if small > 0 else 0) + \
        (round_block(mid, K_LARGE_BUFFER) if mid > 0 else 0) + large


# --- closed-form storage of quantized weights and 8-bit optimizer states ----------------------------------
def nf4_tensor_sizes(n: int, double_quant: bool = True, blocksize: int = 64,
                     nested_blocksize: int = 256) -> dict[str, int]:
    """Bytes of each tensor bitsandbytes keeps for one NF4-quantized weight of ``n`` elements."""
    nb = math.ceil(n / blocksize)
    if not double_quant:
        return {"packed": math.ceil(n / 2), "absmax": 4 * nb, "code": 16 * 4}
    nb2 = math.ceil(nb / nested_blocksize)
    return {"packed": math.ceil(n / 2), "absmax": nb, "code": 16 * 4, "offset": 4,
            "absmax2": 4 * nb2, "code2": 256 * 4}


def nf4_bytes(n: int, double_quant: bool = True, block: int = 1) -> int:
    """Total bytes of one NF4 weight (``block`` = allocator rounding per tensor: 1, or 512 on CUDA)."""
    return sum(round_block(v, block) for v in nf4_tensor_sizes(n, double_quant).values())


def adamw8bit_state_bytes(numels: list[int], block: int = 1) -> int:
    """Resident bytes of bitsandbytes AdamW8bit state for trainable tensors of these sizes."""
    return sum(b for b, _ in bnb_state_tensors(numels, "adamw_8bit", block))


BNB_PAGED_MIN_NUMEL = 100_000   # bnb Optimizer8bit.get_state_buffer: smaller state tensors are ordinary allocations
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw", "paged_adamw_8bit")


def bnb_state_tensors(numels: list[int], optimizer: str, block: int = 1) -> list[tuple[int, bool]]:
    """(bytes, paged) of every state tensor a bitsandbytes AdamW keeps for trainable tensors of these sizes.

    8-bit: two uint8 states + one fp32 absmax per 256-element block each for tensors of ≥ ``min_8bit_size``
    (4096) elements, two fp32 states below that; 32-bit (``paged_adamw``): two fp32 states. Paged optimizers put
    a state buffer in CUDA managed memory (outside PyTorch's allocator: not in ``max_memory_allocated``) only when
    its parameter has ≥ 100,000 elements (``get_state_buffer``); absmax tensors are always ordinary allocations."""
    paged = optimizer.startswith("paged_")
    eight = optimizer.endswith("_8bit")
    out: list[tuple[int, bool]] = []
    for n in numels:
        on_pages = paged and n >= BNB_PAGED_MIN_NUMEL
        if eight and n >= BNB_8BIT_MIN_SIZE:
            out += [(round_block(n, block), on_pages)] * 2
            out += [(round_block(4 * math.ceil(n / BNB_8BIT_BLOCK), block), False)] * 2
        else:
            out += [(round_block(4 * n, block), on_pages)] * 2
    return out


# --- the model of the plan --------------------------------------------------------------------------------
def _targets_conv1d(model: Any, targets: tuple[str, ...]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and any(n == t or n.endswith("." + t) for t in targets)
               for n, m in model.named_modules())


def _enable_checkpointing(model: Any, reentrant: bool = False) -> None:
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _quantize_4bit_meta(model: Any, shape: StepShape) -> Any:
    """Swap the layers transformers would quantize for bnb ``Linear4bit`` (still on the meta device)."""
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    from kolora_probe.model.meta import torch_dtype

    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=shape.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(shape.dtype))
    model = replace_with_bnb_linear(model, modules_to_not_convert=get_keys_to_not_convert(model),
                                    quantization_config=qcfg)
    model.is_loaded_in_4bit = True
    return model


def step_config(config: Any, shape: StepShape) -> Any:
    """A copy of ``config`` with the plan's ``use_cache`` and eager attention when planned (the caller's config is
    left alone). ``sdpa`` and ``flash_attention_2`` keep transformers' default (SDPA), which the CUDA emulation
    runs as FlashAttention / memory-efficient attention: the same O(s) memory (output + logsumexp) as FA2."""
    config = copy.deepcopy(config)
    config.use_cache = shape.use_cache
    if shape.attn_implementation == "eager":
        config._attn_implementation = "eager"
        text = config.get_text_config() if hasattr(config, "get_text_config") else None
        if text is not None and text is not config:
            text._attn_implementation = "eager"
    return config


TRL_HALF_NAMES = ("lm_head", "embed_tokens", "wte", "wpe")


def trl_cast(model: Any, shape: StepShape) -> None:
    """TRL SFTTrainer's ``peft_module_casting_to_bf16`` (run when ``bf16=True`` on a 4-bit model, after
    prepare_model_for_kbit_training): modules named ``*norm*`` (and LayerNorms) stay fp32, fp32 embeddings and
    output head (``lm_head``, ``embed_tokens``, ``wte``, ``wpe``) go back to bf16. Older TRL releases also cast
    the LoRA layers to bf16: plan ``adapter_dtype = "bf16"`` for those. A no-op unless the plan computes in bf16."""
    import torch

    if shape.dtype != "bf16":
        return
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) or "norm" in name:
            continue
        weight = getattr(module, "weight", None)
        if any(x in name for x in TRL_HALF_NAMES) and isinstance(weight, torch.Tensor) and \
                weight.dtype == torch.float32:
            module.to(torch.bfloat16)


def prepare_kbit(model: Any) -> Any:
    """PEFT's ``prepare_model_for_kbit_training`` as the HF/TRL QLoRA recipes call it: every non-4-bit fp16/bf16
    parameter (norms, embeddings, output head) becomes fp32, so hidden states leave each norm in fp32 and
    bitsandbytes layers return their input's dtype. Checkpointing is enabled by :func:`add_lora` (with the plan's
    flavour), not here."""
    from peft import prepare_model_for_kbit_training

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def add_lora(model: Any, shape: StepShape, meta: bool = False) -> Any:
    """``model`` with the plan's gradient checkpointing and PEFT LoRA, in training mode (``meta``: the adapter
    weights are created on the meta device)."""
    import torch
    from peft import get_peft_model

    from kolora_probe.lora.config import peft_lora_config

    if shape.gradient_checkpointing:
        _enable_checkpointing(model, shape.checkpointing_reentrant)
    config = peft_lora_config(shape.targets, shape.r, shape.alpha, shape.lora_dropout, shape.bias,
                              shape.modules_to_save, fan_in_fan_out=_targets_conv1d(model, shape.targets),
                              target_parameters=shape.target_parameters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with (torch.device("meta") if meta else contextlib.nullcontext()):
            peft_model = get_peft_model(model, config)
    if shape.adapter_dtype != "fp32":   # PEFT autocasts adapters to fp32; TRL's bf16 casting (or the user) does not
        from kolora_probe.model.meta import torch_dtype

        for p in peft_model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch_dtype(shape.adapter_dtype))
    peft_model.train()
    return peft_model


def build_step_model(config: Any, shape: StepShape, device: str = "meta", unquantized_8bit: bool = False) -> Any:
    """The plan's causal LM with PEFT LoRA, on ``device`` ("meta" for tracing, "cpu"/"cuda" to measure).

    On a real device the weights are random (initialised by transformers), which is all memory needs.
    ``unquantized_8bit=True`` builds an 8-bit plan's model with unquantized layers (for the closed form's counts).
    """
    import torch

    from kolora_probe.model.meta import build_meta_model, torch_dtype

    config = step_config(config, shape)
    if shape.quantization == "8bit" and not unquantized_8bit:
        raise TraceUnsupported("8-bit (LLM.int8) frozen weights cannot be built without a CUDA GPU; "
                               "use the closed form (--method closed-form)")
    if device == "meta":
        model = build_meta_model(config, shape.weights_dtype)
    else:
        from transformers import AutoModelForCausalLM

        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False,
                                                     dtype=torch_dtype(shape.weights_dtype))
    if shape.quantization == "4bit":
        if device != "meta":
            raise TraceUnsupported("real 4-bit steps are measured by loading the model with BitsAndBytesConfig; "
                                   "build_step_model only builds them on the meta device")
        model = _quantize_4bit_meta(model, shape)
    if shape.prepare_kbit:
        model = prepare_kbit(model)
    if shape.trl_casting:
        trl_cast(model, shape)
    return add_lora(model, shape, meta=device == "meta")


def make_optimizer(model: Any, shape: StepShape, cuda: bool, traced: bool = True) -> Any:
    """The plan's optimizer. AdamW uses the foreach implementation on CUDA (PyTorch's default there)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if shape.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True if cuda else None)
    if shape.optimizer in BNB_OPTIMIZERS and not traced:
        import bitsandbytes as bnb

        cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
               "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[shape.optimizer]
        return cls(params, lr=1e-4)
    return torch.optim.SGD(params, lr=1e-4)   # sgd, or the stateless stand-in for traced bitsandbytes optimizers


def _fake_quant_state(fm: Any, mod: Any, double_quant: bool) -> int:
    import torch
    from bitsandbytes.functional import QuantState

    conv = fm.fake_tensor_converter

    def fake(sz: tuple[int, ...], dtype: Any) -> Any:
        return conv.from_meta_and_device(fm, torch.empty(sz, dtype=dtype, device="meta"), torch.device("cpu"))

    out_f, in_f = mod.out_features, mod.in_features
    n = out_f * in_f
    nb = math.ceil(n / 64)
    cdt = mod.compute_dtype or torch.float32
    if double_quant:
        nb2 = math.ceil(nb / 256)
        st2 = QuantState(absmax=fake((nb2,), torch.float32), code=fake((256,), torch.float32), blocksize=256,
                         dtype=torch.float32)
        qs = QuantState(absmax=fake((nb,), torch.uint8), shape=torch.Size([out_f, in_f]),
                        code=fake((16,), torch.float32), blocksize=64, quant_type="nf4", dtype=cdt,
                        offset=fake((), torch.float32), state2=st2)
    else:
        qs = QuantState(absmax=fake((nb,), torch.float32), shape=torch.Size([out_f, in_f]),
                        code=fake((16,), torch.float32), blocksize=64, quant_type="nf4", dtype=cdt)
    packed = fake((math.ceil(n / 2), 1), torch.uint8)
    with fm:
        p = torch.nn.Parameter(packed, requires_grad=False)
    p.quant_state, p.bnb_quantized, p.quant_type, p.blocksize = qs, True, "nf4", 64
    mod._parameters["weight"] = p
    mod.quant_state = qs
    return n


def fakeify(model: Any, fm: Any, double_quant: bool = True) -> int:
    """Replace every meta parameter/buffer by a fake CPU tensor (shared tensors stay shared).

    bnb ``Linear4bit`` weights become fake packed uint8 tensors with a fake QuantState. Returns the number of
    quantized weight elements.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    quantized = 0
    try:
        import bitsandbytes as bnb
        lin4 = bnb.nn.Linear4bit
    except Exception:  # noqa: BLE001 - bitsandbytes missing: nothing can be 4-bit
        lin4 = ()
    cpu = torch.device("cpu")
    conv = fm.fake_tensor_converter
    memo: dict[int, Any] = {}
    for mod in model.modules():
        if lin4 and isinstance(mod, lin4) and mod.weight.device.type == "meta":
            quantized += _fake_quant_state(fm, mod, double_quant)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in memo:
                ft = conv.from_meta_and_device(fm, p.detach(), cpu)
                with fm:
                    memo[id(p)] = torch.nn.Parameter(ft, requires_grad=p.requires_grad)
            mod._parameters[name] = memo[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is None or isinstance(b, FakeTensor):
                continue
            if id(b) not in memo:   # real buffers (e.g. rotary inv_freq, computed at init) keep their values
                memo[id(b)] = conv.from_meta_and_device(fm, b, cpu) if b.device.type == "meta" else fm.from_tensor(b)
            mod._buffers[name] = memo[id(b)]
    return quantized


# --- fused linear cross-entropy (Liger kernel) ----------------------------------------------------------------
def _fused_linear_ce_function():
    import torch

    class FusedLinearCE(torch.autograd.Function):
        """What Liger's ``LigerFusedLinearCrossEntropyFunction`` allocates (``fused_linear_cross_entropy_forward``):
        the gradient w.r.t. the hidden states (BT×H) and a float32 per-token loss are computed in the forward, chunk
        by chunk (chunk = next power of two of BT / ⌈V/H⌉ rows: one chunk×V logits buffer, into which the kernel
        writes the softmax gradient in place); the backward only scales the saved gradient. The frozen head gets no
        weight gradient."""

        @staticmethod
        def forward(ctx, x, weight):  # noqa: ANN001 - autograd signature
            bt, h = x.shape
            v = weight.shape[0]
            chunk = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(bt / math.ceil(v / h))))))
            grad_input = torch.zeros_like(x)
            loss_1d = torch.zeros(bt, dtype=torch.float32, device=x.device)
            for start in range(0, bt, chunk):
                logits = x[start:start + chunk] @ weight.t()        # the kernel turns it into d loss / d logits
                grad_input[start:start + chunk] = logits @ weight
                del logits
            ctx.save_for_backward(grad_input)
            return loss_1d.sum() / bt

        @staticmethod
        def backward(ctx, grad_output):  # noqa: ANN001
            (grad_input,) = ctx.saved_tensors
            return grad_input * grad_output, None

    return FusedLinearCE


def fused_ce_forward(model: Any):
    """The causal LM's loss as Liger's patched forward computes it: the decoder's last hidden states, shifted by one
    (a contiguous copy), through the fused linear cross-entropy; the b·s·V logits never exist."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, base.base_model_prefix)
    head = base.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None or head.weight.requires_grad:
        raise TraceUnsupported("fused cross-entropy needs a frozen output head without LoRA (Liger uses its weight)")
    fn = _fused_linear_ce_function()

    def forward(ids: Any) -> Any:
        hidden = decoder(input_ids=ids)[0]
        shifted = hidden[:, :-1, :].contiguous().view(-1, hidden.shape[-1])
        return fn.apply(shifted, head.weight)

    return forward


# --- the tracker -------------------------------------------------------------------------------------------
def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _UpdateType

    class _LoRAMemTracker(MemTracker):
        """MemTracker that tolerates frozen parameters and keeps a component breakdown at the peak."""

        def __init__(self, head_names: tuple[str, ...]):
            super().__init__()
            self._head_names = head_names
            self._cur_op = "start"
            self.comp: dict[str, int] = {}
            self.peak_total = 0
            self.peak_comp: dict[str, int] = {}
            self.peak_where: tuple[str, str, bool] = ("start", "Global", False)
            self.pools: dict[str, int] = {"small": 0, "mid": 0, "large": 0}
            self.events: list[tuple[int, int]] = []   # (storage key, bytes allocated | 0 = freed), in order
            self.peak_pools: dict[str, int] = {}

        def _pool(self, nbytes: int, sign: int, key: int | None = None) -> None:
            pool, charge = pool_charge(nbytes)
            self.pools[pool] += sign * charge
            if key is not None:
                self.events.append((key, nbytes if sign > 0 else 0))

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            def _grad_hook(grad):
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            param_memory = 0
            for param in module.parameters():
                winfos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
                param_memory += sum(w.mem_consumed for w in winfos)
                if param.grad is not None:
                    self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
                if (param.requires_grad and install_grad_hooks
                        and self._param_to_grad_hook_handles.get(param, None) is None):
                    h1 = param.register_hook(_grad_hook)
                    h2 = param.register_post_accumulate_grad_hook(lambda p: _grad_hook(p.grad))
                    self._param_to_grad_hook_handles[param] = (h1, h2)
            buffer_memory = 0
            for buffer in module.buffers():
                winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
                buffer_memory += sum(w.mem_consumed for w in winfos)
            return param_memory, buffer_memory

        def _innermost(self) -> str:
            parents = [p for p in self._mod_tracker.parents if p != "Global"]
            return max(parents, key=len) if parents else "Global"

        def _where(self, winfo) -> str:
            where = getattr(winfo, "_kp_where", None)
            if where is None:
                mod = self._innermost()
                if mod == "Global":
                    where = "workspace"
                elif mod == self._head_names[0] or any(mod == h or mod.startswith(h + ".")
                                                        for h in self._head_names[1:]):
                    where = "logits_and_loss"
                else:
                    where = "activations"
                winfo._kp_where = where
            return where

        def _key(self, winfo, reftype=None) -> str:
            rt = reftype if reftype is not None else winfo.reftype
            if rt == _MemRefType.PARAM:
                return "weights"
            if rt == _MemRefType.BUFFER:
                return "frozen_weights"
            if rt == _MemRefType.GRAD:
                return "gradients"
            if rt == _MemRefType.OPT:
                return "optimizer_states"
            return self._where(winfo)

        def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None):
            super()._update_snap(u_type, winfo, old_mem_consumed=old_mem_consumed, old_reftype=old_reftype)
            c = self.comp
            if u_type == _UpdateType.ADD:
                k = self._key(winfo)
                c[k] = c.get(k, 0) + winfo.mem_consumed
                self._pool(winfo.mem_consumed, 1, id(winfo))
            elif u_type == _UpdateType.DEL:
                k = self._key(winfo)
                c[k] = c.get(k, 0) - winfo.mem_consumed
                self._pool(winfo.mem_consumed, -1, id(winfo))
            elif u_type == _UpdateType.REF:
                old, new = self._key(winfo, old_reftype), self._key(winfo)
                c[old] = c.get(old, 0) - winfo.mem_consumed
                c[new] = c.get(new, 0) + winfo.mem_consumed
            elif u_type == _UpdateType.SIZE:
                k = self._key(winfo)
                c[k] = c.get(k, 0) + winfo.mem_consumed - old_mem_consumed
                self._pool(old_mem_consumed, -1, id(winfo))
                self._pool(winfo.mem_consumed, 1, id(winfo))

        def _update_peak_stats(self, peak_state):
            # MemTracker's own per-module peak bookkeeping walks every tracked module on every op (O(ops ×
            # modules): minutes for a 7B model with LoRA); only the step's peak and its components are needed.
            total = sum(self.comp.values())
            if total > self.peak_total:
                self.peak_total = total
                self.peak_comp = dict(self.comp)
                self.peak_pools = dict(self.pools)
                self.peak_where = (self._cur_op, self._innermost(), bool(self._mod_tracker.is_bw))

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self._cur_op = str(func)
            return super().__torch_dispatch__(func, types, args, kwargs)

    return _LoRAMemTracker


@contextlib.contextmanager
def rounding(block: int):
    """Round every tracked storage up to ``block`` bytes (MemTracker does so only for real CUDA devices)."""
    import torch.distributed._tools.mem_tracker as mtm

    original = mtm._WeakRefInfo._calculate_mem_consumed

    def calc(self: Any) -> int:
        return round_block(self.size * self.element_size, block)

    mtm._WeakRefInfo._calculate_mem_consumed = calc
    try:
        yield
    finally:
        mtm._WeakRefInfo._calculate_mem_consumed = original


def _head_module_names(model: Any) -> tuple[str, ...]:
    """FQNs (ModTracker style) of the causal-LM module (where the loss is computed) and its output head."""
    root = type(model).__name__
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base_name = next(n for n, m in model.named_modules() if m is base)
    head = base.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    names = [f"{root}.{base_name}"]
    if head_name:
        names.append(f"{root}.{head_name}")
    return tuple(names)


def reach_steady_state(model: Any, opt: Any, autocast: Any) -> None:
    """Bring the model and ``opt`` to the state a first training step leaves, for the price of a tiny forward.

    * One no-grad forward of a single token under the step's autocast: what modules change on their first call
      persists (bitsandbytes' Linear4bit casts its bias to the input dtype in place, for one), as after step 1.
    * One ``opt.step()`` on zero gradients: the optimizer creates exactly the state tensors (AdamW's step /
      exp_avg / exp_avg_sq, ...) its real first step creates, with its own code, without a backward pass.
    """
    import torch

    ids = torch.zeros((1, 1), dtype=torch.long)
    with torch.no_grad(), autocast:
        model(input_ids=ids)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def trace_step(config: Any, shape: StepShape, *, cuda: bool = True) -> MemoryEstimate:
    """Peak bytes of one steady-state training step of ``shape`` on the model of ``config``, on fake tensors.

    ``cuda=True``: CUDA kernel choices and 512-B rounding (the prediction of ``max_memory_allocated``);
    ``cuda=False``: CPU semantics, unrounded (what a real CPU step allocates).
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kolora_probe.memory.cuda_emulation import cuda_like_kernels
    from kolora_probe.model.meta import autocast_for

    t0 = time.perf_counter()
    block = CUDA_BLOCK if cuda else 1
    model = build_step_model(config, shape, "meta")
    fm = FakeTensorMode()
    quantized = fakeify(model, fm, shape.double_quant)
    heads = _head_module_names(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_bytes = sum(round_block(p.numel() * p.element_size(), block) for p in trainable)
    notes: list[str] = []
    resident_extra = {"frozen_weights": 0, "optimizer_states": 0}
    resident_sizes: list[int] = []      # each of the resident extras as its own allocation (allocator pools)
    if quantized:
        import bitsandbytes as bnb

        qs = 0
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                sizes = nf4_tensor_sizes(mod.out_features * mod.in_features, shape.double_quant)
                extra = [round_block(v, block) for k, v in sizes.items() if k != "packed"]
                qs += sum(extra)
                resident_sizes += extra
        resident_extra["frozen_weights"] = qs
        notes.append(f"NF4 quant-state tensors ({qs:,} B) added as resident bytes")
    paged_bytes = 0
    if shape.optimizer in BNB_OPTIMIZERS:
        states = bnb_state_tensors([p.numel() for p in trainable], shape.optimizer, block)
        resident_extra["optimizer_states"] = sum(b for b, paged in states if not paged)
        resident_sizes += [b for b, paged in states if not paged]
        paged_bytes = sum(b for b, paged in states if paged)
        notes.append(f"bitsandbytes {shape.optimizer} states added in closed form"
                     + (f"; {paged_bytes:,} B of them paged (CUDA managed memory, outside max_memory_allocated)"
                        if paged_bytes else ""))
    autocast = autocast_for("cpu", shape.dtype)

    with contextlib.ExitStack() as stack:
        if cuda:
            stack.enter_context(cuda_like_kernels())
        stack.enter_context(rounding(block))
        stack.enter_context(fm)
        opt = make_optimizer(model, shape, cuda=cuda, traced=True)

        forward = fused_ce_forward(model) if shape.fused_cross_entropy else None

        def one_step() -> None:
            ids = torch.zeros((shape.batch_size, shape.seq_len), dtype=torch.long)
            with autocast:
                loss = forward(ids) if forward else model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reach_steady_state(model, opt, autocast)  # untracked: what step 1 leaves behind
            mt = _tracker_class()(heads)
            mt.track_external(model, opt)
            with mt:
                one_step()
    comp = {k: 0 for k in COMPONENTS}
    for k, v in mt.peak_comp.items():
        if k == "weights":
            comp["lora_weights"] += lora_bytes
            comp["frozen_weights"] += v - lora_bytes
        else:
            comp[k] = comp.get(k, 0) + v
    for k, v in resident_extra.items():
        comp[k] += v
    op, mod, is_bw = mt.peak_where
    phase = "backward" if is_bw else ("forward" if mod != "Global" else
                                      ("optimizer" if "foreach" in op or "_fused" in op else "forward"))
    short_mod = mod.split(".")[-1] if mod != "Global" else "outside modules"
    peak = sum(comp.values())
    overhead = 0
    if cuda:
        pools = dict(mt.peak_pools)
        for b in resident_sizes:
            pool, charge = pool_charge(b)
            pools[pool] = pools.get(pool, 0) + charge
        # the replay of the traced step's allocations (after the resident NF4 quant state) through the allocator's
        # rules; never below the packing bound of the live bytes at the peak
        replay = replay_caching_allocator([(-1 - i, b) for i, b in enumerate(resident_sizes)] + mt.events)
        overhead = max(0, reserved_lower_bound(pools) - peak, replay - peak)
    return MemoryEstimate(predicted_peak_bytes=peak, components=comp, peak_phase=phase,
                          peak_op=f"{op} in {short_mod}", method="trace", wall_s=time.perf_counter() - t0,
                          shape=shape, semantics="cuda" if cuda else "cpu", notes=tuple(notes),
                          allocator_overhead_bytes=overhead, paged_optimizer_bytes=paged_bytes)

"""Make a fake-CPU trace allocate what CUDA would, without a GPU (used by :mod:`kolora_probe.memory.trace`).

A training step traced on fake **CPU** tensors follows CPU kernel choices, which differ from CUDA's in ways worth
GiB (measured in the spike, /work/shared/notes/memory-estimation.md):

1. SDPA backend. CPU with dropout falls back to the math path (b·h·s² scores kept for backward); CUDA (sm80+,
   priority flash > efficient > math) uses FlashAttention for fp16/bf16 without a mask and head_dim ≤ 256,
   memory-efficient attention otherwise: O(s) memory (output + logsumexp).
   Source: ``torch/nn/attention`` docs and ``sdp_utils.cpp`` (``select_sdp_backend``).
2. Dropout. CUDA runs ``aten::native_dropout`` (fused, 1-byte bool mask); CPU's composite ``dropout`` keeps a
   mask in the input dtype.
3. Autocast op lists. CUDA autocast runs pow/softmax/layer_norm/… in fp32 and matmuls in the low dtype; CPU's
   lists differ (``ATen/autocast_mode.h``: ``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``, …). We
   re-register the AutocastCPU kernels with the CUDA policy parsed from that header.
4. transformers' packed-sequence detection treats fake tensors as "tracing" and keeps a (b,1,s,s) mask, so SDPA
   would get a mask; real unpadded, unpacked batches get ``is_causal=True`` and no mask.

Everything is installed by :func:`cuda_like_kernels` for the duration of a ``with`` block only (the
``torch.library.Library`` objects are destroyed and the transformers function restored on exit), so real CPU
computations in the same process are unaffected afterwards.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Any, Iterator

import torch

aten = torch.ops.aten

FLASH_MAX_HEAD_DIM = 256


def _sdpa_kernel(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and k.size(-3) != q.size(-3):
        rep = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(rep, -3)
        v = v.repeat_interleave(rep, -3)
    d = q.size(-1)
    if q.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and d <= FLASH_MAX_HEAD_DIM and d % 8 == 0:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(~attn_mask, float("-inf"))
    return aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, need_lse, dropout_p, is_causal,
                                                        scale=scale)[0]


def _dropout_kernel(input, p, train):
    if not train or p == 0.0:
        return input
    return aten.native_dropout(input, p, True)[0]


def _autocast_header() -> str | None:
    hdr = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "autocast_mode.h")
    return open(hdr, encoding="utf-8").read() if os.path.isfile(hdr) else None


def cuda_autocast_policy() -> dict[str, str]:
    """op name → CUDA autocast policy ('lower' | 'fp32' | 'fp32_set_opt_dtype' | 'promote' | 'none')."""
    src = _autocast_header()
    if src is None:
        return {}
    pol: dict[str, str] = {}
    for macro, policy in (("AT_FORALL_LOWER_PRECISION_FP", "lower"), ("AT_FORALL_FP32", "fp32"),
                          ("AT_FORALL_FP32_SET_OPT_DTYPE", "fp32_set_opt_dtype"), ("AT_FORALL_PROMOTE", "promote")):
        m = re.search(r"#define %s\(_\)(.*?)(?:\n\s*\n|\n#)" % macro, src, re.S)
        if not m:
            continue
        for a, b in re.findall(r"_\((\w+)(?:,\s*(\w+))?\)", m.group(1)):
            pol[f"{a}.{b}" if b else a] = policy
    # ops CPU autocast handles but CUDA does not: no cast
    for n in torch._C._dispatch_get_all_op_names():
        if n.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCPU"):
            short = n[len("aten::"):]
            if short not in pol and short.split(".")[0] not in pol:
                pol[short] = "none"
    return pol


def _cast(x: Any, dt: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype not in (torch.float64, dt):
        return x.to(dt)
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(y, dt) for y in x)
    return x


def _floats(args: Any) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _floats(a)


def _with_default_dtype(op: Any, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """``op``'s arguments with its optional ``dtype`` set to ``dtype`` where the caller left it None.

    The ``dtype`` may come positionally (``softmax(x, -1, None)``) or by keyword; the op's schema says where.
    """
    names = [a.name for a in op._schema.arguments]
    if "dtype" not in names:
        return args, kwargs
    i = names.index("dtype")
    if i < len(args):
        if args[i] is None:
            args = tuple(args[:i]) + (dtype,) + tuple(args[i + 1:])
        return args, kwargs
    if kwargs.get("dtype") is None:
        kwargs = dict(kwargs, dtype=dtype)
    return args, kwargs


_EXCLUDE_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _autocast_kernel(op: Any, policy: str):
    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE_AUTOCAST):
            if policy == "lower":
                dt = torch.get_autocast_dtype("cpu")
                args, kwargs = _cast(args, dt), {k: _cast(v, dt) for k, v in kwargs.items()}
            elif policy == "fp32":
                args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
            elif policy == "fp32_set_opt_dtype":
                fl = list(_floats(args))
                if fl and fl[0].dtype != torch.float32:
                    args, kwargs = _with_default_dtype(op, args, kwargs, torch.float32)
            elif policy == "promote":
                fl = list(_floats(args))
                if fl:
                    dt = fl[0].dtype
                    for t in fl[1:]:
                        dt = torch.promote_types(dt, t.dtype)
                    args = _cast(args, dt)
            return op(*args, **kwargs)
    return kernel


@contextlib.contextmanager
def cuda_like_kernels(autocast_policy: bool = True) -> Iterator[None]:
    """Within the block, CPU dispatch follows CUDA's SDPA backend, fused dropout and autocast policy."""
    import transformers.masking_utils as mu

    libs: list[Any] = []
    saved_packed = getattr(mu, "find_packed_sequence_indices", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            lib = torch.library.Library("aten", "IMPL")
            libs.append(lib)
            lib.impl("scaled_dot_product_attention", _sdpa_kernel, "AutogradCPU")
            lib.impl("dropout", _dropout_kernel, "AutogradCPU")
            if autocast_policy:
                alib = torch.library.Library("aten", "IMPL")
                libs.append(alib)
                for name, policy in cuda_autocast_policy().items():
                    base, _, overload = name.partition(".")
                    op = getattr(getattr(aten, base, None), overload or "default", None)
                    if op is None:
                        continue
                    try:
                        alib.impl(name, _autocast_kernel(op, policy), "AutocastCPU")
                    except Exception:  # noqa: BLE001 - an op this build cannot override keeps its CPU policy
                        pass
        if saved_packed is not None:
            mu.find_packed_sequence_indices = lambda *a, **k: None
        yield
    finally:
        if saved_packed is not None:
            mu.find_packed_sequence_indices = saved_packed
        for lib in reversed(libs):
            lib._destroy()
